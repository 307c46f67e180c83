"""Conversation state: the Thinker KV cache kept across turns holds exactly the rendered history, and the next reply
equals `pipeline.generate` on the full history — after multi-turn chat, images, streamed audio (with encoder
revisions), edits, truncation after barge-in and cancelled replies; speech too. The cache grows as needed and the
context limit is a clear error."""

import math

import numpy as np
import pytest
import torch

from media_fixtures import tone
from omnivox.encoders.audio import AudioEncoderSession
from omnivox.encoders.audio_features import FeatureConfig
from omnivox.model import load
from omnivox.streaming import conversation as conversation_module
from omnivox.streaming.conversation import MIN_CAPACITY, Conversation
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, AudioChunk, GenerationOptions, TextDelta, generate
from omnivox.streaming.prompt import build_prompt
from omnivox.thinker.sampling import SamplingParams

GREEDY = SamplingParams(greedy=True)
TEXT = GenerationOptions(max_new_tokens=8, sampling=GREEDY)


@pytest.fixture(scope="module")
def env(tiny_checkpoint):
    path, ref = tiny_checkpoint("base")
    return load(path, audio=True), ref


@pytest.fixture(scope="module")
def omni(env):
    return env[0]


def text(s):
    return [{"type": "text", "text": s}]


def reply(conv, item_id, options=TEXT):
    return list(conv.respond(options, item_id))[-1]


def fresh(omni, messages, options=TEXT):
    return list(generate(omni, messages, options))[-1]


def history_ids(omni, messages):
    """Token ids of the rendered history (placeholders expanded), without the assistant header."""
    with torch.inference_mode():
        ids = build_prompt(omni, messages).input_ids[0].tolist()
    header = omni.tokenizer.encode(omni.tokenizer.render_chat([], add_generation_prompt=True))
    assert ids[-len(header):] == header
    return ids[:-len(header)]


def assert_respond_equals_fresh(conv, omni, item_id, options=TEXT):
    messages = conv.messages()
    ours = reply(conv, item_id, options)
    ref = fresh(omni, messages, options)
    assert ours.token_ids == ref.token_ids
    assert ours.prompt_tokens == ref.prompt_tokens
    return ours, ref


@pytest.fixture
def prefilled(monkeypatch):
    """Rows the conversation prefills, per call."""
    rows = []
    real = conversation_module.prefill

    def counting(thinker, cache, embeds, positions, *args):
        rows.append(embeds.shape[1])
        return real(thinker, cache, embeds, positions, *args)

    monkeypatch.setattr(conversation_module, "prefill", counting)
    return rows


def test_multi_turn_text_equals_generate_on_full_history(env, prefilled):
    omni, ref_model = env
    conv = Conversation(omni)
    for turn, question in enumerate(["Hello, how are you?", "Describe the picture.", "Thank you!"]):
        before = conv.tokens
        prefilled.clear()
        conv.add("user", text(question), f"u{turn}")
        assert conv.cached_ids() == history_ids(omni, conv.messages())
        if turn:
            # only the new message (and the reply's closing tokens) is prefilled, never the history again
            assert sum(prefilled) <= conv.tokens - before + 12 < conv.tokens
        messages = conv.messages()  # noqa: F841 (the last turn's, for the reference below)
        ours, _ = assert_respond_equals_fresh(conv, omni, f"a{turn}")
    # the reference generate on the same input ids
    with torch.inference_mode():
        ids = build_prompt(omni, messages).input_ids
    with torch.no_grad():
        out = ref_model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                         do_sample=False, eos_token_id=omni.config.eos_token_ids[0],
                                         pad_token_id=omni.config.eos_token_ids[0])
    assert out[0, ids.shape[1]:].tolist() == ours.token_ids
    assert [m["role"] for m in conv.messages()] == ["user", "assistant"] * 3
    assert conv.items() == ["u0", "a0", "u1", "a1", "u2", "a2"]
    assert conv.messages()[-1]["content"][0]["text"] == omni.tokenizer.decode(ours.token_ids)


