"""Helpers for the headless-Chromium tests of the browser pages: fake capture files and a Chromium launcher.

Chromium's fake devices read a WAV (`--use-file-for-fake-audio-capture=<wav>%noloop`, played once, silence after)
and a Y4M video (`--use-file-for-fake-video-capture=<y4m>`, looped). The WAV holds speech-like audio from
tests/speechlike.py between stretches of silence so the server's VAD sees one turn; the Y4M is a few frames of
moving colour bars in 4:2:0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from speechlike import silence, speechlike, write_wav

CHROMIUM = "/usr/bin/chromium"


def write_turn_wav(path, speech_s: float = 2.0, before_s: float = 0.7, after_s: float = 2.5,
                   sample_rate: int = 48000) -> Path:
    """Mono 16-bit WAV: silence, one speech-like burst, silence."""
    x = np.concatenate([silence(before_s, sample_rate), 0.6 * speechlike(speech_s, sample_rate, seed=1),
                        silence(after_s, sample_rate)])
    return write_wav(path, x, sample_rate)


def write_y4m(path, width: int = 320, height: int = 240, frames: int = 8, fps: int = 10) -> Path:
    """YUV4MPEG2 4:2:0 file of colour bars that shift by a bar each frame."""
    bars = np.array([  # BT.601 YCbCr of white, yellow, cyan, green, magenta, red, blue, black
        (235, 128, 128), (210, 16, 146), (170, 166, 16), (145, 54, 34),
        (106, 202, 222), (81, 90, 240), (41, 240, 110), (16, 128, 128)], dtype=np.uint8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        cols = np.arange(width) * len(bars) // width
        for k in range(frames):
            row = bars[(cols + k) % len(bars)]                         # (W, 3)
            ycc = np.broadcast_to(row, (height, width, 3))              # (H, W, 3)
            f.write(b"FRAME\n")
            f.write(np.ascontiguousarray(ycc[:, :, 0]).tobytes())
            f.write(np.ascontiguousarray(ycc[::2, ::2, 1]).tobytes())   # Cb at half resolution
            f.write(np.ascontiguousarray(ycc[::2, ::2, 2]).tobytes())   # Cr
    return path


def chromium_args(wav: Path, y4m: Path | None = None) -> list[str]:
    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-gpu",
        "--mute-audio",
    ]
    if y4m is not None:
        args.append(f"--use-file-for-fake-video-capture={y4m}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return args
