"""Video files -> sampled, resized RGB frames (and the audio track) for the vision encoder.

What is notable here:
- Frame sampling is the official preprocessing's (qwen-omni-utils `fetch_video` / `smart_nframes`): `fps` 2 by
  default, the count rounded to an even number, at least `min_frames` (4) and at most `max_frames` (768) and the
  number of frames in the file; indices = linspace(0, total - 1, n).round() in fp32 (torch, as the official code);
  the sampling rate actually obtained, n / total · video_fps, gives TMRoPE its `second_per_grid` = temporal
  patch / sample fps. A `nframes` option replaces the fps rule (rounded to even), as there.
- Memory: frames are decoded one by one (PyAV, threaded) and only the sampled ones are converted to RGB and
  resized at once to the per-frame target (`frame_target`, the size `preprocess_frames` would pick for the whole
  video, so the result is bit-identical to resizing all sampled frames afterwards). A 2-minute 1080p clip holds
  240 frames of at most 768 tokens' worth each, never the decoded stream. The frame count comes from demuxing
  packets (no decoding); if the decoder then yields fewer frames than packets, sampling is redone with the
  decoded count in a second pass.
- PyAV first, OpenCV (`cv2.VideoCapture`, grab/retrieve) when PyAV cannot open the file. Container rotation
  metadata is not applied (the official readers do not apply it either).
- `extract_audio`: the first audio stream, mixed to mono and resampled to 16 kHz like librosa (through
  `audio_features.load_audio`); a file without an audio track -> ValueError "video X has no audio track".
- `patch_batches` turns sampled frames into vision-encoder inputs a few temporal patches at a time: the vision
  encoder never attends across temporal patches, so encoding batch by batch equals one pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from omnivox.encoders.images import (VIDEO_MAX_TOKENS, VIDEO_MIN_TOKENS, ImageProcessorConfig,
                                     default_video_total_pixels, normalize, patchify, resize_frames, smart_resize,
                                     video_frame_max_pixels)

FPS = 2.0                  # frames sampled per second of video (the Qwen team asks to keep 2)
FPS_MIN_FRAMES = 4         # at least this many sampled frames
FPS_MAX_FRAMES = 768       # at most this many
FRAME_FACTOR = 2           # sampled counts are multiples of this (the temporal patch)
BATCH_PATCHES = 16384      # patch rows per vision-encoder batch in `patch_batches`


@dataclass(frozen=True)
class VideoSampling:
    """Per-request frame sampling options (qwen-omni-utils names and defaults)."""
    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    nframes: int | None = None              # a fixed count instead of the fps rule

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"video fps must be positive, got {self.fps}")
        if self.min_frames < 1 or self.max_frames < 1:
            raise ValueError(f"video min_frames/max_frames must be >= 1, got {self.min_frames}/{self.max_frames}")
        if self.nframes is not None and self.nframes < 1:
            raise ValueError(f"video nframes must be >= 1, got {self.nframes}")


@dataclass(frozen=True)
class VideoInfo:
    path: str
    total_frames: int        # frames in the stream (demuxed packets, or OpenCV's count)
    fps: float               # average frame rate of the stream
    width: int
    height: int
    backend: str             # "av" or "cv2"


@dataclass
class SampledVideo:
    frames: np.ndarray       # (T, h, w, 3) uint8 RGB, resized to the per-frame target
    indices: list[int]       # source frame index of each sampled frame
    sample_fps: float        # frames per second of video actually sampled: T / total_frames · video_fps
    info: VideoInfo

    def second_per_grid(self, cfg: ImageProcessorConfig) -> float:
        return cfg.temporal_patch_size / self.sample_fps


# ----------------------------------------------------------------------------------------------------------------
# Sampling and geometry


def _round_by(x: float, k: int) -> int:
    return round(x / k) * k


def sample_frame_count(total_frames: int, video_fps: float, sampling: VideoSampling = VideoSampling()) -> int:
    """How many frames to sample (qwen-omni-utils `smart_nframes`); a 1-frame video gives 1 (padded later)."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    if sampling.nframes is not None:
        n = _round_by(sampling.nframes, FRAME_FACTOR)
    else:
        if not video_fps > 0:
            raise ValueError(f"the video reports a frame rate of {video_fps}")
        lo = math.ceil(sampling.min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(sampling.max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * sampling.fps
        n = _round_by(min(max(n, lo), hi), FRAME_FACTOR)
    return max(1, min(n, total_frames))


def sample_indices(total_frames: int, n: int) -> list[int]:
    """linspace(0, total - 1, n).round() in fp32, as the official readers index frames."""
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def pixel_limits(cfg: ImageProcessorConfig, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """Per-frame [min, max] pixels: the request's, else VIDEO_MIN_TOKENS / VIDEO_MAX_TOKENS merged tokens' worth."""
    lo = VIDEO_MIN_TOKENS * cfg.factor ** 2 if min_pixels is None else int(min_pixels)
    hi = VIDEO_MAX_TOKENS * cfg.factor ** 2 if max_pixels is None else int(max_pixels)
    if lo < 1 or hi < lo:
        raise ValueError(f"video pixel limits [{lo}, {hi}] are not a range")
    return lo, hi


def frame_target(height: int, width: int, num_frames: int, cfg: ImageProcessorConfig, *,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 total_pixels: int | None | str = "default") -> tuple[int, int]:
    """(h, w) every frame is resized to: what `preprocess_frames` picks for `num_frames` frames of this size."""
    lo, hi = pixel_limits(cfg, min_pixels, max_pixels)
    total = default_video_total_pixels(cfg) if total_pixels == "default" else total_pixels
    hi = video_frame_max_pixels(num_frames, cfg, lo, hi, total)
    return smart_resize(height, width, cfg.factor, lo, hi)


def _resize_one(rgb: np.ndarray, target: tuple[int, int], cfg: ImageProcessorConfig) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]      # (1, 3, H, W) uint8
    return resize_frames(x, target, cfg.resample)[0].permute(1, 2, 0)         # (h, w, 3) uint8


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"a video must be a file path or a frames array, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"video file {path} does not exist")
    return path


def _av_probe(path: str) -> VideoInfo:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        declared = stream.frames                     # the container's frame count (0: not stored)
        n = sum(1 for packet in container.demux(stream) if packet.size > 0)
        width, height = stream.codec_context.width, stream.codec_context.height
    if n == 0:
        raise ValueError(f"video {path} holds no frames")
    if 0 < n < declared:
        raise ValueError(f"video {path} is truncated: its header lists {declared} frames, {n} are present")
    return VideoInfo(path, n, float(rate) if rate else 0.0, width, height, "av")


def _av_frames(path: str, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for the wanted indices, decoding frame by frame; then (-1 - decoded count, None)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = max(wanted)
        i = -1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                yield i, frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        yield -2 - i, None


def _cv2():
    # OpenCV's FFmpeg backend logs demuxer errors ("moov atom not found") straight to stderr; we report them
    # as ValueError instead. The level is read when the first capture opens, so setting it here is in time.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2

    return cv2


def _cv2_probe(path: str) -> VideoInfo:
    cv2 = _cv2()

    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path} (PyAV and OpenCV both failed)")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if n <= 0:
        raise ValueError(f"video {path} holds no frames (or OpenCV cannot count them)")
    return VideoInfo(path, n, fps, w, h, "cv2")


def _cv2_frames(path: str, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    cv2 = _cv2()

    cap = cv2.VideoCapture(path)
    last, i = max(wanted), -1
    try:
        while i < last:
            if not cap.grab():
                break
            i += 1
            if i in wanted:
                ok, bgr = cap.retrieve()
                if not ok:
                    break
                yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    yield -2 - i, None


def probe_video(path) -> VideoInfo:
    """Frame count, frame rate and size of a video file (PyAV, else OpenCV); ValueError names the file."""
    path = _check_path(path)
    import av

    try:
        return _av_probe(path)
    except (av.FFmpegError, OSError, EOFError, UnicodeDecodeError) as e:
        av_error = e
    try:
        return _cv2_probe(path)
    except ValueError:
        raise ValueError(f"cannot read video {path} (unreadable or truncated): {av_error}") from None


def _collect(info: VideoInfo, indices: list[int], target: tuple[int, int], cfg: ImageProcessorConfig):
    """-> (frames (T, h, w, 3) uint8, decoded frame count or None when decoding reached every index)."""
    import av

    reader = _av_frames if info.backend == "av" else _cv2_frames
    out = np.empty((len(indices), target[0], target[1], 3), dtype=np.uint8)
    slots: dict[int, list[int]] = {}
    for k, idx in enumerate(indices):
        slots.setdefault(idx, []).append(k)
    filled, decoded = 0, None
    try:
        for idx, rgb in reader(info.path, set(slots)):
            if rgb is None:
                decoded = -2 - idx + 1
                break
            if rgb.shape[:2] != (info.height, info.width):
                raise ValueError(f"video {info.path} changes frame size mid-stream "
                                 f"({info.width}x{info.height} -> {rgb.shape[1]}x{rgb.shape[0]})")
            small = _resize_one(rgb, target, cfg).numpy()
            for k in slots[idx]:
                out[k] = small
                filled += 1
    except (av.FFmpegError, OSError, EOFError) as e:
        raise ValueError(f"cannot decode video {info.path} (unreadable or truncated): {e}") from None
    return out, (None if filled == len(indices) else decoded)


def read_video(path, cfg: ImageProcessorConfig, sampling: VideoSampling = VideoSampling(), *,
               min_pixels: int | None = None, max_pixels: int | None = None,
               total_pixels: int | None | str = "default") -> SampledVideo:
    """Sample frames from a video file the official way and resize them to the per-frame target.

    Pixel options as in `preprocess_frames`. ValueError (naming the file) for missing, unreadable, truncated or
    frameless videos.
    """
    info = probe_video(path)
    total = info.total_frames
    for _ in range(2):
        n = sample_frame_count(total, info.fps, sampling)
        indices = sample_indices(total, n)
        target = frame_target(info.height, info.width, n, cfg, min_pixels=min_pixels, max_pixels=max_pixels,
                              total_pixels=total_pixels)
        frames, decoded = _collect(info, indices, target, cfg)
        if decoded is None:
            return SampledVideo(frames, indices, n / max(total, 1e-6) * info.fps, info)
        if decoded < 1:
            break
        total = decoded  # fewer decodable frames than packets: sample again over what decodes
    raise ValueError(f"cannot decode video {info.path}: only {max(decoded, 0)} of {info.total_frames} frames "
                     "decode (truncated or corrupt)")


def has_audio_track(path) -> bool:
    path = _check_path(path)
    import av

    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video {path} (unreadable or truncated): {e}") from None


def extract_audio(path) -> np.ndarray:
    """The video's first audio track as float32 16 kHz mono; ValueError when there is none or it is empty."""
    from omnivox.encoders.audio_features import load_audio

    path = _check_path(path)
    if not has_audio_track(path):
        raise ValueError(f"video {path} has no audio track")
    try:
        return load_audio(path)
    except ValueError as e:
        raise ValueError(f"video {path}: cannot use its audio track: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Frames -> vision-encoder batches


def frames_tensor(frames) -> Tensor:
    """(T, H, W, 3) uint8 RGB from an array, tensor or list of (H, W, 3) arrays / PIL images."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("a video needs at least one frame")
        arrs = [np.asarray(f) for f in frames]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"video frames must all have the same shape, got {sorted(shapes)}")
        frames = np.stack(arrs)
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError("video frames must be uint8 (T, H, W, 3) RGB with T >= 1 "
                         f"(got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))})")
    return x


def patch_batches(frames: Tensor, target: tuple[int, int], cfg: ImageProcessorConfig,
                  max_patches: int = BATCH_PATCHES) -> Iterator[tuple[Tensor, Tensor]]:
    """(T, H, W, 3) uint8 frames -> (pixel_values (N, C·Tp·P·P), grid_thw (1, 3)) a few temporal patches at a time.

    Every batch but the last holds an even share of whole temporal patches; the last pads its frame count to
    the temporal patch by repeating the last frame, as `preprocess_frames` does for the whole video.
    """
    tp = cfg.temporal_patch_size
    per_step = (target[0] // cfg.patch_size) * (target[1] // cfg.patch_size)
    steps = max(1, max_patches // max(per_step, 1))
    for f0 in range(0, frames.shape[0], steps * tp):
        x = frames[f0:f0 + steps * tp].permute(0, 3, 1, 2)                      # (t, 3, H, W) uint8
        x = normalize(resize_frames(x.contiguous(), target, cfg.resample), cfg)  # (t, 3, h, w) fp32
        rows, grid = patchify(x, cfg)
        yield rows, torch.tensor([grid], dtype=torch.long)
