"""`omnivox ask` on Qwen3-Omni checkpoints (model type `qwen3_omni_moe`) against the reference's greedy `generate`.

Tiny random checkpoints written the way the official one is laid out (tests/tiny_qwen3.make_checkpoint: weights,
config, tokenizer, feature extractor), three variants. The CLI's `token_ids` must equal the reference Thinker's
greedy tokens, its `codec_ids` (G codebooks x N frames) the codes the reference hands Code2Wav, its WAV the
reference's waveform within 1e-4; the logits of every Thinker and Talker step are compared through
`GenerationOptions.on_logits`, and the first audio must come before the whole answer is done.
"""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import tiny_qwen3 as tq
from cli_support import omnivox
from tiny_qwen3 import one_thread  # noqa: F401  (autouse)

PROMPT = "Hello! Tell me a story."


@pytest.fixture(scope="module", params=["base", "wide", "mha"])
def ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"q3_{request.param}")
    ref, ids = tq.make_checkpoint(out, request.param)
    return dict(dir=out, ref=ref, ids=ids, name=request.param)


def _prompt_ids(ckpt, system=None):
    from omnivox.streaming.pipeline import user_messages
    from omnivox.thinker.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt["dir"])
    return torch.tensor([tok.encode(tok.render_chat(user_messages(PROMPT, system), add_generation_prompt=True))])


def _reference(ckpt, prompt, thinker_max, talker_max, speaker="Ethan"):
    """The reference's greedy generate: (Thinker tokens, its per-step logits, codes (1, G, N), waveform,
    Talker code-0 logits per step)."""
    ref = ckpt["ref"]
    got = {"talker": []}
    decode = ref.code2wav.chunked_decode

    def record(codes, **kwargs):
        got["codes"] = codes.clone()
        return decode(codes, **kwargs)

    thinker_generate = ref.thinker.generate

    def thinker(*args, **kwargs):
        out = thinker_generate(*args, **kwargs, output_logits=True)
        got["thinker_logits"] = out.logits
        return out

    hook = ref.talker.register_forward_hook(lambda m, i, o: got["talker"].append(o.logits[:, -1].clone()))
    ref.code2wav.chunked_decode, ref.thinker.generate = record, thinker
    try:
        with torch.no_grad():
            seq, wav = ref.generate(prompt, speaker=speaker, thinker_max_new_tokens=thinker_max,
                                    thinker_do_sample=False, talker_do_sample=False,
                                    talker_max_new_tokens=talker_max, thinker_eos_token_id=ckpt["ids"]["im_end"])
    finally:
        ref.code2wav.chunked_decode, ref.thinker.generate = decode, thinker_generate
        hook.remove()
    return seq[0, prompt.shape[1]:].tolist(), got["thinker_logits"], got.get("codes"), wav, got["talker"]


@pytest.mark.parametrize("thinker_max, talker_max", [(8, 30), (14, 64)])
def test_ask_gives_the_reference_tokens_codes_and_waveform(ckpt, tmp_path, thinker_max, talker_max):
    wav_path = tmp_path / "reply.wav"
    r = omnivox("ask", "--model", str(ckpt["dir"]), "--text", PROMPT, "--greedy", "--out", str(wav_path), "--json",
                "--max-new-tokens", str(thinker_max), "--max-codec-tokens", str(talker_max))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tokens, _, codes, wav, _ = _reference(ckpt, _prompt_ids(ckpt), thinker_max, talker_max)
    assert out["token_ids"] == tokens
    if codes is None:                                                     # the reference made no frame at all
        assert out["codec_ids"] == []
        return
    assert out["codec_ids"] == codes[0].tolist()                          # (G, N), every codebook
    ours, sr = sf.read(str(wav_path), dtype="float32")
    assert sr == 24000 and len(ours) == wav.shape[-1]
    np.testing.assert_allclose(ours, wav.reshape(-1).numpy(), atol=1 / 32767 + 1e-4)   # PCM16 file
    t = out["timings"]
    assert t["first_audio_ms"] < t["total_ms"]


