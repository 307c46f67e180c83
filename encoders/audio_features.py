"""Audio in: file/array loading, Whisper-style log-mel features, and their streaming form.

The features equal `WhisperFeatureExtractor` as the Qwen2.5-Omni processor calls it (padding="max_length" to
`chunk_length` seconds, attention mask -> L = ceil(len / hop) frames), without allocating the padded window:

- The reference pads the audio with `padding_value` (0) to `n_samples` BEFORE a centered STFT, so frames near
  the end see padding (not a reflection of the audio) and only the far end of the padded window is reflected.
  We gather exactly those samples for the frames we need (`_frame_samples`).
- The dynamic-range clamp `max(x, max - 8)` takes its max over the WHOLE padded window. Frames that see only
  padding have one constant value: with padding 0 their power is 0, clamped to 1e-10, so log10 = -10, the
  smallest value any frame can have -- they never raise the max. The frames just after the L masked ones still
  see real samples (up to n_fft/2 of them) and do count towards the max, so we compute them for the max only.
- Audio longer than `chunk_length` seconds (the reference truncates it) is treated as if the window were the
  next multiple of `chunk_length`: the same math, one max over the whole file.

Streaming (`MelStreamState`, `mel_push`, `mel_finish`): a frame is computed once the n_fft/2 samples after its
centre have arrived (a 2 s window is complete 40 samples, 2.5 ms, after its end); frames are clamped and emitted per encoder
window. The clamp needs the global max, which a stream cannot know in advance: we clamp with the running max at
emission time, and the clamp is active in ordinary audio (noise and high bins sit > 80 dB under the loudest
bin), so a later louder frame does change earlier windows. `mel_finish` sets `clamp_error`, the exact max
|streamed - one-shot| feature difference (0.0 when the max was reached before each affected window was emitted),
and with `keep_history` `mel_revisions` gives the exact one-shot features of the changed windows:
max(max(raw, f), F) == max(raw, F) for the emission floor f <= the final floor F.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TARGET_SR = 16000          # Hz, what the model hears
MEL_FMAX_HZ = 8000.0       # top of the filterbank: the Whisper extractor fixes it, it is not sr / 2
POWER_FLOOR = 1e-10        # mel power floor before log10 (so log10 >= -10)
DYNAMIC_RANGE = 8.0        # log10 units kept below the max (80 dB)
BLOCK_FRAMES = 3000        # frames per STFT block in the one-shot path (30 s at a 10 ms hop)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FeatureConfig:
    """The Whisper feature extractor's numbers (defaults are WhisperFeatureExtractor's)."""
    feature_size: int = 80          # mel bins
    sampling_rate: int = 16000      # Hz
    hop_length: int = 160           # samples between frames (10 ms)
    n_fft: int = 400                # window / FFT size (25 ms)
    chunk_length: int = 30          # seconds the reference pads to (Qwen2.5-Omni: 300)
    padding_value: float = 0.0      # value of the padding samples
    dither: float = 0.0             # the reference adds random noise when > 0; we never dither

    @property
    def n_samples(self) -> int:     # the reference's padded length
        return self.chunk_length * self.sampling_rate

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        fe = d.get("feature_extractor", d)
        if not isinstance(fe, dict):
            raise ValueError("feature extractor config must be a dict")
        kind = fe.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise ValueError(f"unsupported feature extractor {kind!r} (expected WhisperFeatureExtractor)")
        cfg = cls(
            feature_size=int(fe.get("feature_size", 80)),
            sampling_rate=int(fe.get("sampling_rate", 16000)),
            hop_length=int(fe.get("hop_length", 160)),
            n_fft=int(fe.get("n_fft", 400)),
            chunk_length=int(fe.get("chunk_length", 30)),
            padding_value=float(fe.get("padding_value", 0.0)),
            dither=float(fe.get("dither", 0.0)),
        )
        if cfg.hop_length <= 0 or cfg.n_fft < 2 or cfg.feature_size <= 0 or cfg.chunk_length <= 0:
            raise ValueError(f"bad feature extractor numbers: {cfg}")
        if cfg.n_samples % cfg.hop_length:
            raise ValueError(f"chunk_length * sampling_rate ({cfg.n_samples}) must be a multiple of hop_length")
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "FeatureConfig":
        """Read `processor_config.json` (transformers 5: a `feature_extractor` section) or the v4
        `preprocessor_config.json` (feature-extractor keys at the top level)."""
        path = Path(path)
        for name in ("processor_config.json", "preprocessor_config.json"):
            f = path / name
            if not f.is_file():
                continue
            d = json.loads(f.read_text())
            if isinstance(d.get("feature_extractor"), dict):
                return cls.from_dict(d["feature_extractor"])
            if "feature_size" in d or "feature_extractor_type" in d:
                return cls.from_dict(d)
        raise ValueError(f"{path} has no feature extractor config (processor_config.json / preprocessor_config.json)")


# ----------------------------------------------------------------------------------------------- mel math


def mel_filters(cfg: FeatureConfig) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters, (n_mels, n_fft // 2 + 1) float64 (librosa's math)."""

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        mel = 3.0 * f / 200.0                                   # linear below 1 kHz
        log = f >= 1000.0
        return np.where(log, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mel)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        f = 200.0 * m / 3.0
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), f)

    n_freq = cfg.n_fft // 2 + 1
    mel_pts = np.linspace(hz_to_mel(0.0), hz_to_mel(MEL_FMAX_HZ), cfg.feature_size + 2)
    hz_pts = mel_to_hz(mel_pts)                                 # (n_mels + 2,)
    fft_hz = np.linspace(0, cfg.sampling_rate // 2, n_freq)     # (n_freq,)
    slopes = hz_pts[None, :] - fft_hz[:, None]                  # (n_freq, n_mels + 2)
    diff = np.diff(hz_pts)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))                  # (n_freq, n_mels)
    fb *= 2.0 / (hz_pts[2:] - hz_pts[:-2])[None, :]             # slaney area normalisation
    return fb.T.copy()                                          # (n_mels, n_freq)


