"""Server-side turn detection (OpenAI `server_vad`) with Silero VAD, one explicit state per session.

The network is Silero VAD 6 (16 kHz branch), weights read from `silero_vad.jit` inside the installed `silero-vad`
wheel (the model `load_silero_vad()` returns; the wheel's `silero_vad_16k.safetensors` holds different, older
weights). `silero_step` re-implements its forward pass for one window in NumPy: the weights (`SileroWeights`) are
loaded once and shared by every session, and each `TurnDetector` owns only a small `SileroState` (LSTM h, c and the
64-sample context) instead of a TorchScript module that keeps its state inside. Probabilities match the package
model's on the same audio to ~1e-7 (tests/streaming/test_vad.py).
Why NumPy and not torch: the detector runs inline on the server's event-loop thread, beside the model worker. Tiny
torch ops there enter OpenMP/oneDNN parallel regions sized for the model (torch threads = cores) and spin against
the worker's threads: measured 7-8 ms of CPU per 32 ms window with 2 torch threads on a busy 2-core machine, against
0.18 ms for this NumPy step (its matrices are below OpenBLAS's threading thresholds), whatever torch's settings.
The wheel's package is never imported at runtime either: `import silero_vad` calls `torch.set_num_threads(1)` for
the whole process; we only locate its data file (torch.jit.load reads it once).

Silero scores 512-sample windows (32 ms) at 16 kHz, each preceded by the previous window's last 64 samples. Input
at any rate goes through a streaming soxr resampler (its output does not depend on chunking), so any chunking of
the same audio gives the same windows, probabilities and events as one push.

Turn semantics (as OpenAI's server_vad, with Silero's VADIterator hysteresis):
- speech starts at the first window with probability >= threshold: `SpeechStarted(audio_start_ms)` = that window's
  start. The server's user item includes `prefix_padding_ms` of audio before it: `item_start_ms(event, config)`.
- while in speech, a window with probability < threshold - 0.15 (floor 0.01; Silero's own off-threshold) begins a
  silence run; a window >= threshold ends it (windows in between neither start nor end a run). Once the run lasts
  silence_duration_ms, `SpeechStopped(audio_end_ms)` = the run's start less one window (END_LAG: the probability
  falls about 32 ms after the sound stops; never before the speech start). Measured on tests/speechlike.py turns
  (8 seeds, 16 turns of 1-6 s): start -9..+21 ms, end -34..+87 ms from the generated boundaries.
- the stop event is returned by the push that completes the silence run, i.e. silence_duration_ms (rounded up to
  whole 32 ms windows) after the run's start, plus the resampler's delay (<= ~35 ms at 24 kHz).
Times are ms since the first sample pushed into this detector (`reset()` keeps the clock, as the session's does).
Cost: about 0.2 ms of one core per 32 ms window, ~1% of a core per live session (tests/streaming/test_vad.py prints it).
A detector is used by one thread at a time; different detectors run safely on different threads (the shared
weights are read-only).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch

VAD_SAMPLE_RATE = 16000     # Silero's rate (Hz)
WINDOW = 512                # samples per scored window (32 ms)
CONTEXT = 64                # samples of the previous window prepended to each window
OFF_DELTA = 0.15            # off-threshold = threshold - OFF_DELTA (Silero's hysteresis)
END_LAG = WINDOW            # Silero's probability falls about one window after speech ends (16 kHz samples)
_N_FFT = 256
_HOP = 128
_HIDDEN = 128


# ---------------------------------------------------------------------------------------------------- config / events

@dataclass
class VadConfig:
    threshold: float = 0.5              # speech when Silero probability >= threshold
    prefix_padding_ms: int = 300        # audio kept before the detected start in the user item
    silence_duration_ms: int = 500      # silence that ends a turn

    @classmethod
    def from_dict(cls, d: dict) -> "VadConfig":
        """From an OpenAI `turn_detection` object ({"type": "server_vad", "threshold", ...}); absent or null keys
        keep the defaults. Other keys (create_response, interrupt_response, idle_timeout_ms) are the session's
        business and are ignored here."""
        if not isinstance(d, dict):
            raise ValueError(f"turn_detection must be an object, got {type(d).__name__}")
        kind = d.get("type", "server_vad")
        if kind != "server_vad":
            raise ValueError(f"turn_detection.type must be 'server_vad', got {kind!r}")
        cfg = cls()
        if d.get("threshold") is not None:
            t = d["threshold"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise ValueError(f"turn_detection.threshold must be a number in [0, 1], got {t!r}")
            cfg.threshold = float(t)
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            if d.get(name) is not None:
                v = d[name]
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000:
                    raise ValueError(f"turn_detection.{name} must be an integer in [0, 10000] ms, got {v!r}")
                setattr(cfg, name, v)
        return cfg

    @property
    def off_threshold(self) -> float:
        return max(self.threshold - OFF_DELTA, 0.01)


@dataclass
class SpeechStarted:
    audio_start_ms: int     # ms since the session's first appended sample


@dataclass
class SpeechStopped:
    audio_end_ms: int


def item_start_ms(event: SpeechStarted, config: VadConfig) -> int:
    """Where the user item's audio begins: prefix_padding_ms before the detected start (not before 0)."""
    return max(0, event.audio_start_ms - config.prefix_padding_ms)


