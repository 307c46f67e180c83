"""Images and video frames -> the vision encoder's flat patch rows (`pixel_values`, `grid_thw`).

What is notable here:
- Numerically this is the reference `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` of transformers 5 (the
  ones a saved Qwen2.5-Omni processor loads): `smart_resize` to multiples of patch·merge (28 px) inside
  [min_pixels, max_pixels], antialiased bicubic resize of the uint8 image (torch's native uint8 kernel, the one
  torchvision calls on the CPU, so results are bit-identical), rescale+normalise fused as (x - 255·mean) /
  (255·std) in fp32, and the patch order (merge blocks, then C, T, P, P inside a row). An image is two identical
  frames (temporal patch 2).
- Decoding (Pillow): EXIF orientation is applied (the reference pipeline ignores it); RGBA is composited on
  white as qwen-omni-utils' `to_rgb` does; LA/PA and palette images with transparency are composited on white
  too (qwen-omni-utils would drop their alpha with `.convert("RGB")`); everything else uses `.convert("RGB")`.
  numpy input: (H, W, 3) uint8 RGB, or BGR (OpenCV) with `bgr=True`; (H, W) greyscale.
- Huge images: above `max_decode_pixels` a JPEG is decoded at a reduced DCT scale (Pillow `draft`) that stays at
  least as large as the resize target, and other formats are box-reduced by an integer factor before conversion;
  the token grid is always computed from the original size. Pillow's decompression-bomb guard (by default
  > 2 × 89.5 MP) becomes a ValueError.
- Videos: `preprocess_frames` takes frames already decoded and sampled (T, H, W, 3). The per-frame pixel cap is
  the one qwen-omni-utils and the reference processor's `cap_pixels_per_frame` apply: each frame gets at most an
  even share of a whole-video budget (`max_video_tokens` tokens' worth, 90 %), never less than 1.05 ·
  min_pixels. The frame count is padded to a multiple of the temporal patch by repeating the last frame.
  Default frame limits are the Omni processor's video defaults (128 to 768 tokens' worth per frame), which
  override the saved video processor's `size` in the reference too.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200                     # the reference rejects longer/shorter ratios
VIDEO_MIN_TOKENS = 128                     # Omni processor / qwen-omni-utils per-frame minimum (merged tokens)
VIDEO_MAX_TOKENS = 768                     # ... and maximum
DEFAULT_MAX_DECODE_PIXELS = 64_000_000     # above this a source image is decoded reduced (see module doc)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes the reference processor configs use


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The checkpoint's image/video preprocessing numbers; defaults are the reference processor class's."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3                      # PIL code: 3 bicubic, 2 bilinear
    max_video_tokens: int = 128000         # whole-video budget behind the per-frame cap

    @classmethod
    def from_dict(cls, image: dict, video: dict | None = None) -> "ImageProcessorConfig":
        """`image`: the `image_processor` section of processor_config.json, or the flat preprocessor_config.json."""
        size = image.get("size") or {}
        min_pixels = image.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", cls.min_pixels)))
        max_pixels = image.get("max_pixels", size.get("longest_edge", size.get("max_pixels", cls.max_pixels)))
        resample = int(image.get("resample", cls.resample))
        if resample not in _RESAMPLE:
            raise ValueError(f"image processor resample={resample} is not supported (only 2 bilinear, 3 bicubic)")
        mean = tuple(float(v) for v in image.get("image_mean", cls.image_mean))
        std = tuple(float(v) for v in image.get("image_std", cls.image_std))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean / image_std must have 3 values (RGB)")
        cfg = cls(patch_size=int(image.get("patch_size", cls.patch_size)),
                  temporal_patch_size=int(image.get("temporal_patch_size", cls.temporal_patch_size)),
                  merge_size=int(image.get("merge_size", cls.merge_size)),
                  min_pixels=int(min_pixels), max_pixels=int(max_pixels), image_mean=mean, image_std=std,
                  rescale_factor=float(image.get("rescale_factor", cls.rescale_factor)), resample=resample,
                  max_video_tokens=int((video or {}).get("max_video_tokens", cls.max_video_tokens)))
        if cfg.min_pixels < 1 or cfg.max_pixels < cfg.min_pixels:
            raise ValueError(f"image processor pixel limits [{cfg.min_pixels}, {cfg.max_pixels}] are not a range")
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        """Read preprocessor_config.json (official, transformers 4) or processor_config.json (transformers 5)."""
        path = Path(path)
        for name in ("preprocessor_config.json", "processor_config.json"):
            f = path / name
            if f.is_file():
                d = json.loads(f.read_text(encoding="utf-8"))
                if isinstance(d.get("image_processor"), dict):
                    return cls.from_dict(d["image_processor"], d.get("video_processor"))
                if "patch_size" in d or "image_mean" in d:
                    return cls.from_dict(d, d)
        raise ValueError(f"{path} has no preprocessor_config.json or processor_config.json with image settings")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (patch · merge = 28 px)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def check_matches(self, vision) -> None:
        """Raise if the preprocessing disagrees with a VisionEncoderConfig on patch geometry."""
        ours = (self.patch_size, self.temporal_patch_size, self.merge_size)
        theirs = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
        if ours != theirs:
            raise ValueError(f"preprocessor (patch, temporal patch, merge) {ours} != vision config {theirs}")


@dataclass
class VisionInput:
    """What the vision encoder eats, plus what TMRoPE needs for videos."""
    pixel_values: Tensor                  # (N, 3·T·P·P) fp32
    grid_thw: Tensor                      # (n, 3) long: patches per item along t, h, w
    second_per_grid: Tensor | None = None  # (n,) fp32 seconds per temporal grid step (videos)

    @staticmethod
    def cat(items: list["VisionInput"]) -> "VisionInput":
        if not items:
            raise ValueError("VisionInput.cat needs at least one item")
        spg = None
        if all(it.second_per_grid is not None for it in items):
            spg = torch.cat([it.second_per_grid for it in items])
        return VisionInput(torch.cat([it.pixel_values for it in items]), torch.cat([it.grid_thw for it in items]),
                           spg)


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(h, w) multiples of `factor`, pixel count inside [min_pixels, max_pixels], aspect ratio kept closely."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is above "
                         f"{MAX_ASPECT_RATIO}; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_frame_max_pixels(num_frames: int, cfg: ImageProcessorConfig, min_pixels: int, max_pixels: int,
                           total_pixels: int | None) -> int:
    """The per-frame cap: an even share (per temporal patch) of the video budget, floored at 1.05 · min_pixels."""
    if total_pixels is None:
        return max_pixels
    return max(min(max_pixels, total_pixels * cfg.temporal_patch_size // num_frames), int(min_pixels * 1.05))


def default_video_total_pixels(cfg: ImageProcessorConfig) -> int:
    return int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _open(source) -> Image.Image:
    """Lazily open a path / bytes / file object with Pillow; bad data and decompression bombs -> ValueError."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(source)))
        if isinstance(source, (str, os.PathLike)):
            if not Path(source).is_file():
                raise ValueError(f"image file {str(source)!r} does not exist")
            return Image.open(source)
        return Image.open(source)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large to decode safely ({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent images composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.getchannel("A"))
        return out
    return img.convert("RGB")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation."""
    w, h = img.size
    undecoded = bool(getattr(img, "tile", None))
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as e:
        # Some formats (PNG) decode the pixels to look for EXIF after them; a failure there leaves a blank image
        # that later reads as all zeros, so it is a decode error. Anything else is broken EXIF: ignored.
        if undecoded and not img.tile:
            raise ValueError(f"cannot decode image: {e}") from None
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_image(source, *, min_pixels: int, max_pixels: int, factor: int, bgr: bool = False,
                 max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """-> (RGB uint8 (H', W', 3), (target_h, target_w)); H'×W' may be smaller than the source when it is huge.

    source: path, bytes, file object, PIL image, or numpy (H, W, 3) uint8 (BGR with bgr=True) / (H, W).
    """
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image arrays must be (H, W, 3) or (H, W), got shape {arr.shape}")
        elif bgr:
            arr = arr[:, :, ::-1]
        h, w = arr.shape[:2]
        return np.ascontiguousarray(arr), smart_resize(h, w, factor, min_pixels, max_pixels)
    if bgr:
        raise ValueError("bgr=True applies to numpy arrays (OpenCV frames) only")

    img = source if isinstance(source, Image.Image) else _open(source)
    w, h = _oriented_size(img)
    target = smart_resize(h, w, factor, min_pixels, max_pixels)
    try:
        if w * h > max_decode_pixels and img.format == "JPEG":
            size = (target[1], target[0]) if img.size == (w, h) else (target[0], target[1])
            img.draft("RGB", size)  # decode at 1/2, 1/4 or 1/8 scale, still >= the target
        img = _to_rgb(ImageOps.exif_transpose(img))
        cur_w, cur_h = img.size
        if cur_w * cur_h > max_decode_pixels:
            k = min(cur_w // target[1], cur_h // target[0])
            if k >= 2:
                img = img.reduce(k)
        arr = np.array(img)  # writable copy (torch.from_numpy warns on read-only arrays)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large to decode safely ({e}); downscale it first") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot decode image: {e}") from None
    return arr, target


# ----------------------------------------------------------------------------------------------------------------
# Resize, normalise, patchify


def resize_frames(frames: Tensor, size: tuple[int, int], resample: int = 3) -> Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, h, w) uint8, antialiased, as the reference processor resizes on the CPU."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=list(size), mode=_RESAMPLE[resample], antialias=True, align_corners=False)


def normalize(frames: Tensor, cfg: ImageProcessorConfig) -> Tensor:
    """uint8 (T, 3, H, W) -> fp32, rescale and normalise fused the way the reference does."""
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)  # (3,)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)    # (3,)
    return (frames.float() - mean[:, None, None]) / std[:, None, None]


def patchify(frames: Tensor, cfg: ImageProcessorConfig) -> tuple[Tensor, tuple[int, int, int]]:
    """(T, C, H, W) float -> ((gt·gh·gw, C·Tp·P·P) rows in merge-block order, (gt, gh, gw)).

    T is padded to a multiple of the temporal patch by repeating the last frame.
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -frames.shape[0] % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, Tp, P, P)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_image(source, cfg: ImageProcessorConfig, *, min_pixels: int | None = None,
                     max_pixels: int | None = None, bgr: bool = False,
                     max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> VisionInput:
    """One image (path, bytes, file object, PIL image, numpy array) -> VisionInput with grid (1, gh, gw).

    min_pixels / max_pixels: per-request caps (default: the checkpoint's).
    """
    lo = cfg.min_pixels if min_pixels is None else int(min_pixels)
    hi = cfg.max_pixels if max_pixels is None else int(max_pixels)
    if lo < 1 or hi < lo:
        raise ValueError(f"pixel limits [{lo}, {hi}] are not a range")
    arr, target = decode_image(source, min_pixels=lo, max_pixels=hi, factor=cfg.factor, bgr=bgr,
                               max_decode_pixels=max_decode_pixels)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W) uint8
    x = normalize(resize_frames(x, target, cfg.resample), cfg)      # (1, 3, h, w) fp32
    x = x.expand(cfg.temporal_patch_size, -1, -1, -1)               # an image is Tp identical frames
    rows, grid = patchify(x, cfg)
    return VisionInput(rows, torch.tensor([grid], dtype=torch.long))


