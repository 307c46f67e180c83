"""Audio in: features and encoder against the reference, streaming == one-shot, file loading and bad input."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from omnivox.encoders.audio import (AudioEncoder, AudioEncoderConfig, AudioEncoderSession, FeatureConfig,
                                    load_audio, log_mel, num_audio_tokens)
from omnivox.encoders.audio_features import mel_finish, mel_push, new_mel_stream, pcm16_to_float

SR = 16000
TOL = 1e-4


def synth(seconds: float, seed: int = 0, sr: int = SR, channels: int = 1) -> np.ndarray:
    """Deterministic sines + noise; (n,) or (n, channels)."""
    g = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    chans = []
    for c in range(channels):
        x = 0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.1 * np.sin(2 * np.pi * 1870 * t + c)
        x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t)) + 0.03 * g.standard_normal(n)
        chans.append(x)
    x = np.stack(chans, axis=1) if channels > 1 else chans[0]
    return x.astype(np.float32)


def synth_loud_start(seconds: float, seed: int = 0) -> np.ndarray:
    """synth() with a loud broadband burst at 0.1-0.3 s, so the first window already holds the global max."""
    x = synth(seconds, seed)
    burst = np.random.default_rng(seed + 100).standard_normal(3200).astype(np.float32)
    x[1600:4800] += 0.5 * burst
    return x


def quiet_then_loud(quiet_s: float, loud_s: float, seed: int = 0) -> np.ndarray:
    """Digital silence, then faint noise, then synth(): the floor rises after the first windows are out."""
    n = int(quiet_s * SR)
    quiet = np.zeros(n, np.float32)
    quiet[n // 2:] = 1e-5 * np.random.default_rng(seed).standard_normal(n - n // 2)
    return np.concatenate([quiet, synth(loud_s, seed=seed)])


def load_encoder(ckpt_dir) -> AudioEncoder:
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    enc = AudioEncoder(AudioEncoderConfig.from_dict(cfg["thinker_config"]["audio_config"])).eval()
    prefix = "thinker.audio_tower."
    sd = {k[len(prefix):]: v for k, v in load_file(str(ckpt_dir / "model.safetensors")).items()
          if k.startswith(prefix)}
    enc.load_state_dict(sd, strict=True)
    return enc


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    path, ref = tiny_checkpoint("base")
    return path, ref, load_encoder(path), FeatureConfig.from_dir(path)


@pytest.fixture(scope="module")
def processor(base):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(str(base[0]))


def reference_features(processor, audio):
    out = processor.feature_extractor(audio, sampling_rate=SR, padding="max_length", return_attention_mask=True)
    mask = out["attention_mask"][0].astype(bool)
    return out["input_features"][0][:, mask]


# ----------------------------------------------------------------------------------------------- features


def test_feature_config_reads_v5_processor_config_and_v4_preprocessor_config(base, tmp_path):
    cfg = base[3]
    assert (cfg.feature_size, cfg.hop_length, cfg.n_fft, cfg.sampling_rate, cfg.chunk_length) == (128, 160, 400,
                                                                                                  16000, 300)
    v4 = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "hop_length": 160,
          "n_fft": 400, "sampling_rate": 16000, "chunk_length": 30, "image_mean": [0.5], "merge_size": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(v4))
    assert FeatureConfig.from_dir(tmp_path) == FeatureConfig(feature_size=80, chunk_length=30)
    with pytest.raises(ValueError, match="no feature extractor config"):
        FeatureConfig.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("seconds", [0.7, 2.0, 4.37, 9.1, 1.23456, 0.005])
def test_log_mel_matches_reference_extractor_as_processor_calls_it(base, processor, seconds):
    audio = synth(seconds, seed=1)
    ref = reference_features(processor, audio)
    ours = log_mel(audio, base[3]).numpy()
    assert ours.shape == ref.shape == (128, math.ceil(len(audio) / 160))
    assert np.abs(ours - ref).max() <= TOL


def test_log_mel_dynamic_range_clamp_uses_frames_past_the_mask(base, processor):
    # near-silence then a click in the last samples: the global max sits in a frame after the L masked ones,
    # and the 80 dB floor clamps most bins
    g = np.random.default_rng(3)
    for n in (16000, 16159):
        audio = (1e-6 * g.standard_normal(n)).astype(np.float32)
        audio[:4000] = 0.0
        audio[-1] = 1.0
        ref = reference_features(processor, audio)
        ours = log_mel(audio, base[3]).numpy()
        assert (ref == ref.min()).mean() > 0.5            # the clamp is active
        assert np.abs(ours - ref).max() <= TOL


def test_log_mel_longer_than_chunk_length_is_the_next_multiple_window():
    from transformers import WhisperFeatureExtractor

    audio = synth(2.5, seed=4)
    ours = log_mel(audio, FeatureConfig(feature_size=128, chunk_length=1)).numpy()
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=3, return_attention_mask=True)
    out = fe(audio, sampling_rate=SR, padding="max_length", return_attention_mask=True)
    ref = out["input_features"][0][:, out["attention_mask"][0].astype(bool)]
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_log_mel_rejects_bad_input(base):
    cfg = base[3]
    with pytest.raises(ValueError, match="empty"):
        log_mel(np.zeros(0, np.float32), cfg)
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 1000), np.float32), cfg)
    with pytest.raises(ValueError, match="float"):
        log_mel(np.zeros(1000, np.int16), cfg)
    with pytest.raises(ValueError, match="NaN"):
        log_mel(np.full(1000, np.nan, np.float32), cfg)
    assert np.allclose(pcm16_to_float(np.array([-32768, 0, 16384], np.int16).tobytes()), [-1.0, 0.0, 0.5])


# ----------------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("variant", ["base", "mha_wide"])
def test_encoder_state_dict_keys_equal_checkpoint_keys(tiny_checkpoint, variant):
    path, _ = tiny_checkpoint(variant)
    enc = load_encoder(path)     # strict load
    saved = {k for k in load_file(str(path / "model.safetensors")) if k.startswith("thinker.audio_tower.")}
    assert {"thinker.audio_tower." + k for k in enc.state_dict()} == saved


@pytest.fixture(scope="module")
def clip_batch(processor):
    """Four clips and the reference processor's batched features for them."""
    clips = [synth(s, seed=i) for i, s in enumerate([0.7, 2.0, 4.37, 9.1])]
    out = processor.feature_extractor(clips, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                                      return_tensors="pt")
    return clips, out