def test_logits_of_every_step_match_the_reference(ckpt):
    """Per-step logits, not just the argmax: the Thinker's and the Talker's code 0 (the code predictor's are
    checked in tests/talker/test_qwen3_talker.py)."""
    from omnivox.model import load
    from omnivox.streaming.decoding import talker_sampling, thinker_sampling
    from omnivox.streaming.pipeline import GenerationOptions, run, user_messages

    omni = load(str(ckpt["dir"]))
    seen = {"thinker": [], "talker": []}
    options = GenerationOptions(max_new_tokens=10, audio=True, max_codec_tokens=40,
                                sampling=thinker_sampling(omni.config.generation, greedy=True),
                                talker_sampling=talker_sampling(greedy=True),
                                on_logits=lambda part, lg: seen[part].append(lg.clone()))
    done, audio = run(omni, user_messages(PROMPT), options)
    tokens, thinker_logits, codes, wav, talker_logits = _reference(ckpt, _prompt_ids(ckpt), 10, 40)
    assert done.token_ids == tokens
    assert len(seen["thinker"]) == len(thinker_logits)
    d_thinker = max((a - b).abs().max().item() for a, b in zip(seen["thinker"], thinker_logits))
    assert d_thinker <= 1e-4, d_thinker
    assert len(seen["talker"]) == len(talker_logits)
    d_talker = max((a - b).abs().max().item() for a, b in zip(seen["talker"], talker_logits))
    assert d_talker <= 1e-4, d_talker
    if codes is not None:
        assert done.codec_ids == codes[0].tolist()
        assert np.abs(audio - wav.reshape(-1).numpy()).max() <= 1e-4


def test_every_voice_and_errors(ckpt, tmp_path):
    from omnivox.model import load

    omni = load(str(ckpt["dir"]))
    assert sorted(omni.speakers) == ["Aiden", "Chelsie", "Ethan"]
    for voice in ("chelsie", "Aiden"):
        r = omnivox("ask", "--model", str(ckpt["dir"]), "--text", PROMPT, "--greedy", "--out",
                    str(tmp_path / f"{voice}.wav"), "--json", "--max-new-tokens", "6", "--max-codec-tokens", "20",
                    "--speaker", voice)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        codes = _reference(ckpt, _prompt_ids(ckpt), 6, 20, speaker=voice.lower())[2]
        assert out["codec_ids"] == ([] if codes is None else codes[0].tolist())
    bad = omnivox("ask", "--model", str(ckpt["dir"]), "--text", PROMPT, "--out", str(tmp_path / "x.wav"),
                  "--speaker", "Nobody")
    assert bad.returncode == 2 and "unknown speaker 'Nobody'" in bad.stderr and "Traceback" not in bad.stderr
    from media_fixtures import write_image

    media = omnivox("ask", "--model", str(ckpt["dir"]), "--text", PROMPT, "--no-audio", "--image",
                    str(write_image(tmp_path / "pic.png", 32, 32)))
    assert media.returncode == 2 and "not wired for Qwen3-Omni" in media.stderr


def test_text_only_ask_and_doctor(ckpt):
    r = omnivox("ask", "--model", str(ckpt["dir"]), "--text", PROMPT, "--greedy", "--no-audio", "--json",
                "--max-new-tokens", "9")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == _reference(ckpt, _prompt_ids(ckpt), 9, 4)[0]
    d = omnivox("doctor", "--model", str(ckpt["dir"]))
    assert "qwen3_omni_moe" in d.stdout and "3 voices in config.json" in d.stdout, d.stdout


def test_serve_says_clearly_that_it_does_not_run_qwen3_yet(ckpt):
    r = omnivox("serve", "--model", str(ckpt["dir"]), "--port", "0")
    assert r.returncode == 2 and "Qwen3-Omni checkpoint" in r.stderr and "Traceback" not in r.stderr
