"""Talker: parity with the reference Talker fed exactly as `Qwen2_5OmniForConditionalGeneration.generate` feeds it,
lock-step streaming == all-at-once, speaker / EOS / length behaviour, bad input.

The oracle (`reference_talker`) copies the reference's input construction from its `generate` and calls
`ref.talker.generate` greedily, on both of the reference's paths: its single-request one (our default) and, with
`codec_prompt`, the attention-mask one (codec pad/bos rows, multimodal positions). The whole pipeline against the
reference's own `generate` is tests/test_speech_parity.py. A speaker's bos_token is a Thinker-vocabulary id (the reference embeds it with the
Thinker's table; the official ones are 151870/151872); these tests pick their own in-vocabulary ids.
"""

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from omnivox.talker.model import (Talker, TalkerConfig, default_sampling, talker_end_reply, talker_generate,
                                  talker_positions, talker_prefill, talker_push_reply, talker_step)
from omnivox.thinker.sampling import Sampler, SamplingParams

PROMPT = "<|im_start|>user\nHello, world! How are you?<|im_end|>\n<|im_start|>assistant\n"
THINKER_NEW = 8
SPK_A, SPK_B = 200, 201  # in-vocabulary Thinker ids standing in for the speakers' bos_token


def _weights(path):
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_ours(path):
    cfg = json.loads((path / "config.json").read_text())
    sd = _weights(path)
    talker = Talker(TalkerConfig.from_dict(cfg["talker_config"])).eval()
    talker.load_state_dict({k[len("talker."):]: v for k, v in sd.items() if k.startswith("talker.")}, strict=True)
    emb = nn.Embedding.from_pretrained(sd["thinker.model.embed_tokens.weight"], freeze=True)
    return talker, emb


def greedy(penalty):
    """Greedy choice with the repetition penalty, as HF generate(do_sample=False, repetition_penalty=p) does."""
    return Sampler(SamplingParams(greedy=True, repetition_penalty=penalty))


def prompt_ids(path, with_audio=0, with_image=0):
    tok = json.loads((path / "tokenizer.json").read_text())
    from tokenizers import Tokenizer
    t = Tokenizer.from_str(json.dumps(tok))
    ids = t.encode(PROMPT).ids
    if with_audio:
        audio = [t.token_to_id("<|audio_bos|>")] + [t.token_to_id("<|AUDIO|>")] * with_audio + \
                [t.token_to_id("<|audio_eos|>")]
        ids = ids[:4] + audio + ids[4:]
    if with_image:
        image = [t.token_to_id("<|vision_bos|>")] + [t.token_to_id("<|IMAGE|>")] * with_image + \
                [t.token_to_id("<|vision_eos|>")]
        ids = ids[:-5] + image + ids[-5:]
    return torch.tensor([ids])


def run_thinker(ref, input_ids, audio_frames=0, image_grid=None):
    kw = {}
    g = torch.Generator().manual_seed(3)
    if audio_frames:
        kw.update(input_features=torch.randn(1, 128, audio_frames, generator=g),
                  feature_attention_mask=torch.ones(1, audio_frames, dtype=torch.long))
    if image_grid is not None:
        kw.update(pixel_values=torch.randn(int(image_grid.prod()), 3 * 2 * 14 * 14, generator=g),
                  image_grid_thw=image_grid)
    with torch.no_grad():
        return ref.thinker.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=THINKER_NEW, do_sample=False, output_hidden_states=True,
                                    return_dict_in_generate=True, **kw), kw