# ---------------------------------------------------------------------------------------------------- the network

@dataclass
class SileroState:
    h: np.ndarray            # (128,) LSTM hidden
    c: np.ndarray            # (128,) LSTM cell
    context: np.ndarray      # (64,) last samples of the previous window

    @classmethod
    def zeros(cls) -> "SileroState":
        return cls(np.zeros(_HIDDEN, np.float32), np.zeros(_HIDDEN, np.float32), np.zeros(CONTEXT, np.float32))


@dataclass(frozen=True)
class _Conv:
    weight: np.ndarray       # (O, C*3) the (O, C, 3) kernel flattened to match the im2col rows
    bias: np.ndarray         # (O, 1)
    taps: np.ndarray         # (3, T_out) positions in the zero-padded input read by each tap for each output
    channels: int


@dataclass(frozen=True)
class SileroWeights:
    """Silero VAD 16 kHz as arrays: STFT magnitude (a fixed Fourier basis as a matrix) -> 4 convs (k=3, pad 1,
    strides 1, 2, 2, 1: 4 frames -> 1) with ReLU -> LSTM cell (128) -> ReLU -> 1x1 conv -> sigmoid."""
    stft_basis: np.ndarray   # (256, 258) real then imaginary parts of the 129-bin DFT
    frames: np.ndarray       # (4, 256) sample indices of the 4 STFT frames (hop 128) in the padded 640 samples
    convs: tuple[_Conv, ...]
    lstm_weight: np.ndarray  # (512, 256) [W_ih | W_hh], gate rows in torch's order i, f, g, o
    lstm_bias: np.ndarray    # (512,) b_ih + b_hh
    head_weight: np.ndarray  # (128,)
    head_bias: np.ndarray    # ()

    @classmethod
    def from_state_dict(cls, sd: dict) -> "SileroWeights":
        """From the TorchScript archive's 16 kHz keys, relative to `_model.` (tensors or arrays)."""
        def get(key):
            if key not in sd:
                raise ValueError(f"Silero VAD weights lack {key!r}")
            v = sd[key]
            return np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)

        basis = get("stft.forward_basis_buffer")                               # (258, 1, 256)
        if basis.shape != (_N_FFT + 2, 1, _N_FFT):
            raise ValueError(f"unexpected Silero STFT basis shape {basis.shape}")
        convs, t = [], (CONTEXT + WINDOW + CONTEXT - _N_FFT) // _HOP + 1         # 4 frames
        for i, stride in enumerate((1, 2, 2, 1)):
            w = get(f"encoder.{i}.reparam_conv.weight")                        # (O, C, 3)
            t_out = (t - 1) // stride + 1
            taps = np.arange(3)[:, None] + stride * np.arange(t_out)[None, :]   # (3, T_out)
            convs.append(_Conv(np.ascontiguousarray(w.reshape(w.shape[0], -1)),
                               get(f"encoder.{i}.reparam_conv.bias")[:, None], taps, w.shape[1]))
            t = t_out
        return cls(
            stft_basis=np.ascontiguousarray(basis[:, 0].T),
            frames=np.arange(_N_FFT)[None, :] + _HOP * np.arange(4)[:, None],
            convs=tuple(convs),
            lstm_weight=np.ascontiguousarray(np.concatenate([get("decoder.rnn.weight_ih"),
                                                             get("decoder.rnn.weight_hh")], axis=1)),
            lstm_bias=get("decoder.rnn.bias_ih") + get("decoder.rnn.bias_hh"),
            head_weight=get("decoder.decoder.2.weight")[0, :, 0].copy(),
            head_bias=get("decoder.decoder.2.bias")[0],
        )


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silero_step(w: SileroWeights, window: np.ndarray, state: SileroState) -> tuple[float, SileroState]:
    """One 512-sample float32 window at 16 kHz -> (speech probability, next state)."""
    if window.shape != (WINDOW,):
        raise ValueError(f"silero_step takes ({WINDOW},) windows, got {window.shape}")
    x = np.concatenate([state.context, window, window[-2:-CONTEXT - 2:-1]])   # (640,) reflect-padded right by 64
    s = x[w.frames] @ w.stft_basis                                             # (4, 258)
    half = _N_FFT // 2 + 1
    y = np.sqrt(s[:, :half] ** 2 + s[:, half:] ** 2).T                         # (129, 4) magnitude
    for conv in w.convs:                                                       # (C, T) -> (O, T_out)
        zero = np.zeros((conv.channels, 1), np.float32)
        cols = np.concatenate([zero, y, zero], axis=1)[:, conv.taps]          # (C, 3, T_out)
        y = conv.weight @ cols.reshape(conv.channels * 3, -1) + conv.bias      # (O, T_out)
        np.maximum(y, 0.0, out=y)
    g = w.lstm_weight @ np.concatenate([y[:, 0], state.h]) + w.lstm_bias       # (512,) gates i, f, g, o
    i, f, cand, o = _sigmoid(g[:128]), _sigmoid(g[128:256]), np.tanh(g[256:384]), _sigmoid(g[384:])
    c = f * state.c + i * cand                                                 # (128,)
    h = o * np.tanh(c)                                                         # (128,)
    p = _sigmoid(np.maximum(h, 0.0) @ w.head_weight + w.head_bias)             # ()
    return float(p), SileroState(h, c, window[-CONTEXT:].copy())


