"""Spoken answers equal the reference's `generate`, step by step, on checkpoints of several shapes.

Each case runs the reference (`Qwen2_5OmniForConditionalGeneration.from_pretrained` on the saved checkpoint, fed by
its processor, greedy with `talker_do_sample=False`) and our streaming pipeline exactly as users run it (prefix
reuse and the overlapped Thinker on, token2wav streaming), then compares per step: the Thinker's raw logits
(<= 1e-4) and tokens, the Talker's raw logits (<= 1e-4) and codes; then token2wav: our one-shot mel and waveform
with the reference's noise (<= 1e-4), and the streamed audio against our streaming driver on the same codes (the
streamed-vs-one-shot distance is reported, not parity: tests/parity.py says why). Heads are peaky (x30) so greedy
choices are not decided by rounding noise; the logits are compared raw.

The matrix: four Talker shapes (layers 1-3, heads 2-4, kv heads 1-4, head_dim 8-24 with heads x head_dim != hidden,
rope theta 1e4-1e6, hidden != embedding size), seeds 0-3, both voices, answers ending by EOS and by the token
limits, a long answer (>= 300 codes), speech after image / audio / video / audio-in-video prompts, a v4-style
config.json, and a second turn of a conversation. `omnivox bench parity` prints the same table.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import parity
from parity import CASES, Case, build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    media = parity.write_media(tmp_path_factory.mktemp("parity_media"))
    cache = {}

    def get(shape: str):
        if shape not in cache:
            cache[shape] = build(shape, tmp_path_factory.mktemp(f"parity_{shape}"), media)
        return cache[shape]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spoken_answer_matches_the_reference_step_by_step(built, case):
    b = built(case.shape)
    ref = b.reference(case)
    ours = b.ours(case)
    rows = parity.compare(b.omni, ref, ours, case.speaker)
    assert not parity.failures(rows), rows
    assert b.reused[-1] >= 8, "the request should reuse the speech system prompt's rows"
    assert ours.finish == case.ends[0], (ours.finish, rows)
    talker_end = "stop" if len(ref.talker_logits) < case.talker_new else "length"
    assert talker_end == case.ends[1], rows
    assert rows["codes"] >= max(case.min_codes, 8) and rows["wave peak"] > 1e-2, rows   # real speech-sized audio


def test_second_turn_of_a_conversation_matches_the_reference_on_the_whole_history(built):
    """A Realtime-style session: the Thinker's KV cache is kept across turns and the Talker's prompt is the whole
    history; the reference runs `generate` on the rendered history."""
    turns = parity.conversation(built("pb"))
    assert list(turns) == ["turn 1", "turn 2"]
    for name, rows in turns.items():
        assert not parity.failures(rows), (name, rows)
        assert rows["codes"] >= 8, (name, rows)


@pytest.mark.parametrize("flags,reference_penalty", [([], 1.05), (["--repetition-penalty", "1.0"], 1.0)])
def test_cli_greedy_equals_the_reference_greedy(built, flags, reference_penalty):
    """`omnivox ask --greedy` = the reference's greedy generate (its Talker repetition penalty 1.05 kept);
    `--repetition-penalty 1.0` = talker_repetition_penalty=1.0."""
    from cli_support import omnivox

    b = built("pa")
    case = Case("cli", "pa", question="Hello! Who are you?", thinker_new=10, talker_new=48,
                penalty=reference_penalty)
    ref = b.reference(case)
    r = omnivox("ask", "--model", str(b.path), "--text", case.question, "--greedy", "--json", "--max-new-tokens",
                str(case.thinker_new), "--max-codec-tokens", str(case.talker_new), "--out",
                str(b.path / "cli.wav"), *flags)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["token_ids"] == ref.tokens
    assert got["codec_ids"] == ref.codes
    other = b.reference(replace(case, penalty=2.05 - reference_penalty))   # the other penalty: other codes
    assert other.codes != ref.codes


def test_codec_prompt_option_matches_the_references_attention_mask_path(built):
    """`talker_codec_prompt=True` is the reference's other Talker path (what it runs when its Talker gets an
    attention mask: transformers 4, padded batches): codec pad/bos rows and multimodal positions. Checked on an
    image prompt, where the positions differ from the single-request path."""
    import functools

    from omnivox.streaming.pipeline import generate

    b = built("pa")
    case = Case("codec prompt", "pa", question="What is in the picture?", media=("image",), talker_new=40)
    talker = b.ref.talker
    forward = talker.forward

    @functools.wraps(forward)
    def with_mask(*a, **k):                  # hand the reference Talker the all-ones mask generate() dropped
        if k.get("attention_mask") is None:
            past = k["past_key_values"].get_seq_length() if k.get("past_key_values") is not None else 0
            new = k["inputs_embeds"] if k.get("inputs_embeds") is not None else k["input_ids"]
            k["attention_mask"] = torch.ones(1, past + new.shape[1], dtype=torch.long)
        return forward(*a, **k)

    talker.forward = with_mask
    try:
        ref = b.reference(case)
    finally:
        del talker.forward
    run = parity.Run()
    opts = replace(parity.greedy_options(b.omni, case.thinker_new, case.talker_new, run=run),
                   talker_codec_prompt=True)
    parity.collect(generate(b.omni, b.messages(case), opts), run)
    rows = parity.compare(b.omni, ref, run, case.speaker)
    assert not parity.failures(rows), rows
    plain = b.ours(case)                     # the default path gives other Talker logits on the same prompt
    assert (plain.talker_logits[0] - run.talker_logits[0]).abs().max() > 1e-3