def reference_talker(ref, talker, input_ids, result, thinker_kw, speaker_bos, max_new_tokens, penalty,
                     codec_prompt=False):
    """The reference generate()'s Talker input construction (batch 1), then ref.talker.generate greedily.

    transformers 5 `generate` drops an all-ones attention mask before the first forward, and the reference Talker
    builds its prompt (codec pad/bos embeddings on the last two rows, multimodal positions via get_rope_index) only
    when it receives a mask. With `codec_prompt` the Talker gets the all-ones mask back on every forward: the path
    transformers 4 (which the checkpoints were released with) always took, and 5.x takes for a padded batch.
    """
    embeds_to_talker = result.hidden_states[0][0].clone()
    if thinker_kw.get("input_features") is not None:
        audio_mask = (input_ids == ref.config.thinker_config.audio_token_index).unsqueeze(-1)
        embeds_to_talker.masked_scatter_(audio_mask, torch.zeros(int(audio_mask.sum()), embeds_to_talker.shape[-1]))
    if thinker_kw.get("pixel_values") is not None:
        image_mask = (input_ids == ref.config.thinker_config.image_token_index).unsqueeze(-1)
        embeds_to_talker.masked_scatter_(image_mask, torch.zeros(int(image_mask.sum()), embeds_to_talker.shape[-1]))
    processed = ((embeds_to_talker,) + result.hidden_states[0][1:],) + result.hidden_states[1:]
    gen_ids = result.sequences[:, input_ids.size(1):]
    token_embeds = [h[0] for h in processed]
    hidden = [h[-1] for h in processed]
    text_ids = torch.cat([input_ids, torch.tensor([[speaker_bos]]), gen_ids[:, :1]], dim=-1)
    codec_ids = torch.cat([torch.full_like(input_ids, talker.codec_mask_token),
                           torch.tensor([[talker.codec_pad_token, talker.codec_bos_token]])], dim=1)
    emb = ref.thinker.get_input_embeddings()
    reply = torch.cat(hidden[1:], dim=1) + torch.cat(token_embeds[1:], dim=1)
    inputs = torch.cat([hidden[0] + token_embeds[0], emb(torch.tensor([[speaker_bos]])), reply[:, :1]], dim=1)
    reply = torch.cat([reply[:, 1:], emb(torch.tensor([[talker.text_eos_token]])),
                       emb(torch.tensor([[talker.text_pad_token]]))], dim=1)
    talker.rope_deltas = None
    extra = {}
    if "feature_attention_mask" in thinker_kw:
        extra["audio_feature_lengths"] = thinker_kw["feature_attention_mask"].sum(1)
    if "image_grid_thw" in thinker_kw:
        extra["image_grid_thw"] = thinker_kw["image_grid_thw"]
    if codec_prompt:
        forward = talker.forward

        @functools.wraps(forward)
        def forward_with_mask(*args, **kw):
            if kw.get("attention_mask") is None:
                past = kw["past_key_values"].get_seq_length() if kw.get("past_key_values") is not None else 0
                new = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]
                kw["attention_mask"] = torch.ones(1, past + new.shape[1], dtype=torch.long)
            return forward(*args, **kw)

        talker.forward = forward_with_mask
    try:
        with torch.no_grad():
            out = talker.generate(
                input_ids=codec_ids, input_text_ids=text_ids, thinker_reply_part=reply, inputs_embeds=inputs,
                attention_mask=torch.ones(1, codec_ids.shape[1], dtype=torch.long),
                suppress_tokens=[talker.codec_bos_token], max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=[8292, 8294], pad_token_id=talker.codec_pad_token, repetition_penalty=penalty,
                output_logits=True, return_dict_in_generate=True, **extra)
    finally:
        if codec_prompt:
            del talker.forward
    return out.sequences[0, codec_ids.shape[1]:].tolist(), [x.float() for x in out.logits]


def reply_of(result, input_ids):
    """(prompt_hidden (1, T, Ht), reply ids, reply hidden (N, Ht)): the reply tokens the Thinker fed back.

    hidden_states[k] (k >= 1) is the step that fed generated token k-1; the last generated token is never fed."""
    gen_ids = result.sequences[0, input_ids.size(1):].tolist()
    fed = len(result.hidden_states) - 1
    reply_hidden = torch.cat([h[-1] for h in result.hidden_states[1:]], dim=1)[0]  # (fed, Ht)
    return result.hidden_states[0][-1], gen_ids[:fed], reply_hidden


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    path, ref = tiny_checkpoint("base")
    talker, emb = load_ours(path)
    input_ids = prompt_ids(path)
    result, kw = run_thinker(ref, input_ids)
    return path, ref, talker, emb, input_ids, result, kw