def preprocess_images(sources: list, cfg: ImageProcessorConfig, **options) -> VisionInput:
    """Several images -> one VisionInput (rows concatenated in order); options as in preprocess_image."""
    return VisionInput.cat([preprocess_image(s, cfg, **options) for s in sources])


def _frames_tensor(frames, bgr: bool) -> Tensor:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("a video needs at least one frame")
        shapes = {tuple(np.shape(f)) for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"video frames must all have the same shape, got {sorted(shapes)}")
        frames = np.stack([np.asarray(f) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError("video frames must be uint8 (T, H, W, 3) with T >= 1 "
                         f"(got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))})")
    if bgr:
        x = x.flip(-1)
    return x.permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


def preprocess_frames(frames, cfg: ImageProcessorConfig, *, min_pixels: int | None = None,
                      max_pixels: int | None = None, total_pixels: int | None | str = "default",
                      bgr: bool = False, fps: float | None = None) -> VisionInput:
    """Sampled video frames (T, H, W, 3) uint8 (array, tensor or list of arrays) -> VisionInput (1 video).

    min_pixels / max_pixels: per-frame limits (default VIDEO_MIN_TOKENS / VIDEO_MAX_TOKENS merged tokens' worth);
    total_pixels: whole-video budget behind the per-frame cap ("default": 90 % of max_video_tokens; None: no cap);
    fps: the sampling rate of `frames`; gives second_per_grid = temporal_patch / fps for TMRoPE (None: unset).
    """
    x = _frames_tensor(frames, bgr)                                  # (T, 3, H, W) uint8
    lo = VIDEO_MIN_TOKENS * cfg.factor ** 2 if min_pixels is None else int(min_pixels)
    hi = VIDEO_MAX_TOKENS * cfg.factor ** 2 if max_pixels is None else int(max_pixels)
    if lo < 1 or hi < lo:
        raise ValueError(f"pixel limits [{lo}, {hi}] are not a range")
    total = default_video_total_pixels(cfg) if total_pixels == "default" else total_pixels
    hi = video_frame_max_pixels(x.shape[0], cfg, lo, hi, total)
    target = smart_resize(x.shape[2], x.shape[3], cfg.factor, lo, hi)
    x = normalize(resize_frames(x, target, cfg.resample), cfg)      # (T, 3, h, w) fp32
    rows, grid = patchify(x, cfg)
    spg = None
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        spg = torch.tensor([cfg.temporal_patch_size / fps], dtype=torch.float32)
    return VisionInput(rows, torch.tensor([grid], dtype=torch.long), spg)
