"""Tiny media files written in tests: wav (soundfile), png/jpeg (Pillow), mp4 with or without audio (PyAV).

Video frames encode their own index: frame i is a flat grey of level `index_level(i)`, so a decoded frame's
index is `decoded_index(frame)` even after lossy compression.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

LEVEL_STEP = 4      # grey levels between consecutive frame indices (frames 0..63 fit in 0..252)


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(n,) or (n, channels) float32: a sine plus a little noise, louder in the middle."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    env = 0.3 + 0.5 * np.sin(np.pi * t / max(seconds, 1e-3))
    x = env * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(n)
    x = (0.5 * x).astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1)


def write_wav(path: Path, seconds: float, sr: int = 16000, channels: int = 1, freq: float = 440.0,
              seed: int = 0) -> Path:
    import soundfile as sf

    sf.write(str(path), tone(seconds, sr, freq, channels, seed), sr)
    return path


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A smooth colour gradient with noise (so resizing has something to do); format from the suffix."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(str(path))
    return path


def index_level(i: int) -> int:
    return (i * LEVEL_STEP) % 256


def decoded_index(frame: np.ndarray) -> int:
    return int(round(float(frame.mean()) / LEVEL_STEP))


def write_video(path: Path, frames: int, fps: int = 10, width: int = 66, height: int = 50,
                audio_sr: int | None = None, audio_channels: int = 2, codec: str = "libx264",
                faststart: bool = False) -> Path:
    """An mp4 whose frame i is flat grey index_level(i); with audio_sr, an AAC track as long as the video.

    faststart: index (moov) before the data, so a cut-off file still opens and shows fewer frames than declared.
    """
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        v = out.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            v.options = {"crf": "0", "preset": "ultrafast"}
        a = None
        if audio_sr:
            a = out.add_stream("aac", rate=audio_sr)
            a.layout = "stereo" if audio_channels == 2 else "mono"
        for i in range(frames):
            img = np.full((height, width, 3), index_level(i), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in v.encode(frame):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        if a is not None:
            samples = tone(frames / fps, audio_sr, 330.0, audio_channels, seed=7)
            samples = samples.reshape(len(samples), -1).T                         # (ch, n)
            pts, block = 0, 1024
            for s in range(0, samples.shape[1], block):
                chunk = np.ascontiguousarray(samples[:, s:s + block])
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=a.layout.name)
                af.sample_rate, af.pts, af.time_base = audio_sr, pts, Fraction(1, audio_sr)
                pts += chunk.shape[1]
                for packet in a.encode(af):
                    out.mux(packet)
            for packet in a.encode():
                out.mux(packet)
    return path