def test_talker_state_dict_matches_checkpoint_keys(setup):
    path, ref, talker, *_ = setup
    keys = {k[len("talker."):] for k in _weights(path) if k.startswith("talker.")}
    assert set(talker.state_dict()) == keys


def test_config_reads_every_id_from_talker_config(setup):
    path, ref, talker, *_ = setup
    d = json.loads((path / "config.json").read_text())["talker_config"]
    cfg = TalkerConfig.from_dict(d)
    assert (cfg.text_bos, cfg.text_eos, cfg.text_pad) == (d["tts_text_start_token_id"], d["tts_text_end_token_id"],
                                                         d["tts_text_pad_token_id"])
    assert cfg.text_pad < 400  # the tiny vocabulary's own ids, not the official defaults
    assert (cfg.codec_bos, cfg.codec_eos, cfg.codec_pad, cfg.codec_mask) == (8293, 8294, 8292, 8296)
    assert cfg.media_ids == (d["audio_token_index"], d["image_token_index"], d["video_token_index"])
    assert cfg.decoder.head_dim == d["head_dim"] and cfg.decoder.embedding_size == d["embedding_size"]
    assert cfg.decoder.hidden_size == d["hidden_size"] != cfg.decoder.embedding_size
    changed = TalkerConfig.from_dict({**d, "tts_codec_end_token_id": 8300, "tts_text_pad_token_id": 7})
    assert changed.eos_ids == (8292, 8300) and changed.text_pad == 7


def _ours(talker, emb, input_ids, result, speaker_bos, max_new_tokens, sampler, positions=None, codec_prompt=False):
    prompt_hidden, reply_ids, reply_hidden = reply_of(result, input_ids)
    state = talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0], speaker_bos,
                           prompt_position_ids=positions, max_new_tokens=max_new_tokens, codec_prompt=codec_prompt)
    for tok, h in zip(reply_ids[1:], reply_hidden[1:]):
        talker_push_reply(state, tok, h)
    talker_end_reply(state)
    logits = []
    while not state.finished:
        talker_step(talker, state, sampler)
        logits.append(state.last_logits)
    return state, logits


@pytest.mark.parametrize("codec_prompt", [False, True])
@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_greedy_codes_and_logits_match_reference(setup, penalty, codec_prompt):
    path, ref, talker, emb, input_ids, result, kw = setup
    n = 24  # runs well past the reply (8 Thinker tokens) into the tts_text_eos / pad entries
    ref_codes, ref_logits = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_A, n, penalty,
                                             codec_prompt=codec_prompt)
    state, logits = _ours(talker, emb, input_ids, result, SPK_A, n, greedy(penalty), codec_prompt=codec_prompt)
    assert len(logits) == len(ref_logits) == n
    diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
    assert diff <= 1e-4, diff
    assert state.codes == ref_codes and state.finish_reason == "length"
    # the reference's two paths really differ (so each comparison above tells them apart)
    _, other = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_A, 1, penalty,
                                codec_prompt=not codec_prompt)
    assert (other[0] - ref_logits[0]).abs().max() > 1e-3


def test_greedy_applies_the_repetition_penalty_like_the_reference(setup):
    """The reference's talker_do_sample=False keeps its repetition penalty (1.05): greedy codes differ from the
    penalty-free run, and ours follow the reference in both."""
    path, ref, talker, emb, input_ids, result, kw = setup
    on, _ = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_A, 40, 1.05)
    off, _ = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_A, 40, 1.0)
    assert on != off
    assert _ours(talker, emb, input_ids, result, SPK_A, 40, Sampler(default_sampling(greedy=True)))[0].codes == on
    assert _ours(talker, emb, input_ids, result, SPK_A, 40,
                 Sampler(default_sampling(greedy=True, repetition_penalty=1.0)))[0].codes == off