def silero_model_path() -> Path:
    """silero_vad.jit inside the installed silero-vad package (located without importing it)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise RuntimeError(f"Silero VAD model not found at {path}")
    return path


def load_silero_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The 16 kHz branch of the TorchScript archive (`_model.*`), keys relative to that prefix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # torch.jit.load's deprecation notice
        archive = torch.jit.load(str(path), map_location="cpu")
    prefix = "_model."
    return {k[len(prefix):]: v.detach().clone() for k, v in archive.state_dict().items() if k.startswith(prefix)}


_WEIGHTS: SileroWeights | None = None
_WEIGHTS_LOCK = threading.Lock()


def shared_weights() -> SileroWeights:
    """The process-wide Silero weights, loaded once (thread-safe); read-only afterwards."""
    global _WEIGHTS
    with _WEIGHTS_LOCK:
        if _WEIGHTS is None:
            _WEIGHTS = SileroWeights.from_state_dict(load_silero_state_dict(silero_model_path()))
        return _WEIGHTS


# ---------------------------------------------------------------------------------------------------- the detector

class TurnDetector:
    """Streaming server_vad for one session: push() float32 PCM at `sample_rate`, get SpeechStarted/SpeechStopped.
    `in_speech` and `last_probability` tell where the turn stands (e.g. for barge-in decisions)."""

    def __init__(self, config: VadConfig, sample_rate: int = 24000):
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 8000:
            raise ValueError(f"sample_rate must be an integer >= 8000 Hz, got {sample_rate!r}")
        if not 0.0 <= config.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {config.threshold}")
        if config.silence_duration_ms < 0 or config.prefix_padding_ms < 0:
            raise ValueError("silence_duration_ms and prefix_padding_ms must be >= 0")
        self.config = config
        self.sample_rate = sample_rate
        self.weights = shared_weights()
        self._samples_in = 0          # input samples pushed since creation (the clock)
        self.reset()

    def reset(self) -> None:
        """Forget the network state, buffered audio and any speech in progress; the clock keeps running, so later
        timestamps still count from the first sample ever pushed."""
        self.state = SileroState.zeros()
        self._resampler = (None if self.sample_rate == VAD_SAMPLE_RATE
                           else soxr.ResampleStream(self.sample_rate, VAD_SAMPLE_RATE, 1, dtype="float32"))
        self._pending = np.zeros(0, dtype=np.float32)      # 16 kHz samples not yet in a window
        # 16 kHz sample index (on the session clock) where the next window starts
        self._next16 = self._samples_in * VAD_SAMPLE_RATE // self.sample_rate
        self.in_speech = False
        self.last_probability = 0.0
        self._speech_start16 = 0
        self._silence_start16: int | None = None

    @property
    def audio_ms(self) -> int:
        """Session time scored so far (end of the last window), ms."""
        return self._next16 * 1000 // VAD_SAMPLE_RATE

    def push(self, pcm: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"push() takes mono audio (1-D), got shape {pcm.shape}")
        if not np.issubdtype(pcm.dtype, np.floating):
            raise ValueError(f"push() takes float PCM in [-1, 1], got {pcm.dtype} (convert int16 with / 32768)")
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        self._samples_in += len(pcm)
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = len(buf) // WINDOW
        self._pending = buf[n * WINDOW:].copy()
        events: list[SpeechStarted | SpeechStopped] = []
        for i in range(n):
            prob, self.state = silero_step(self.weights, buf[i * WINDOW : (i + 1) * WINDOW], self.state)
            event = self._advance(prob)
            if event is not None:
                events.append(event)
        return events

    def _advance(self, prob: float) -> SpeechStarted | SpeechStopped | None:
        """Advance the turn state by one scored window."""
        start16 = self._next16
        self._next16 += WINDOW
        self.last_probability = prob
        cfg = self.config
        if not self.in_speech:
            if prob >= cfg.threshold:
                self.in_speech = True
                self._speech_start16 = start16
                self._silence_start16 = None
                return SpeechStarted(start16 * 1000 // VAD_SAMPLE_RATE)
            return None
        if prob >= cfg.threshold:
            self._silence_start16 = None
        elif prob < cfg.off_threshold and self._silence_start16 is None:
            self._silence_start16 = start16
        if self._silence_start16 is not None:
            silent_ms = (self._next16 - self._silence_start16) * 1000 / VAD_SAMPLE_RATE
            if silent_ms >= cfg.silence_duration_ms:
                self.in_speech = False
                end = max(self._silence_start16 - END_LAG, self._speech_start16)
                self._silence_start16 = None
                return SpeechStopped(end * 1000 // VAD_SAMPLE_RATE)
        return None