def test_turns_with_image_and_video_positions_equal_whole_prompt(omni):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (84, 56, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    conv = Conversation(omni, system="Be brief.")
    conv.add("user", text("Hi"), "u0")
    reply(conv, "a0")
    conv.add("user", [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}], "u1")
    assert_respond_equals_fresh(conv, omni, "a1")
    conv.add("user", [{"type": "video", "video": video, "fps": 1.0}, {"type": "text", "text": "And this?"}], "u2")
    assert_respond_equals_fresh(conv, omni, "a2")
    conv.delete("u1")                           # media rows are kept: the re-prefill does not re-encode
    conv.add("user", text("And now?"), "u3")
    with torch.inference_mode():
        whole = build_prompt(omni, conv.messages())
    n = conv.tokens
    assert conv.cached_ids() == whole.input_ids[0, :n].tolist()
    assert torch.equal(conv._pos[:, :, :n], whole.position_ids[:, :, :n])  # TMRoPE of the whole history
    assert_respond_equals_fresh(conv, omni, "a3")


def late_loud_clip(sr=16000):
    """4.5 s of near-silence, then a loud tone: the clamp floor rises at the end, so early windows get revised."""
    quiet = 0.001 * np.random.default_rng(0).standard_normal(int(4.5 * sr)).astype(np.float32)
    t = np.arange(int(1.7 * sr)) / sr
    return np.concatenate([quiet, (0.8 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)])


@pytest.mark.parametrize("clip_name", ["late_loud", "tone"])
def test_streamed_audio_equals_one_shot_audio_part(omni, clip_name):
    clip = late_loud_clip() if clip_name == "late_loud" else tone(5.3, 16000)
    chunk = 1600
    if clip_name == "late_loud":  # the clip does make the encoder revise windows it already emitted
        session = AudioEncoderSession(omni.thinker.audio_tower, FeatureConfig.from_dir(omni.path), keep_history=True)
        with torch.inference_mode():
            for i in range(0, clip.size, chunk):
                session.push(clip[i:i + chunk])
            session.finish()
            assert session.revisions()
    streamed, one_shot = Conversation(omni), Conversation(omni)
    for conv in (streamed, one_shot):
        conv.add("user", text("Listen."), "u0")
        reply(conv, "a0")
    streamed.begin_audio("s")
    start = streamed.tokens
    for i in range(0, clip.size, chunk):
        streamed.push_audio(clip[i:i + chunk])
    assert streamed.tokens - start >= 100      # two 2 s windows (50 tokens each) prefilled while "speaking"
    streamed.end_audio()
    one_shot.add("user", [{"type": "audio", "audio": clip}], "s")
    n = one_shot.tokens
    assert streamed.tokens == n
    assert streamed.cached_ids() == one_shot.cached_ids() == history_ids(omni, one_shot.messages())
    assert torch.equal(streamed._pos[:, :, :n], one_shot._pos[:, :, :n])
    assert (streamed._hidden[:, :n] - one_shot._hidden[:, :n]).abs().max().item() <= 1e-4
    assert (streamed.cache.k[..., :n, :] - one_shot.cache.k[..., :n, :]).abs().max().item() <= 1e-4
    assert (streamed.cache.v[..., :n, :] - one_shot.cache.v[..., :n, :]).abs().max().item() <= 1e-4
    np.testing.assert_array_equal(streamed.messages()[-1]["content"][0]["audio"], clip)
    a, b = reply(streamed, "r"), reply(one_shot, "r")
    assert a.token_ids == b.token_ids == fresh(omni, one_shot.messages()[:-1]).token_ids