@pytest.mark.parametrize("codec_prompt", [False, True])
def test_prompt_with_audio_and_image_matches_reference(tiny_checkpoint, codec_prompt):
    """Media placeholders zeroed on the text track; plain positions (single-request path), or multimodal prompt
    positions then text positions (codec_prompt)."""
    path, ref = tiny_checkpoint("gqa4_tied")  # (mha_wide's random Thinker answers <|vision_bos|> first)
    talker, emb = load_ours(path)
    grid = torch.tensor([[1, 4, 6]])  # 6 merged image tokens
    input_ids = prompt_ids(path, with_audio=25, with_image=6)  # 100 mel frames -> 25 audio tokens
    result, kw = run_thinker(ref, input_ids, audio_frames=100, image_grid=grid)
    ref_codes, ref_logits = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_B, 16, 1.05,
                                             codec_prompt=codec_prompt)
    positions, _ = ref.thinker.get_rope_index(input_ids, grid, None, torch.ones_like(input_ids), False,
                                              kw["feature_attention_mask"].sum(1))
    assert int(positions.max()) + 1 < input_ids.shape[1]  # the image really compresses the positions
    state, logits = _ours(talker, emb, input_ids, result, SPK_B, 16, greedy(1.05),
                          positions=positions if codec_prompt else None, codec_prompt=codec_prompt)
    diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
    assert diff <= 1e-4, diff
    assert state.codes == ref_codes


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_lockstep_streaming_gives_the_codes_of_pushing_everything_first(setup, mode):
    path, ref, talker, emb, input_ids, result, kw = setup

    def make():
        return greedy(1.05) if mode == "greedy" else Sampler(default_sampling(seed=7))

    prompt_hidden, reply_ids, reply_hidden = reply_of(result, input_ids)
    whole = talker_generate(talker, emb, input_ids, prompt_hidden, reply_ids, reply_hidden, SPK_A, make(),
                            max_new_tokens=20)
    sampler = make()

    state = talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0], SPK_A,
                           max_new_tokens=20)
    codes, waits = [], 0
    arrivals = list(zip(reply_ids[1:], reply_hidden[1:]))
    while not state.finished:
        code = talker_step(talker, state, sampler)
        if code is not None:
            codes.append(code)
            continue
        waits += 1
        if arrivals:  # the Thinker feeds its next token only now: the Talker is exactly one entry behind
            talker_push_reply(state, *arrivals.pop(0))
        else:
            talker_end_reply(state)
    assert codes == state.codes == whole.codes
    assert waits == len(reply_ids)  # waited once per later reply token, and once for the end


def test_step_waits_for_the_next_reply_entry_without_consuming_anything(setup):
    path, ref, talker, emb, input_ids, result, kw = setup
    prompt_hidden, reply_ids, reply_hidden = reply_of(result, input_ids)
    state = talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0], SPK_A,
                           max_new_tokens=10)
    first = talker_step(talker, state, greedy(1.0))  # c_0 needs only the first reply token
    assert first is not None
    length = state.cache.length
    assert talker_step(talker, state, greedy(1.0)) is None and talker_step(talker, state, greedy(1.0)) is None
    assert state.cache.length == length and state.codes == [first] and not state.finished
    talker_push_reply(state, reply_ids[1], reply_hidden[1])
    assert talker_step(talker, state, greedy(1.0)) is not None and state.cache.length == length + 1


def test_speaker_bos_changes_the_codes(setup):
    path, ref, talker, emb, input_ids, result, kw = setup
    prompt_hidden, reply_ids, reply_hidden = reply_of(result, input_ids)
    a = talker_generate(talker, emb, input_ids, prompt_hidden, reply_ids, reply_hidden, SPK_A, greedy(1.05),
                        max_new_tokens=12)
    b = talker_generate(talker, emb, input_ids, prompt_hidden, reply_ids, reply_hidden, SPK_B, greedy(1.05),
                        max_new_tokens=12)
    ref_b, _ = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_B, 12, 1.05)
    assert a.codes != b.codes and b.codes == ref_b