@pytest.mark.parametrize("variant", ["base", "mha_wide"])
def test_encoder_matches_reference_get_audio_features(tiny_checkpoint, clip_batch, variant):
    path, ref = tiny_checkpoint(variant)
    enc, cfg = load_encoder(path), FeatureConfig.from_dir(path)
    clips, out = clip_batch
    with torch.no_grad():
        want = ref.thinker.model.get_audio_features(out["input_features"],
                                                    feature_attention_mask=out["attention_mask"]).last_hidden_state
    got = [enc.encode(log_mel(c, cfg)) for c in clips]
    lens = out["attention_mask"].sum(-1).tolist()
    assert [g.shape[0] for g in got] == [num_audio_tokens(n) for n in lens]
    assert (torch.cat(got) - want).abs().max().item() <= TOL


def test_encoder_with_odd_n_window_pools_across_windows_like_reference():
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    d = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
             output_dim=24, n_window=7, max_source_positions=30)
    torch.manual_seed(0)
    ref = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**d)).eval()
    enc = AudioEncoder(AudioEncoderConfig.from_dict(d)).eval()
    enc.load_state_dict(ref.state_dict(), strict=True)
    feats = torch.randn(128, 73)
    with torch.no_grad():
        want = ref(feats, feature_lens=torch.tensor([73])).last_hidden_state
    got = enc.encode(feats, window_batch=2)
    assert got.shape == want.shape == (num_audio_tokens(73), 24)
    assert (got - want).abs().max().item() <= TOL
    # streaming carries the odd row across windows; revisions re-encode everything
    cfg = FeatureConfig(feature_size=128, chunk_length=300)
    for audio, revise in ((synth_loud_start(1.03, seed=14), False), (quiet_then_loud(0.4, 0.63, seed=14), True)):
        one = enc.encode(log_mel(audio, cfg))
        got, state = stream(enc, cfg, audio, 555, revise=revise)
        assert (state.clamp_error > 0) == revise
        assert got.shape == one.shape and (got - one).abs().max().item() <= TOL