def test_audio_stream_errors(omni):
    conv = Conversation(omni)
    with pytest.raises(ValueError, match="begin_audio"):
        conv.push_audio(np.zeros(160, np.float32))
    conv.begin_audio("s")
    with pytest.raises(ValueError, match="still open"):
        conv.begin_audio("t")
    with pytest.raises(ValueError, match="end_audio"):
        conv.respond(TEXT, "r")
    with pytest.raises(ValueError, match="no audio"):
        conv.end_audio()
    conv.delete("s")                            # dropping the open item ends the stream
    conv.add("user", text("typed instead"), "u")
    assert_respond_equals_fresh(conv, omni, "r")


def test_edits_then_respond_equal_fresh(omni):
    conv = Conversation(omni)
    for turn in range(3):
        conv.add("user", text(f"Question number {turn}?"), f"u{turn}")
        reply(conv, f"a{turn}")
    full = conv.tokens
    conv.delete("u1")
    assert conv.tokens < full                   # rewound at once, re-prefilled lazily
    conv.add("user", text("An inserted remark."), "x", after="u0")
    assert_respond_equals_fresh(conv, omni, "r1")
    conv.set_system("You are terse.")
    assert conv.tokens == 0 and conv.system == "You are terse."
    assert_respond_equals_fresh(conv, omni, "r2")
    conv.delete("u0")                           # the first message after the system prompt
    conv.add("system", text("Answer in one word."), "s2", after="a2")
    assert_respond_equals_fresh(conv, omni, "r3")
    conv.set_system(None)                       # the template's default system prompt comes back
    conv.add("user", text("Last one."), "u9")
    assert conv.cached_ids() == history_ids(omni, conv.messages())
    assert_respond_equals_fresh(conv, omni, "r4")
    with pytest.raises(ValueError, match="already exists"):
        conv.add("user", text("dup"), "u9")
    with pytest.raises(ValueError, match="no item"):
        conv.delete("nope")
    with pytest.raises(ValueError, match="role"):
        conv.add("tool", text("x"), "t")


def test_cancelled_respond_keeps_partial_text(omni):
    conv = Conversation(omni)
    conv.add("user", text("Tell me a long story."), "u0")
    gen = conv.respond(GenerationOptions(max_new_tokens=30, sampling=GREEDY), "a0")
    deltas = []
    for event in gen:
        if isinstance(event, TextDelta):
            deltas.append(event.text)
            if len(deltas) == 3:
                break
    assert conv.items() == ["u0", "a0"]
    with pytest.raises(ValueError, match="in progress"):
        conv.respond(TEXT, "a1")
    # the person starts speaking meanwhile: the audio waits for the reply to give the cache back
    conv.begin_audio("s")
    conv.push_audio(tone(2.5, 16000))
    gen.close()
    conv.end_audio()
    messages = conv.messages()
    assert messages[1]["role"] == "assistant"
    kept = messages[1]["content"][0]["text"]
    assert kept.startswith("".join(deltas)) and len(kept) < 30
    assert conv.cached_ids() == history_ids(omni, messages)
    assert_respond_equals_fresh(conv, omni, "a1")