def test_eos_code_stops_generation_like_reference(setup):
    path, ref, talker, emb, input_ids, result, kw = setup
    ref_codes, _ = reference_talker(ref, ref.talker, input_ids, result, kw, SPK_A, 20, 1.05)
    # make the codec EOS win wherever the 6th greedy code would have been chosen
    target = ref_codes[5]
    assert target not in ref_codes[:5]
    ref_talker = copy.deepcopy(ref.talker)
    ours = copy.deepcopy(talker)
    with torch.no_grad():
        for head in (ref_talker.codec_head, ours.codec_head):
            head.weight[talker.cfg.codec_eos] = head.weight[target] * 1.01
    stopped, stopped_logits = reference_talker(ref, ref_talker, input_ids, result, kw, SPK_A, 20, 1.05)
    assert stopped[-1] == talker.cfg.codec_eos and len(stopped) < 20
    state, logits = _ours(ours, emb, input_ids, result, SPK_A, 20, greedy(1.05))
    assert state.finished and state.finish_reason == "stop"
    assert state.codes == stopped[:-1] and talker.cfg.codec_eos not in state.codes
    assert talker_step(ours, state, greedy(1.05)) is None and state.codes == stopped[:-1]
    assert max((a - b).abs().max().item() for a, b in zip(logits, stopped_logits)) <= 1e-4


def test_talker_positions_equal_the_reference_talker_rope_index(setup):
    path, ref, *_ = setup
    cfg = ref.config.thinker_config
    ids = [5, 6, cfg.vision_start_token_id] + [cfg.image_token_index] * 4 + [cfg.vision_end_token_id, 7, 8]
    input_ids = torch.tensor([ids])
    grid = torch.tensor([[1, 4, 4]])  # 4 merged image tokens
    thinker_pos, _ = ref.thinker.get_rope_index(input_ids, grid, None, torch.ones_like(input_ids))
    text_ids = torch.cat([input_ids, torch.tensor([[SPK_A, 9]])], dim=1)
    want, deltas = ref.talker.get_rope_index(text_ids, grid, None, torch.ones_like(text_ids))
    got, next_pos = talker_positions(thinker_pos, len(ids))
    assert torch.equal(got, want)
    assert next_pos == text_ids.shape[1] + int(deltas)  # the reference's decode position: past length + delta


def test_bad_input_is_a_clear_error(setup):
    path, ref, talker, emb, input_ids, result, kw = setup
    prompt_hidden, reply_ids, reply_hidden = reply_of(result, input_ids)
    with pytest.raises(ValueError, match="outside the Thinker vocabulary"):
        talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0],
                       emb.weight.shape[0] + 2148)  # e.g. a codec id mistaken for the Thinker-vocabulary bos
    with pytest.raises(ValueError, match="prompt_hidden"):
        talker_prefill(talker, emb, input_ids, prompt_hidden[:, 1:], reply_ids[0], reply_hidden[0], SPK_A)
    plain, _ = talker_positions(None, input_ids.shape[1])
    with pytest.raises(ValueError, match="codec_prompt"):
        talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0], SPK_A,
                       prompt_position_ids=plain[:, :, :-2])
    state = talker_prefill(talker, emb, input_ids, prompt_hidden, reply_ids[0], reply_hidden[0], SPK_A,
                           max_new_tokens=4)
    with pytest.raises(ValueError, match="hidden"):
        talker_push_reply(state, reply_ids[1], reply_hidden[1][:-1])
    talker_end_reply(state)
    with pytest.raises(ValueError, match="already ended"):
        talker_push_reply(state, reply_ids[1], reply_hidden[1])