def test_encoder_rejects_bad_features(base):
    enc = base[2]
    with pytest.raises(ValueError, match="n_mels"):
        enc.encode(torch.zeros(80, 100))
    with pytest.raises(ValueError, match="zero frames"):
        enc.encode(torch.zeros(128, 0))
    with pytest.raises(ValueError, match="divisible"):
        AudioEncoderConfig.from_dict({"d_model": 30, "encoder_attention_heads": 4})


# ----------------------------------------------------------------------------------------------- streaming


def stream(enc, cfg, audio, chunk, revise=False):
    session = AudioEncoderSession(enc, cfg, keep_history=revise)
    outs = []
    for i in range(0, len(audio), chunk):
        outs += session.push(audio[i:i + chunk])
    outs.append(session.finish())
    got = torch.cat(outs)
    if revise:
        for start, tokens in session.revisions():
            got[start:start + tokens.shape[0]] = tokens
    return got, session.state


@pytest.mark.parametrize("chunk", [320, 1600, 16000, 777, 12345])
def test_streaming_equals_one_shot(base, chunk):
    # the loudest moment is in the first window, so every window is clamped with the final floor
    _, _, enc, cfg = base
    audio = synth_loud_start(6.37, seed=5)
    one = enc.encode(log_mel(audio, cfg))
    got, state = stream(enc, cfg, audio, chunk)
    assert state.clamp_error == 0.0
    assert got.shape == one.shape
    assert (got - one).abs().max().item() <= TOL


@pytest.mark.parametrize("chunk", [320, 777])
def test_streaming_with_revisions_equals_one_shot_when_the_max_rises_later(base, chunk):
    # plain synth: noise keeps nudging the running max up, so early windows were clamped a little low
    _, _, enc, cfg = base
    audio = synth(6.37, seed=5)
    one = enc.encode(log_mel(audio, cfg))
    got, state = stream(enc, cfg, audio, chunk, revise=True)
    assert state.clamp_error > 0.0
    assert (got - one).abs().max().item() <= TOL


def test_streaming_short_clips_equal_one_shot(base):
    _, _, enc, cfg = base
    for n in (150, 201, 1000, 3300):
        audio = synth(n / SR, seed=n)
        one = enc.encode(log_mel(audio, cfg))
        got, _ = stream(enc, cfg, audio, 64)
        assert got.shape == one.shape
        if one.numel():
            assert (got - one).abs().max().item() <= TOL


def test_streaming_emits_each_window_once_its_last_frame_is_computable(base):
    _, _, enc, cfg = base
    audio = synth(4.5, seed=6)
    session = AudioEncoderSession(enc, cfg)
    first = 2 * enc.cfg.n_window * 160 + 40           # last frame of window 1 ends n_fft/2 - hop samples later
    assert session.push(audio[:first - 1]) == []
    out = session.push(audio[first - 1:first])
    assert len(out) == 1 and out[0].shape[0] == enc.cfg.n_window // 2
    assert len(session.push(audio[first:2 * first - 40])) == 1


def test_streaming_memory_stays_bounded(base):
    _, _, enc, cfg = base
    session = AudioEncoderSession(enc, cfg)
    audio = synth(20.0, seed=7)
    for i in range(0, len(audio), 16000):
        session.push(audio[i:i + 16000])
        mel = session.state.mel
        assert len(mel.buf) <= cfg.n_fft + cfg.hop_length
        assert mel.pending_frames < enc.cfg.window_frames
    session.finish()