def test_speech_reply_codes_and_truncate_to_heard_audio(omni):
    speech = GenerationOptions(max_new_tokens=12, sampling=GREEDY, audio=True, talker_sampling=GREEDY,
                               max_codec_tokens=24)
    conv = Conversation(omni, system=SPEECH_SYSTEM_PROMPT)
    conv.add("user", text("Hello"), "u0")
    reply(conv, "a0")
    conv.add("user", text("Say something nice."), "u1")
    ours, ref = assert_respond_equals_fresh(conv, omni, "a1", speech)
    assert ours.codec_ids == ref.codec_ids and len(ours.codec_ids) >= 12
    full_text = conv.messages()[-1]["content"][0]["text"]
    # the listener heard 150 ms = 8 codes: keep the reply tokens the Talker had consumed for the 8th code
    conv.truncate("a1", 150)
    heard = conv.messages()[-1]["content"][0]["text"]
    assert heard == omni.tokenizer.decode(ours.token_ids[:math.ceil(150 * 50 / 1000)])
    assert len(heard) < len(full_text)
    conv.add("user", text("Go on."), "u2")
    assert conv.cached_ids() == history_ids(omni, conv.messages())
    assert_respond_equals_fresh(conv, omni, "a2")
    with pytest.raises(ValueError, match="not an assistant reply with audio"):
        conv.truncate("a2", 100)
    # barge-in: the listener interrupts a spoken reply; truncate may arrive before the cancel closes the generator
    gen = conv.respond(speech, "a3")
    for event in gen:
        if isinstance(event, AudioChunk):
            break
    conv.truncate("a3", 60)                     # 3 codes heard
    gen.close()
    item = conv._items[-1]
    assert item.reply.tokens_at == [1, 2, 3]
    assert conv.messages()[-1]["content"][0]["text"] == omni.tokenizer.decode(item.reply.fed_ids)
    assert len(item.reply.fed_ids) == 3
    conv.add("user", text("Sorry, go on."), "u3")
    assert_respond_equals_fresh(conv, omni, "a4")


def test_cache_grows_past_first_allocation(omni):
    conv = Conversation(omni)
    conv.add("user", text("short"), "u0")
    assert conv.cache.max_len == MIN_CAPACITY
    first = conv.nbytes
    conv.add("user", text("word " * 300), "u1")
    assert conv.tokens > MIN_CAPACITY and conv.cache.max_len >= conv.tokens
    assert conv.cache.max_len < omni.config.text.max_position_embeddings and conv.nbytes > first
    assert conv.cached_ids() == history_ids(omni, conv.messages())
    assert_respond_equals_fresh(conv, omni, "a0")


def test_context_overflow_is_a_clear_error(omni):
    limit = omni.config.text.max_position_embeddings
    conv = Conversation(omni)
    conv.add("user", text("hello"), "u0")
    with pytest.raises(ValueError, match=f"context of {limit} tokens"):
        conv.add("user", text("word " * limit), "u1")
    assert conv.items() == ["u0"]               # the conversation is unchanged
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(conv.respond(GenerationOptions(max_new_tokens=limit, sampling=GREEDY), "a0"))
    assert conv.items() == ["u0"]
    assert_respond_equals_fresh(conv, omni, "a0")


# ------------------------------------------------------------------------------------------------ context limits
def test_past_the_context_window_old_turns_are_dropped_and_the_cache_rebuilt_once(omni, prefilled):
    """truncation='auto' (the Realtime default): a conversation driven far past a small window keeps the system
    prompt and the latest turns, each truncation rebuilds the cache once (from the system prompt's end), and every
    reply still equals `generate` on the history that remains."""
    conv = Conversation(omni, system="Be brief.", max_tokens=160)
    system_rows = len(history_ids(omni, [{"role": "system", "content": "Be brief."}]))
    dropped_total = []
    for turn in range(12):
        conv.add("user", text(f"Question {turn}: the quick brown fox jumps over the lazy dog."), f"u{turn}")
        assert conv.cached_ids() == history_ids(omni, conv.messages())
        dropped_total += conv.take_dropped()
        prefilled.clear()
        rebuilds = conv.rebuilds
        ours = reply(conv, f"a{turn}")
        # the reply is the one `generate` gives on the history the truncation left (the new reply aside)
        ref = fresh(omni, conv.messages()[:-1])
        assert ours.token_ids == ref.token_ids and ours.prompt_tokens == ref.prompt_tokens
        dropped = conv.take_dropped()
        dropped_total += dropped
        assert conv.tokens <= 160
        if dropped:
            assert conv.rebuilds == rebuilds + 1
            # one rebuild: every row after the system prompt prefilled once, in one pass
            assert sum(prefilled) == ours.prompt_tokens - system_rows
            assert dropped == [i for i in [f"u{t}" if k % 2 == 0 else f"a{t}" for t in range(turn)
                                            for k in range(2)] if i in dropped]
        else:
            assert sum(prefilled) < 40           # only the new message and the header
    assert dropped_total and dropped_total[:2] == ["u0", "a0"]   # oldest first
    assert conv.messages()[0] == {"role": "system", "content": "Be brief."}
    assert conv.items()[-2:] == ["u11", "a11"] and set(conv.items()).isdisjoint(dropped_total)


