"""Speech in the turn pipeline: the Talker runs in lock-step behind the Thinker and token2wav streams block by
block. Streamed codes equal the sequential (whole-reply) Talker run; the first audio arrives while the Thinker is
still writing; the CLI writes a playable WAV and rejects bad speech options cleanly."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import tiny
from cli_support import assert_clean_error, omnivox
from omnivox.model import load
from omnivox.streaming.pipeline import (SPEECH_SYSTEM_PROMPT, AudioChunk, Done, GenerationOptions, TextDelta,
                                        generate, user_messages)
from omnivox.streaming.prompt import build_prompt
from omnivox.talker.model import talker_generate
from omnivox.thinker.model import KVCache, decode_step, prefill, text_positions
from omnivox.thinker.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def omni(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    return load(path, audio=True)


def events_of(omni, text, max_new, max_codes, **kw):
    opts = GenerationOptions(max_new_tokens=max_new, sampling=GREEDY, audio=True, talker_sampling=GREEDY,
                             max_codec_tokens=max_codes, **kw)
    return list(generate(omni, user_messages(text, SPEECH_SYSTEM_PROMPT), opts))


def sequential_codes(omni, text, max_new, max_codes):
    """Thinker to completion first, then the Talker over the whole reply (what the reference does)."""
    messages = user_messages(text, SPEECH_SYSTEM_PROMPT)
    with torch.inference_mode():
        prompt = build_prompt(omni, messages)
        cache = KVCache.allocate(omni.config.text, 1, prompt.length + max_new, dtype=torch.float32)
        logits, prompt_hidden = prefill(omni.thinker, cache, prompt.inputs_embeds, prompt.position_ids)
        reply, hidden = [], []
        n = prompt.length
        for step in range(max_new):
            tok = int(logits.argmax(-1))
            if tok in omni.config.eos_token_ids or step + 1 == max_new:
                break
            logits, h = decode_step(omni.thinker, cache, torch.tensor([tok]), text_positions(n + prompt.rope_delta, 1))
            n += 1
            reply.append(tok)
            hidden.append(h[0])
        spk = omni.speakers["Chelsie"]
        state = talker_generate(omni.talker, omni.thinker.model.embed_tokens, prompt.input_ids, prompt_hidden, reply,
                                torch.stack(hidden), int(spk["bos_token"]), Sampler(GREEDY), max_new_tokens=max_codes)
    return state.codes


def test_streamed_codes_equal_sequential_talker(omni):
    events = events_of(omni, "Say something nice.", max_new=24, max_codes=60)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.codec_ids == sequential_codes(omni, "Say something nice.", 24, 60)
    assert len(done.codec_ids) > 10


def test_first_audio_arrives_while_thinker_still_writing(omni):
    # >= 100 text tokens and >= 5 s of speech (250 codes at 50 per second)
    events = events_of(omni, "Tell me a long story.", max_new=110, max_codes=270)
    done = events[-1]
    kinds = [type(e).__name__ for e in events]
    first_audio = kinds.index("AudioChunk")
    last_text = len(kinds) - 1 - kinds[::-1].index("TextDelta")
    assert len(done.token_ids) >= 100 and done.audio_seconds >= 5.0, (len(done.token_ids), done.audio_seconds)
    assert first_audio < last_text, "first audio must come before the Thinker finishes"
    # ... and while the Talker is still running: more audio follows the first chunk
    assert sum(k == "AudioChunk" for k in kinds[first_audio + 1:]) >= 3
    assert done.timings["first_audio_ms"] < done.timings["text_ms"]
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    assert audio.dtype == np.float32 and np.all(np.abs(audio) <= 1.0)
    assert audio.size == pytest.approx(done.audio_seconds * 24000)


def test_overlapped_thinker_gives_the_same_reply_and_audio(omni, monkeypatch):
    """The Thinker's feed on a helper thread while the Talker samples (the default) changes timing only: text,
    token ids, codes and waveform equal the one-thread run, with sampling on in both models."""
    import threading

    from omnivox.streaming import pipeline

    threads = []
    real_decode_step = pipeline.decode_step

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real_decode_step(*args)

    monkeypatch.setattr(pipeline, "decode_step", recording)
    # sampling on: the Thinker's and the Talker's random draws must come in the same order either way
    sampling = SamplingParams(greedy=False, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    messages = user_messages("Tell me about the sea.", SPEECH_SYSTEM_PROMPT)
    runs = {}
    for overlap in (True, False):
        threads.clear()
        opts = GenerationOptions(max_new_tokens=40, sampling=sampling, audio=True, max_codec_tokens=90,
                                 overlap=overlap)
        runs[overlap] = list(generate(omni, messages, opts))
        helper = [t for t in threads if t.startswith("omnivox-thinker")]
        assert (len(helper) == len(threads) > 10) if overlap else not helper, threads
    on, off = runs[True][-1], runs[False][-1]
    assert on.token_ids == off.token_ids and on.text == off.text
    assert on.codec_ids == off.codec_ids and len(on.codec_ids) > 24
    wave = {k: np.concatenate([e.samples for e in v if isinstance(e, AudioChunk)]) for k, v in runs.items()}
    assert wave[True].size > 0
    np.testing.assert_array_equal(wave[True], wave[False])
    assert "".join(e.text for e in runs[True] if isinstance(e, TextDelta)) == on.text


def test_closing_an_overlapped_reply_leaves_no_thread_running(omni):
    import threading

    opts = GenerationOptions(max_new_tokens=40, sampling=GREEDY, audio=True, talker_sampling=GREEDY,
                             max_codec_tokens=90)
    gen = generate(omni, user_messages("Tell me about the sea.", SPEECH_SYSTEM_PROMPT), opts)
    for event in gen:
        if isinstance(event, AudioChunk):
            break
    assert any(t.name.startswith("omnivox-thinker") for t in threading.enumerate())
    gen.close()
    assert not any(t.name.startswith("omnivox-thinker") for t in threading.enumerate())


def test_speaker_choice_and_unknown_speaker(omni):
    # The speaker reaches the Talker through its bos row (the codes may still agree on a tiny peaky model, so the
    # raw logits are compared) and token2wav through its conditioning (the waveform).
    runs = {}
    for name in ("Chelsie", "Ethan"):
        logits = []
        ev = events_of(omni, "Hi", max_new=6, max_codes=30, speaker=name,
                       on_logits=lambda who, x, out=logits: out.append(x.clone()) if who == "talker" else None)
        wave = np.concatenate([e.samples for e in ev if isinstance(e, AudioChunk)])
        runs[name] = (logits[0], wave)
    (la, wa), (lb, wb) = runs["Chelsie"], runs["Ethan"]
    assert (la - lb).abs().max() > 1e-3
    n = min(wa.size, wb.size)
    assert n > 0 and np.abs(wa[:n] - wb[:n]).max() > 1e-2 * np.abs(wa[:n]).max()  # the tiny waves are ~1e-7
    with pytest.raises(ValueError, match="Chelsie, Ethan"):
        events_of(omni, "Hi", max_new=4, max_codes=10, speaker="Nobody")


def test_cli_writes_wav_and_json(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("base")
    out = tmp_path / "reply.wav"
    r = omnivox("ask", "--model", str(path), "--text", "Hello", "--greedy", "--json", "--max-new-tokens", "8",
                "--max-codec-tokens", "40", "--out", str(out), "--speaker", "Ethan")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["audio"] == str(out) and j["codec_ids"] and "first_audio_ms" in j["timings"]
    wav, sr = sf.read(str(out), dtype="float32")
    assert sr == 24000 and wav.ndim == 1
    assert wav.size / sr == pytest.approx(j["audio_seconds"], abs=1e-3)


def test_cli_speech_errors(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("base")
    r = omnivox("ask", "--model", str(path), "--text", "Hi", "--out", str(tmp_path / "x.wav"), "--speaker", "Zed")
    assert_clean_error(r, "Zed", "Chelsie", "Ethan")
    r = omnivox("ask", "--model", str(path), "--text", "Hi", "--out", str(tmp_path / "missing" / "x.wav"))
    assert_clean_error(r, "does not exist")
    text_only = tiny.Variant(name="text_only", enable_audio_output=False)
    tpath, _ = tiny_checkpoint(text_only)
    r = omnivox("ask", "--model", str(tpath), "--text", "Hi", "--out", str(tmp_path / "y.wav"))
    assert_clean_error(r, "talker")


def test_fast_start_changes_only_the_opening_audio(omni, tiny_checkpoint, tmp_path):
    """--fast-start (StreamOptions.first_steps) re-solves only the first DiT chunk: same codes, same length, audio
    different only where the vocoder sees the first chunk's frames."""
    from omnivox.talker.bigvgan import receptive_field
    from omnivox.talker.token2wav import StreamOptions

    def audio(**kw):
        evs = events_of(omni, "Tell me a long story please", 12, 90, **kw)
        done = evs[-1]
        return done.codec_ids, np.concatenate([e.samples for e in evs if isinstance(e, AudioChunk)])

    codes, exact = audio()
    fast_codes, fast = audio(token2wav=StreamOptions(first_steps=4))
    assert fast_codes == codes and fast.shape == exact.shape
    dit, voc = omni.token2wav.code2wav_dit_model, omni.token2wav.code2wav_bigvgan_model
    reach = (dit.cfg.block_size + receptive_field(voc.cfg)[0]) * voc.cfg.hop   # samples that see chunk 0's frames
    assert exact.size > reach
    assert np.abs(fast[:reach] - exact[:reach]).max() > 0
    assert np.array_equal(fast[reach:], exact[reach:])

    path, _ = tiny_checkpoint("base")
    r = omnivox("ask", "--model", str(path), "--text", "Hello", "--greedy", "--json", "--max-new-tokens", "4",
                "--max-codec-tokens", "30", "--out", str(tmp_path / "fast.wav"), "--fast-start")
    assert r.returncode == 0, r.stderr