def test_streaming_clamp_error_is_exact_and_revisions_repair_a_louder_part_later(base):
    # digital silence + faint noise for 2.5 s, then loud: the first window was clamped with a lower floor
    _, _, enc, cfg = base
    audio = quiet_then_loud(2.5, 2.0, seed=8)
    state = new_mel_stream(cfg, 200)
    windows = []
    for i in range(0, len(audio), 3200):
        windows += mel_push(state, audio[i:i + 3200])
    windows.append(mel_finish(state))
    streamed = torch.cat(windows, dim=1)
    one = log_mel(audio, cfg)
    diff = (streamed - one).abs().max().item()
    assert state.clamp_error > 0.1
    assert abs(diff - state.clamp_error) <= 1e-5
    one_tokens = enc.encode(one)
    got, st = stream(enc, cfg, audio, 3200)
    assert (got - one_tokens).abs().max().item() > TOL          # without revisions the first window differs
    got, st = stream(enc, cfg, audio, 3200, revise=True)
    assert (got - one_tokens).abs().max().item() <= TOL
    # loud first, then quiet: the floor is known before the quiet part and streaming is exact
    audio = np.concatenate([synth_loud_start(2.5, seed=9), audio[:40000]])
    got, st = stream(enc, cfg, audio, 3200)
    assert st.clamp_error == 0.0
    assert (got - enc.encode(log_mel(audio, cfg))).abs().max().item() <= TOL


def test_streaming_rejects_push_after_finish_and_empty_streams(base):
    _, _, enc, cfg = base
    session = AudioEncoderSession(enc, cfg)
    with pytest.raises(ValueError, match="no audio"):
        session.finish()
    session = AudioEncoderSession(enc, cfg)
    session.push(synth(0.1))
    session.finish()
    with pytest.raises(ValueError, match="finished"):
        session.push(synth(0.1))


# ----------------------------------------------------------------------------------------------- loading


def test_load_audio_reads_wav_and_flac_at_16k(tmp_path):
    audio = synth(1.3, seed=10)
    sf.write(tmp_path / "a.wav", audio, SR, subtype="FLOAT")
    sf.write(tmp_path / "a.flac", audio, SR)
    assert np.array_equal(load_audio(tmp_path / "a.wav"), audio)
    flac = load_audio(str(tmp_path / "a.flac"))
    assert flac.dtype == np.float32 and flac.shape == audio.shape
    assert np.abs(flac - audio).max() < 1e-4               # 16-bit FLAC quantisation


def test_load_audio_mixes_stereo_and_resamples_44k_like_librosa(tmp_path):
    import librosa

    stereo = synth(1.7, seed=11, sr=44100, channels=2)
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="FLOAT")
    got = load_audio(tmp_path / "s.wav")
    want, _ = librosa.load(tmp_path / "s.wav", sr=SR, mono=True)
    assert got.shape == want.shape == (math.ceil(len(stereo) * SR / 44100),)
    assert np.abs(got - want).max() <= 1e-6
    # arrays: (samples, channels) or (channels, samples), with their rate
    assert np.abs(load_audio(stereo, sr=44100) - want).max() <= 1e-6
    assert np.abs(load_audio(stereo.T.copy(), sr=44100) - want).max() <= 1e-6


def test_load_audio_decodes_compressed_audio_with_pyav(tmp_path):
    import av

    sr = 22050
    x = synth(0.8, seed=12, sr=sr)
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=sr)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = sr
        for p in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(p)
    y = load_audio(path)
    want = load_audio(x, sr=sr)
    assert y.dtype == np.float32 and abs(len(y) - len(want)) < 0.1 * SR     # AAC adds priming samples
    # the tone survives: strong correlation at the best lag
    lags = range(0, len(y) - len(want) + 1)
    best = max(np.dot(y[k:k + len(want)], want) for k in lags) / (np.linalg.norm(want) ** 2)
    assert best > 0.8


def test_load_audio_rejects_bad_files_and_input(tmp_path):
    audio = synth(0.5, seed=13)
    sf.write(tmp_path / "ok.wav", audio, SR)
    raw = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "header.wav").write_bytes(raw[:30])
    (tmp_path / "junk.mp3").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "empty.flac").write_bytes(b"")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SR)
    sf.write(tmp_path / "a.flac", audio, SR)
    (tmp_path / "cut.flac").write_bytes((tmp_path / "a.flac").read_bytes()[:2000])
    for name in ("cut.wav", "header.wav", "junk.mp3", "empty.flac", "zero.wav", "cut.flac", "missing.wav"):
        with pytest.raises(ValueError):
            load_audio(tmp_path / name)
    with pytest.raises(ValueError, match="zero-length"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="float"):
        load_audio(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="44100"):
        load_audio(tmp_path / "ok.wav", sr=44100)
