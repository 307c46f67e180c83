"""A realtime session's input audio: 24 kHz PCM16 from the client -> one 16 kHz timeline for the encoder.

`InputTimeline` is the session's only audio buffer. Appends go through one streaming soxr resampler (its state
spans appends, so chunk boundaries leave no seams); positions are 16 kHz sample indices counted from the session's
first append, which is how VAD event times (session milliseconds) map onto samples. Only what is still needed is
kept: the current turn, or while nobody speaks a short lead-in for the next one (`trim_before`). A manual commit
`flush`es the resampler's delay and pads the 16 kHz timeline back into step with the 24 kHz one.
`audio_turn` is the engine-worker job that feeds a whole committed buffer into the conversation as one user item.
"""

from __future__ import annotations

import numpy as np
import soxr

from omnivox.streaming.pipeline import SAMPLE_RATE

ENCODER_RATE = 16000                 # the audio encoder's input rate (Whisper features)


class InputTimeline:
    """The session's input audio resampled to 16 kHz, indexed by 16 kHz sample since the first append; only the
    part still needed (the current turn, some lead-in) is kept."""

    def __init__(self):
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, ENCODER_RATE, 1, dtype="float32")
        self.chunks: list[np.ndarray] = []
        self.base = 0          # 16 kHz index of the first kept sample
        self.kept = 0          # samples kept
        self.in_samples = 0    # 24 kHz samples appended in the whole session

    @property
    def end(self) -> int:
        return self.base + self.kept

    def append(self, x24: np.ndarray) -> None:
        self.in_samples += len(x24)
        self._add(self.resampler.resample_chunk(x24))

    def flush(self) -> None:
        """Drain the resampler's delay (a manual commit: the last samples belong to this turn)."""
        self._add(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, ENCODER_RATE, 1, dtype="float32")
        # keep the 16 kHz timeline aligned with the 24 kHz one after the flush
        want = self.in_samples * ENCODER_RATE // SAMPLE_RATE
        if self.end < want:
            self._add(np.zeros(want - self.end, np.float32))

    def _add(self, y: np.ndarray) -> None:
        if len(y):
            self.chunks.append(np.asarray(y, np.float32))
            self.kept += len(y)

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.base), min(b, self.end)
        if b <= a:
            return np.zeros(0, np.float32)
        whole = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks = [whole]
        return whole[a - self.base:b - self.base].copy()

    def trim_before(self, idx: int) -> None:
        idx = min(max(idx, self.base), self.end)
        if idx == self.base:
            return
        whole = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        whole = whole[idx - self.base:]
        self.chunks = [whole] if len(whole) else []
        self.base, self.kept = idx, len(whole)

    def clear(self) -> None:
        self.trim_before(self.end)


def audio_turn(conv, item_id: str, samples: np.ndarray) -> None:
    conv.begin_audio(item_id)
    if len(samples):
        conv.push_audio(samples)
    conv.end_audio()