class MelTables:
    """Window and filterbank tensors for one FeatureConfig (computed once)."""

    def __init__(self, cfg: FeatureConfig):
        self.cfg = cfg
        self.window = torch.hann_window(cfg.n_fft)                             # periodic, like the reference
        self.filters = torch.from_numpy(mel_filters(cfg)).to(torch.float32)    # (n_mels, n_freq)

    def raw_log_mel(self, samples: np.ndarray) -> torch.Tensor:
        """log10 mel power of every full frame in `samples` (no centering, no clamp): (n_mels, k)."""
        x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        spec = torch.stft(x, self.cfg.n_fft, self.cfg.hop_length, window=self.window, center=False,
                          return_complex=True)                                 # (n_freq, k)
        power = (spec.abs() ** 2).contiguous()                                  # (n_freq, k)
        return torch.clamp(self.filters @ power, min=POWER_FLOOR).log10()       # (n_mels, k)


_TABLES: dict[FeatureConfig, MelTables] = {}


def mel_tables(cfg: FeatureConfig) -> MelTables:
    if cfg not in _TABLES:
        _TABLES[cfg] = MelTables(cfg)
    return _TABLES[cfg]


def padded_length(n: int, cfg: FeatureConfig) -> int:
    """Length the reference pads to: chunk_length seconds (we extend to the next multiple for longer audio)."""
    return cfg.n_samples * max(1, -(-n // cfg.n_samples))


def num_frames(n: int, cfg: FeatureConfig) -> int:
    """Mel frames the reference keeps for n samples (its attention mask): ceil(n / hop)."""
    return min(-(-n // cfg.hop_length), padded_length(n, cfg) // cfg.hop_length)


def _last_max_frame(n: int, cfg: FeatureConfig) -> int:
    """Index of the last frame that sees a real sample (counts towards the max); the reference drops its
    final STFT frame, so frames run to P // hop - 1."""
    return min(padded_length(n, cfg) // cfg.hop_length - 1, (n - 1 + cfg.n_fft // 2) // cfg.hop_length)


def _frame_samples(audio: np.ndarray, a0: int, n_total: int | None, j0: int, j1: int,
                   cfg: FeatureConfig) -> np.ndarray:
    """Samples under frames j0..j1-1 of the reference's centred STFT over the padded signal.

    `audio` holds samples [a0, a0 + len(audio)) of the stream. `n_total` is the number of real samples when the
    audio has ended (padding and the far-end reflection are then applied), None while streaming (every index
    asked for must then be a received sample). The left edge is a reflection of the (padded) signal.
    """
    half, hop = cfg.n_fft // 2, cfg.hop_length
    idx = np.arange(j0 * hop - half, (j1 - 1) * hop + half + (cfg.n_fft % 2), dtype=np.int64)
    idx = np.abs(idx)                                           # left reflection: x[-i] = x[i]
    if n_total is not None:
        p = padded_length(n_total, cfg)
        idx = np.where(idx >= p, 2 * p - 2 - idx, idx)          # right reflection at the padded end
        real = idx < n_total
        out = np.full(idx.shape, cfg.padding_value, dtype=np.float32)
        out[real] = audio[idx[real] - a0]
        return out
    return audio[idx - a0]


def _padding_frame_max(cfg: FeatureConfig) -> float:
    """log-mel max of a frame that sees only padding (-10 for zero padding)."""
    return float(mel_tables(cfg).raw_log_mel(np.full(cfg.n_fft, cfg.padding_value, np.float32)).max())


def _has_padding_only_frame(n: int, cfg: FeatureConfig) -> bool:
    return _last_max_frame(n, cfg) < padded_length(n, cfg) // cfg.hop_length - 1


def _normalise(raw: torch.Tensor, gmax: float) -> torch.Tensor:
    return (torch.maximum(raw, torch.tensor(gmax - DYNAMIC_RANGE, dtype=raw.dtype)) + 4.0) / 4.0


def as_mono_float(audio, what: str = "audio") -> np.ndarray:
    """1-D float32 numpy view of `audio` (numpy or torch); ValueError for anything else."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"{what} must be 1-D mono samples, got shape {audio.shape} (load_audio mixes down)")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{what} must be float samples in [-1, 1], got dtype {audio.dtype} "
                         "(pcm16_to_float converts 16-bit PCM)")
    audio = audio.astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise ValueError(f"{what} contains NaN or infinite samples")
    return audio


def pcm16_to_float(pcm: bytes | np.ndarray) -> np.ndarray:
    """Little-endian 16-bit PCM (bytes or int16 array) -> float32 in [-1, 1)."""
    x = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else np.asarray(pcm)
    if x.dtype != np.int16:
        raise ValueError(f"pcm16 samples must be int16, got {x.dtype}")
    return x.astype(np.float32) / 32768.0


def log_mel(audio, cfg: FeatureConfig) -> torch.Tensor:
    """Reference log-mel features of one 16 kHz mono clip: (n_mels, L) float32, L = ceil(len / hop).

    Works in blocks of BLOCK_FRAMES frames, so memory is the output plus one block.
    """
    x = as_mono_float(audio)
    n = len(x)
    if n == 0:
        raise ValueError("audio is empty (zero samples)")
    tables = mel_tables(cfg)
    L = num_frames(n, cfg)
    last = _last_max_frame(n, cfg)
    out = torch.empty(cfg.feature_size, L)                                     # (n_mels, L)
    gmax = _padding_frame_max(cfg) if _has_padding_only_frame(n, cfg) else -math.inf
    for j0 in range(0, last + 1, BLOCK_FRAMES):
        j1 = min(j0 + BLOCK_FRAMES, last + 1)
        raw = tables.raw_log_mel(_frame_samples(x, 0, n, j0, j1, cfg))         # (n_mels, j1 - j0)
        gmax = max(gmax, float(raw.max()))
        if j0 < L:
            out[:, j0:min(j1, L)] = raw[:, :min(j1, L) - j0]
    return _normalise(out, gmax)


# ----------------------------------------------------------------------------------------------- streaming


@dataclass
class MelStreamState:
    """Streaming log-mel: keeps only the samples the next frames need and the frames of the open window."""
    cfg: FeatureConfig
    window_frames: int                       # frames per emitted window (the encoder's 2 * n_window)
    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))   # samples [buf_start, n_received)
    buf_start: int = 0
    n_received: int = 0
    next_frame: int = 0                      # first frame not computed yet
    pending: list = field(default_factory=list)    # raw (n_mels, k) blocks of the open window
    pending_frames: int = 0
    frames_emitted: int = 0
    running_max: float = -math.inf           # max raw log-mel over every frame computed so far
    min_kept: float = math.inf               # min over emitted frames of max(raw, floor used) (for clamp_error)
    finished: bool = False
    clamp_error: float = 0.0                 # after mel_finish: max |streamed - one-shot| feature difference
    keep_history: bool = False               # keep emitted windows so mel_revisions can correct them
    history: list = field(default_factory=list)    # [(features (n_mels, k), max(min raw, floor used))]


def new_mel_stream(cfg: FeatureConfig, window_frames: int, keep_history: bool = False) -> MelStreamState:
    """`keep_history` keeps every emitted window (4 * n_mels bytes per 10 ms: 51 KB/s at 128 bins) so that
    `mel_revisions` can give the exact one-shot features of windows the final clamp floor changes."""
    if window_frames <= 0:
        raise ValueError(f"window_frames must be positive, got {window_frames}")
    return MelStreamState(cfg=cfg, window_frames=window_frames, keep_history=keep_history)


def _take_pending(state: MelStreamState, k: int) -> torch.Tensor:
    """Remove and return the first k pending raw frames as one (n_mels, k) tensor."""
    allp = torch.cat(state.pending, dim=1) if len(state.pending) > 1 else state.pending[0]
    head, rest = allp[:, :k], allp[:, k:]
    state.pending = [rest] if rest.shape[1] else []
    state.pending_frames -= k
    return head


def _emit(state: MelStreamState, raw: torch.Tensor) -> torch.Tensor:
    floor = state.running_max - DYNAMIC_RANGE
    kept = max(float(raw.min()), floor) if raw.numel() else math.inf
    state.min_kept = min(state.min_kept, kept)
    state.frames_emitted += raw.shape[1]
    feats = _normalise(raw, state.running_max)
    if state.keep_history:
        state.history.append((feats, kept))
    return feats


def mel_push(state: MelStreamState, pcm) -> list[torch.Tensor]:
    """Feed 16 kHz mono float samples; returns the normalised (n_mels, window_frames) windows now complete."""
    if state.finished:
        raise ValueError("mel stream already finished")
    x = as_mono_float(pcm, "pcm chunk")
    cfg = state.cfg
    half, hop = cfg.n_fft // 2, cfg.hop_length
    state.buf = np.concatenate([state.buf, x]) if len(state.buf) else x.copy()
    state.n_received += len(x)
    # frame j needs samples up to j*hop + half - 1 (and x[half] for the left reflection of frame 0)
    end = (state.n_received - half - (cfg.n_fft % 2)) // hop + 1 if state.n_received > half else 0
    if end > state.next_frame:
        raw = mel_tables(cfg).raw_log_mel(
            _frame_samples(state.buf, state.buf_start, None, state.next_frame, end, cfg))   # (n_mels, k)
        state.running_max = max(state.running_max, float(raw.max()))
        state.pending.append(raw)
        state.pending_frames += raw.shape[1]
        state.next_frame = end
        keep_from = max(0, state.next_frame * hop - half)      # first sample a future frame can touch
        if keep_from > state.buf_start:
            state.buf = state.buf[keep_from - state.buf_start:].copy()
            state.buf_start = keep_from
    out = []
    while state.pending_frames >= state.window_frames:
        out.append(_emit(state, _take_pending(state, state.window_frames)))
    return out


def mel_finish(state: MelStreamState) -> torch.Tensor:
    """End of audio: returns the last (n_mels, <= window_frames) partial window (possibly 0 frames) and sets
    `clamp_error`, the exact max difference between the streamed features and `log_mel` of all the audio."""
    if state.finished:
        raise ValueError("mel stream already finished")
    cfg = state.cfg
    n = state.n_received
    if n == 0:
        raise ValueError("no audio was pushed (zero samples)")
    state.finished = True
    L = num_frames(n, cfg)
    last = _last_max_frame(n, cfg)
    if last >= state.next_frame:
        raw = mel_tables(cfg).raw_log_mel(
            _frame_samples(state.buf, state.buf_start, n, state.next_frame, last + 1, cfg))
        state.running_max = max(state.running_max, float(raw.max()))
        keep = max(0, L - state.next_frame)
        if keep:
            state.pending.append(raw[:, :keep])
            state.pending_frames += keep
    if _has_padding_only_frame(n, cfg):
        state.running_max = max(state.running_max, _padding_frame_max(cfg))
    state.buf = np.zeros(0, np.float32)
    tail = _take_pending(state, state.pending_frames) if state.pending_frames else torch.zeros(cfg.feature_size, 0)
    # windows emitted earlier used a floor <= the final one; a value differs only where it was below it:
    # one-shot max(raw, F) vs streamed max(raw, f), F >= f, differ by at most F - max(min raw, f)
    final_floor = state.running_max - DYNAMIC_RANGE
    state.clamp_error = max(0.0, final_floor - state.min_kept) / 4.0
    return _emit(state, tail)


def mel_revisions(state: MelStreamState) -> list[tuple[int, torch.Tensor]]:
    """After mel_finish (with keep_history): [(window index, exact one-shot features)] for every emitted window
    the final clamp floor changes. max(max(raw, f), F) == max(raw, F), so re-clamping the emitted features is
    exact; windows not listed were already exact."""
    if not state.finished:
        raise ValueError("mel_revisions needs a finished stream")
    if not state.keep_history:
        raise ValueError("mel_revisions needs a stream made with keep_history=True")
    final_floor = state.running_max - DYNAMIC_RANGE
    floor_feat = (torch.tensor(final_floor, dtype=torch.float32) + 4.0) / 4.0    # same float32 ops as _normalise
    return [(w, torch.maximum(feats, floor_feat)) for w, (feats, kept) in enumerate(state.history)
            if kept < final_floor]


# ----------------------------------------------------------------------------------------------- loading


def _mixdown(x: np.ndarray) -> np.ndarray:
    """(n,) or 2-D samples -> mono float32; the smaller axis of a 2-D array (<= 16) is taken as channels."""
    if x.ndim == 1:
        return x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"audio array must be 1-D or 2-D (samples, channels), got shape {x.shape}")
    ch_axis = 1 if x.shape[1] <= x.shape[0] else 0
    if x.shape[ch_axis] > 16:
        raise ValueError(f"cannot tell channels from samples in an array of shape {x.shape}")
    return x.astype(np.float32, copy=False).mean(axis=ch_axis, dtype=np.float32)


def resample(x: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """soxr 'HQ' resampling trimmed/padded to ceil(n * target / sr) samples: librosa.load's default
    (res_type="soxr_hq", fix=True), so the result is the same as librosa's."""
    if sr == target_sr:
        return x
    import soxr

    n_out = int(math.ceil(len(x) * target_sr / sr))
    y = soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    if len(y) >= n_out:
        return y[:n_out]
    return np.concatenate([y, np.zeros(n_out - len(y), np.float32)])


def _read_soundfile(path: str) -> tuple[np.ndarray, int] | None:
    """(samples (n, ch) float32, sr) via libsndfile, or None when libsndfile cannot open the file."""
    import soundfile as sf

    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    return x, int(sr)


def _read_av(path: str) -> tuple[np.ndarray, int]:
    """(samples (ch, n) float32, sr) of the first audio stream via PyAV (mp3, m4a, video tracks, ...)."""
    import av

    parts, sr, has_stream = [], None, False
    try:
        with av.open(path) as container:
            if container.streams.audio:
                has_stream = True
                to_float = av.AudioResampler(format="fltp")      # keep layout and rate, planar float
                for frame in container.decode(container.streams.audio[0]):
                    sr = sr or frame.sample_rate
                    parts += [f.to_ndarray() for f in to_float.resample(frame)]     # (ch, k) each
                parts += [f.to_ndarray() for f in to_float.resample(None)]
    except (av.FFmpegError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot decode audio file {path} (unreadable or truncated): {e}") from None
    if not has_stream:
        raise ValueError(f"{path}: no audio stream")
    if not parts or sr is None:
        raise ValueError(f"{path}: the audio stream holds no samples (zero-length audio)")
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False), int(sr)


def _check_wav_complete(path: str) -> None:
    """libsndfile reads a cut-off WAV without complaint; compare the data chunk's declared size with the file."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            tag, n = struct.unpack("<4sI", f.read(8))
            if tag == b"data":
                if n not in (0, 0xFFFFFFFF) and pos + 8 + n > size:   # 0 / -1: size left open by a streaming writer
                    raise ValueError(f"{path} is truncated: its data chunk declares {n} bytes, "
                                     f"{size - pos - 8} are present")
                return
            pos += 8 + n + (n & 1)


def load_audio(source, sr: int | None = None, target_sr: int = TARGET_SR) -> np.ndarray:
    """Mono float32 audio at `target_sr` from a file path or an array.

    Files: soundfile (wav/flac/ogg/...) first, PyAV (mp3/m4a/video) otherwise; channels are averaged and the
    result resampled like librosa.load(path, sr=16000). Arrays: `sr` is their rate (default target_sr), 2-D
    arrays are (samples, channels) or (channels, samples). ValueError for unreadable, empty or bad input.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"no such audio file: {path}")
        got = _read_soundfile(path)
        if got is not None:
            _check_wav_complete(path)
            x, rate = got[0], got[1]                              # (n, ch)
        else:
            x, rate = _read_av(path)                              # (ch, n)
            x = x.T
        mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        what = path
    else:
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        arr = np.asarray(source)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"audio array must be float samples, got dtype {arr.dtype}")
        mono, rate, what = _mixdown(arr), int(sr or target_sr), "audio array"
    if sr is not None and isinstance(source, (str, os.PathLike)) and int(sr) != rate:
        raise ValueError(f"{what} is sampled at {rate} Hz, not the {sr} Hz given")
    if len(mono) == 0:
        raise ValueError(f"{what} holds no samples (zero-length audio)")
    if not np.isfinite(mono).all():
        raise ValueError(f"{what} contains NaN or infinite samples")
    if rate <= 0:
        raise ValueError(f"bad sampling rate {rate}")
    return np.ascontiguousarray(resample(mono, rate, target_sr))
