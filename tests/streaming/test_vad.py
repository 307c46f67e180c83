"""Turn detection (streaming/vad.py): Silero parity, server_vad events on generated speech, streaming invariance."""

import threading
import time
import warnings

import numpy as np
import pytest
import soxr
import torch

from speechlike import silence, speechlike, to_pcm16, write_wav
from omnivox.streaming.vad import (SileroState, SpeechStarted, SpeechStopped, TurnDetector, VadConfig,
                                   item_start_ms, shared_weights, silero_step)


def _package_model():
    """The silero-vad package's own TorchScript model (importing the package sets torch threads to 1: undo it)."""
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from silero_vad import load_silero_vad
        model = load_silero_vad()
    torch.set_num_threads(threads)
    return model


def _windows16(x, sr=24000):
    y = soxr.resample(x, sr, 16000).astype(np.float32)
    n = len(y) // 512
    return torch.from_numpy(y[: n * 512].reshape(n, 512))


def _our_probs(windows):
    weights, state, out = shared_weights(), SileroState.zeros(), []
    for w in windows:
        p, state = silero_step(weights, w.numpy(), state)
        out.append(p)
    return np.array(out)


def _push(det, x, chunk=480):
    events = []
    for i in range(0, len(x), chunk):
        events += det.push(x[i : i + chunk])
    return events


def _turns(seed=0):
    """silence / speech / silence / speech / silence with known boundaries (ms)."""
    parts = [silence(1.0), speechlike(3.0, seed=seed), silence(1.5), speechlike(2.0, seed=seed + 1), silence(1.2)]
    return np.concatenate(parts), [(1000, 4000), (5500, 7500)]


def test_probabilities_equal_the_silero_package_model():
    rng = np.random.default_rng(0)
    x = np.concatenate([silence(0.4), speechlike(2.5, seed=1), silence(0.6),
                        (0.05 * rng.standard_normal(12000)).astype(np.float32), speechlike(1.0, seed=2)])
    windows = _windows16(x)
    ref = _package_model()
    ref.reset_states()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # (tiny torch ops with 2 threads spin on a busy machine: slow)
    try:
        with torch.inference_mode():
            theirs = np.array([ref(w, 16000).item() for w in windows])
    finally:
        torch.set_num_threads(threads)
    ours = _our_probs(windows)
    print(f"max |ours - package| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= 1e-4     # float32 summation order only (project fp32 parity bound)
    assert (theirs > 0.8).sum() > 40 and (theirs < 0.1).sum() > 20      # the audio exercises both regimes


@pytest.mark.parametrize("seconds,seed", [(1.0, 0), (1.0, 5), (4.0, 1), (4.0, 7), (15.0, 2)])
def test_speechlike_scores_as_speech_and_quiet_audio_does_not(seconds, seed):
    x = np.concatenate([silence(0.5), speechlike(seconds, seed=seed)])
    p = _our_probs(_windows16(x))
    lead = int(0.5 * 16000 / 512)
    assert np.all(p[:lead] < 0.1)
    assert np.mean(p[lead:] > 0.8) >= 0.8, f"only {np.mean(p[lead:] > 0.8):.2f} of the windows score > 0.8"
    noise = (0.003 * np.random.default_rng(seed).standard_normal(24000 * 2)).astype(np.float32)
    p_noise = _our_probs(_windows16(noise))
    assert p_noise.max() < 0.2 and p_noise[3:].max() < 0.1      # (the first window from a zero state may reach ~0.11)


def test_speechlike_helpers():
    x = speechlike(1.25, sample_rate=16000, seed=3)
    assert x.dtype == np.float32 and x.shape == (20000,) and 0.4 < np.abs(x).max() <= 0.5
    assert np.array_equal(x, speechlike(1.25, sample_rate=16000, seed=3))
    assert not np.array_equal(x, speechlike(1.25, sample_rate=16000, seed=4))
    pcm = to_pcm16(np.array([0.0, 0.5, -1.0, 2.0], dtype=np.float32))
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -32767, 32767]
    assert silence(0.5).shape == (12000,) and not silence(0.5).any()