def test_retention_ratio_drops_more_so_the_next_turns_fit(omni):
    conv = Conversation(omni, system="Be brief.", max_tokens=200, truncation=0.5)
    rebuilds_at = []
    for turn in range(10):
        before = conv.rebuilds
        conv.add("user", text(f"Question {turn}: the quick brown fox jumps over the lazy dog."), f"u{turn}")
        reply(conv, f"a{turn}")
        if conv.rebuilds > before:
            rebuilds_at.append(turn)
            assert conv.tokens <= 200 // 2 + 40   # about half the budget is left after a truncation
    assert len(rebuilds_at) >= 2
    # after a truncation to half the budget, the next turn does not truncate again
    assert all(b - a > 1 for a, b in zip(rebuilds_at, rebuilds_at[1:]))


def test_truncation_disabled_is_a_clear_error_and_changes_nothing(omni):
    conv = Conversation(omni, system="Be brief.", max_tokens=120, truncation="disabled")
    conv.add("user", text("the quick brown fox jumps over the lazy dog " * 2), "u0")
    reply(conv, "a0")
    with pytest.raises(conversation_module.ContextFull, match="truncation is disabled"):
        for turn in range(1, 10):
            conv.add("user", text("the quick brown fox jumps over the lazy dog " * 2), f"u{turn}")
            reply(conv, f"a{turn}")
    assert conv.items()[:2] == ["u0", "a0"] and not conv.take_dropped()
    ids = conv.cached_ids()                     # (a reply's closing rows are prefilled lazily)
    assert ids == history_ids(omni, conv.messages())[:len(ids)]


# ------------------------------------------------------------------------------------------------ transcription
def test_transcribe_is_the_asr_prompt_on_the_items_audio_and_leaves_the_history_alone(omni, prefilled):
    clip = tone(2.3, 16000)
    conv = Conversation(omni, system=SPEECH_SYSTEM_PROMPT)
    conv.begin_audio("u0")
    for k in range(0, len(clip), 3200):
        conv.push_audio(clip[k:k + 3200])
    conv.end_audio()
    ids = conv.cached_ids()
    encoded = []
    real = omni.thinker.audio_tower.encode
    omni.thinker.audio_tower.encode = lambda *a, **k: (encoded.append(1), real(*a, **k))[1]
    try:
        options = GenerationOptions(max_new_tokens=12, sampling=GREEDY, audio=True)  # audio is turned off
        events = list(conv.transcribe("u0", options))
    finally:
        del omni.thinker.audio_tower.encode
    done = events[-1]
    assert not encoded                                  # the item's encoder rows are reused
    assert not any(isinstance(e, AudioChunk) for e in events) and done.codec_ids == []
    asr = [{"role": "system", "content": conversation_module.ASR_SYSTEM_PROMPT},
           {"role": "user", "content": [{"type": "audio", "audio": clip},
                                        {"type": "text", "text": conversation_module.ASR_INSTRUCTION}]}]
    ref = fresh(omni, asr, GenerationOptions(max_new_tokens=12, sampling=GREEDY))
    assert done.token_ids == ref.token_ids and done.prompt_tokens == ref.prompt_tokens
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    assert conv.cached_ids() == ids and conv.items() == ["u0"]   # the conversation is untouched
    with pytest.raises(ValueError, match="no audio"):
        conv.add("user", text("hi"), "u1")
        conv.transcribe("u1", options)