def test_write_wav_round_trips(tmp_path):
    import soundfile as sf
    x = speechlike(0.5, seed=1)
    data, sr = sf.read(write_wav(tmp_path / "a.wav", x, 24000), dtype="float32")
    assert sr == 24000 and np.abs(data - x).max() < 1e-4


@pytest.mark.parametrize("seed", [0, 3])
def test_speech_silence_speech_gives_started_stopped_started_stopped_on_time(seed):
    x, bounds = _turns(seed)
    events = _push(TurnDetector(VadConfig()), x)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped, SpeechStarted, SpeechStopped]
    for (start, end), began, ended in zip(bounds, events[0::2], events[1::2]):
        assert abs(began.audio_start_ms - start) <= 100, (began, start)
        assert abs(ended.audio_end_ms - end) <= 100, (ended, end)


def test_speech_stopped_comes_after_silence_duration():
    x, bounds = _turns(1)
    det = TurnDetector(VadConfig(silence_duration_ms=800))
    fired_at = []
    for i in range(0, len(x), 240):                      # 10 ms pushes: note the session time of each event
        for e in det.push(x[i : i + 240]):
            fired_at.append((e, (i + 240) * 1000 // 24000))
    stops = [(e, t) for e, t in fired_at if isinstance(e, SpeechStopped)]
    assert len(stops) == 2
    for (e, t), (_, end) in zip(stops, bounds):
        assert 800 <= t - e.audio_end_ms <= 800 + 32 + 40      # one window + the resampler's delay at most
        assert t - end >= 700


def test_short_pause_inside_a_turn_does_not_stop_it():
    x = np.concatenate([silence(0.5), speechlike(1.5, seed=2), silence(0.25), speechlike(1.5, seed=4), silence(1)])
    events = _push(TurnDetector(VadConfig(silence_duration_ms=500)), x)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]


def test_chunk_size_does_not_change_events_or_state():
    x, _ = _turns(2)
    one = TurnDetector(VadConfig())
    whole = one.push(x)
    rng = np.random.default_rng(0)
    for sizes in ([240], [1, 7, 511, 512, 513, 4096], list(rng.integers(1, 6000, size=50))):
        det, events, i, k = TurnDetector(VadConfig()), [], 0, 0
        while i < len(x):
            n = int(sizes[k % len(sizes)])
            events += det.push(x[i : i + n])
            i, k = i + n, k + 1
        assert events == whole
        assert np.array_equal(det.state.h, one.state.h) and np.array_equal(det.state.c, one.state.c)
        assert det.audio_ms == one.audio_ms


def test_silence_and_low_noise_never_trigger():
    rng = np.random.default_rng(1)
    det = TurnDetector(VadConfig())
    assert _push(det, silence(5.0)) == []
    assert _push(det, (0.002 * rng.standard_normal(24000 * 5)).astype(np.float32)) == []
    assert _push(det, np.full(24000, 0.01, np.float32)) == []          # DC offset
    assert not det.in_speech and det.last_probability < 0.1


def test_threshold_one_never_triggers_and_low_threshold_triggers_on_speech():
    x = np.concatenate([silence(0.5), speechlike(1.5, seed=0)])
    assert TurnDetector(VadConfig(threshold=1.0)).push(x) == []
    assert [type(e) for e in TurnDetector(VadConfig(threshold=0.2)).push(x)] == [SpeechStarted]


def test_item_start_includes_prefix_padding():
    cfg = VadConfig(prefix_padding_ms=300)
    assert item_start_ms(SpeechStarted(1000), cfg) == 700
    assert item_start_ms(SpeechStarted(120), cfg) == 0


def test_config_from_openai_turn_detection():
    cfg = VadConfig.from_dict({"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                               "silence_duration_ms": 700, "create_response": True, "interrupt_response": False})
    assert cfg == VadConfig(threshold=0.6, prefix_padding_ms=200, silence_duration_ms=700)
    assert VadConfig.from_dict({"type": "server_vad"}) == VadConfig(0.5, 300, 500)
    assert VadConfig.from_dict({"threshold": None, "silence_duration_ms": 300.0}) == VadConfig(0.5, 300, 300)
    assert VadConfig.from_dict({"threshold": 1}).threshold == 1.0


@pytest.mark.parametrize("d,match", [
    ({"threshold": "0.5"}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"silence_duration_ms": -1}, "silence_duration_ms"),
    ({"silence_duration_ms": 2.5}, "silence_duration_ms"),
    ({"silence_duration_ms": "500"}, "silence_duration_ms"),
    ({"prefix_padding_ms": 10**6}, "prefix_padding_ms"),
    ({"prefix_padding_ms": False}, "prefix_padding_ms"),
    ({"type": "semantic_vad"}, "type"),
    ([], "object"),
])
def test_config_rejects_bad_values(d, match):
    with pytest.raises(ValueError, match=match):
        VadConfig.from_dict(d)


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="sample_rate"):
        TurnDetector(VadConfig(), sample_rate=100)
    with pytest.raises(ValueError, match="threshold"):
        TurnDetector(VadConfig(threshold=2.0))
    det = TurnDetector(VadConfig())
    with pytest.raises(ValueError, match="int16"):
        det.push(np.zeros(480, np.int16))
    with pytest.raises(ValueError, match="mono"):
        det.push(np.zeros((2, 480), np.float32))
    assert det.push(np.zeros(0, np.float32)) == []


def test_other_sample_rates_give_the_same_turns():
    for sr in (16000, 48000):
        x = np.concatenate([silence(1.0, sr), speechlike(2.0, sample_rate=sr, seed=0), silence(1.0, sr)])
        events = _push(TurnDetector(VadConfig(), sample_rate=sr), x, chunk=sr // 50)
        assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
        assert abs(events[0].audio_start_ms - 1000) <= 100 and abs(events[1].audio_end_ms - 3000) <= 100


def test_reset_drops_speech_in_progress_and_keeps_the_clock():
    det = TurnDetector(VadConfig())
    assert [type(e) for e in _push(det, np.concatenate([silence(0.5), speechlike(1.0, seed=1)]))] == [SpeechStarted]
    det.reset()
    assert not det.in_speech
    events = _push(det, np.concatenate([silence(1.0), speechlike(1.5, seed=2), silence(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert abs(events[0].audio_start_ms - 2500) <= 100 and abs(events[1].audio_end_ms - 4000) <= 100


def test_interleaved_detectors_equal_each_alone():
    a, _ = _turns(0)
    b = np.concatenate([speechlike(2.0, seed=5), silence(2.0), speechlike(1.0, seed=6), silence(3.0)])
    alone_a, alone_b = _push(TurnDetector(VadConfig()), a), _push(TurnDetector(VadConfig()), b)
    da, db = TurnDetector(VadConfig()), TurnDetector(VadConfig())
    ea, eb = [], []
    for i in range(0, max(len(a), len(b)), 480):
        ea += da.push(a[i : i + 480])
        eb += db.push(b[i : i + 480])
    assert ea == alone_a and eb == alone_b and alone_a != alone_b


def test_detectors_on_different_threads_equal_each_alone():
    clips = [_turns(s)[0] for s in (0, 1, 2)]
    alone = [_push(TurnDetector(VadConfig()), x) for x in clips]
    results = [None] * len(clips)

    def run(k):
        results[k] = _push(TurnDetector(VadConfig()), clips[k], chunk=960)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_cpu_cost_is_a_few_percent_of_a_core():
    assert torch.get_num_threads() >= 1           # (conftest runs torch with 2 threads: the VAD must not care)
    x = speechlike(10.0, seed=3)
    det = TurnDetector(VadConfig())
    t = time.process_time()
    _push(det, x, chunk=480)                                     # 20 ms pushes, as a live client sends
    per_second = (time.process_time() - t) / 10.0
    print(f"VAD CPU per second of audio: {per_second * 1000:.1f} ms")
    assert per_second < 0.05
