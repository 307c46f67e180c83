"""Vision encoder and image/video preprocessing vs the reference (transformers' Qwen2.5-Omni) on tiny checkpoints.

Encoder: fp32 max abs diff <= 1e-4 against `ref.thinker.model.visual` (window + full attention, several images,
videos with t > 1, another window/merge geometry). Preprocessing: pixel_values and grid_thw against the saved
processor's image/video processors (torch's uint8 antialiased bicubic on both sides, so exact), for odd sizes,
alpha, greyscale, EXIF rotation, per-request caps; plus the error paths (decompression bomb, bad data).
"""

import copy
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from omnivox.encoders.images import (ImageProcessorConfig, VisionInput, decode_image, preprocess_frames,
                                     preprocess_image, preprocess_images, smart_resize)
from omnivox.encoders.vision import VisionEncoder, VisionEncoderConfig, tokens_per_item

TOL = 1e-4
_CACHE: dict = {}


@pytest.fixture
def tiny(tiny_checkpoint):
    """(path, reference model, our VisionEncoder with the checkpoint's weights, ImageProcessorConfig, processor)."""
    if "base" not in _CACHE:
        from transformers import Qwen2_5OmniProcessor

        path, ref = tiny_checkpoint("base")
        vcfg = VisionEncoderConfig.from_dict(json.loads((path / "config.json").read_text())
                                             ["thinker_config"]["vision_config"])
        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update({k[len("thinker.visual."):]: v for k, v in load_file(str(f)).items()
                       if k.startswith("thinker.visual.")})
        enc = VisionEncoder(vcfg).eval()
        enc.load_state_dict(sd, strict=True)
        proc = Qwen2_5OmniProcessor.from_pretrained(str(path))
        icfg = ImageProcessorConfig.from_dir(path)
        icfg.check_matches(vcfg)
        _CACHE["base"] = (path, ref, enc, icfg, proc)
    return _CACHE["base"]


def noise(h, w, seed=0, channels=3):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(h, w):
    """A photo-like image: gradients and a disc (resampling differences show on noise, not on this)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    b = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2, 220, 30).astype(np.uint8)
    return np.stack([r, g, b], -1)


def encoded(data: np.ndarray | Image.Image, fmt: str, **save) -> bytes:
    img = Image.fromarray(data) if isinstance(data, np.ndarray) else data
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def assert_same(ours: VisionInput, ref: dict, key="pixel_values", grid_key="image_grid_thw"):
    assert ours.grid_thw.tolist() == ref[grid_key].tolist()
    assert ours.pixel_values.shape == ref[key].shape
    assert (ours.pixel_values - ref[key]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Encoder


def test_encoder_state_dict_keys_equal_checkpoint_keys(tiny):
    path, _, enc, _, _ = tiny
    keys = set()
    for f in sorted(path.glob("*.safetensors")):
        keys |= {k[len("thinker.visual."):] for k in load_file(str(f)) if k.startswith("thinker.visual.")}
    assert set(enc.state_dict()) == keys


@pytest.mark.parametrize("grids", [
    [[1, 8, 12]],                          # one image, window layer + full layer
    [[1, 10, 6], [1, 20, 14]],             # two images of different sizes, edge windows
    [[3, 12, 16]],                         # a video grid with t > 1
    [[2, 16, 16], [1, 4, 4], [1, 34, 6]],  # video + images mixed in one call
], ids=["one_image", "two_images", "video", "mixed"])
def test_encoder_matches_reference(tiny, grids):
    _, ref, enc, _, _ = tiny
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(len(grids))
    pixels = torch.randn(int(grid.prod(-1).sum()), enc.cfg.patch_dim, generator=g)
    with torch.no_grad():
        want = ref.thinker.model.visual(pixels, grid_thw=grid).pooler_output
        got = enc.encode(pixels, grid)                                # CPU: loop over segments
        batched = enc.encode(pixels, grid, batched_attention=True)    # the GPU path: one SDPA per segment length
    assert got.shape == (sum(tokens_per_item(grid, 2)), enc.cfg.out_hidden_size)
    assert want.std() > 1e-2  # not a degenerate comparison
    assert (got - want).abs().max().item() <= TOL
    assert (batched - want).abs().max().item() <= TOL


def test_encoder_matches_reference_on_preprocessed_images(tiny):
    _, ref, enc, icfg, _ = tiny
    x = preprocess_images([smooth(90, 130), noise(50, 40, seed=3)], icfg)
    with torch.no_grad():
        want = ref.thinker.model.get_image_features(x.pixel_values, x.grid_thw).pooler_output
        got = enc.encode(x.pixel_values, x.grid_thw)
    assert (got - torch.cat(want)).abs().max().item() <= TOL


def test_encoder_matches_reference_with_other_geometry():
    """Small windows (2×2 merged tokens), two full-attention layers, another activation and rope theta."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    torch.manual_seed(5)
    rcfg = Qwen2_5OmniVisionEncoderConfig(depth=3, hidden_size=48, intermediate_size=40, num_heads=3,
                                          out_hidden_size=24, fullatt_block_indexes=[0, 2], window_size=56,
                                          hidden_act="gelu_pytorch_tanh",
                                          rope_parameters={"rope_type": "axial", "rope_theta": 500.0})
    ref = Qwen2_5OmniVisionEncoder(rcfg).eval()
    cfg = VisionEncoderConfig.from_dict(rcfg.to_dict())
    assert (cfg.window_size, cfg.rope_theta, cfg.fullatt_block_indexes) == (56, 500.0, (0, 2))
    enc = VisionEncoder(cfg).eval()
    enc.load_state_dict(ref.state_dict(), strict=True)
    grid = torch.tensor([[2, 10, 14], [1, 6, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim)
    with torch.no_grad():
        want = ref(pixels, grid_thw=grid).pooler_output
        for batched in (False, True):
            assert (enc.encode(pixels, grid, batched) - want).abs().max().item() <= TOL


def test_encoder_bf16_is_close_to_fp32(tiny):
    _, _, enc, _, _ = tiny
    grid = torch.tensor([[1, 8, 12]])
    pixels = torch.randn(96, enc.cfg.patch_dim)
    with torch.no_grad():
        full = enc.encode(pixels, grid)
        half = VisionEncoder(enc.cfg).to(torch.bfloat16)
        half.load_state_dict(enc.state_dict())
        low = half.encode(pixels, grid).float()
    assert low.dtype == torch.float32 and (low - full).abs().max() <= 0.05 * full.abs().max()


def test_encoder_rejects_bad_grids(tiny):
    enc = tiny[2]
    with pytest.raises(ValueError, match="patch rows"):
        enc.encode(torch.zeros(10, enc.cfg.patch_dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="divisible"):
        enc.encode(torch.zeros(15, enc.cfg.patch_dim), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match="shape"):
        enc.encode(torch.zeros(16, 7), torch.tensor([[1, 4, 4]]))


def test_vision_config_reads_official_v4_dict():
    d = json.loads(open("/work/shared/configs/qwen2.5-omni-7b.config.json").read())["thinker_config"]["vision_config"]
    cfg = VisionEncoderConfig.from_dict(d)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.out_hidden_size) == (32, 1280, 16, 3584)
    assert cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.rope_theta == 10000.0


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing


@pytest.mark.parametrize("w,h", [(37, 53), (300, 200), (640, 480), (5, 700)])
def test_image_preprocessing_matches_reference(tiny, w, h):
    _, _, _, icfg, proc = tiny
    for arr in (noise(h, w, seed=w), smooth(h, w)):
        ours = preprocess_image(arr, icfg)
        assert_same(ours, proc.image_processor(images=Image.fromarray(arr), return_tensors="pt"))


def test_image_per_request_pixel_caps_match_reference(tiny):
    _, _, _, icfg, proc = tiny
    arr = smooth(480, 640)
    for lo, hi in [(3136, 50000), (200000, 400000)]:
        ours = preprocess_image(arr, icfg, min_pixels=lo, max_pixels=hi)
        ref = proc.image_processor(images=Image.fromarray(arr), size={"shortest_edge": lo, "longest_edge": hi},
                                   return_tensors="pt")
        assert_same(ours, ref)
        assert lo <= int(ours.grid_thw[0, 1] * ours.grid_thw[0, 2]) * 14 * 14 <= hi


def test_png_with_alpha_is_composited_on_white_like_qwen_omni_utils(tiny):
    _, _, _, icfg, proc = tiny
    rgba = np.concatenate([smooth(60, 90), noise(60, 90, seed=9, channels=1)[..., None]], -1)
    data = encoded(rgba, "PNG")
    ours = preprocess_image(data, icfg)
    src = Image.open(io.BytesIO(data))
    white = Image.new("RGB", src.size, (255, 255, 255))  # qwen-omni-utils' to_rgb
    white.paste(src, mask=src.split()[3])
    assert_same(ours, proc.image_processor(images=white, return_tensors="pt"))


def test_greyscale_jpeg_matches_reference(tiny, tmp_path):
    _, _, _, icfg, proc = tiny
    f = tmp_path / "grey.jpg"
    Image.fromarray(smooth(77, 121)[..., 0]).save(f, "JPEG", quality=90)
    ours = preprocess_image(str(f), icfg)
    assert_same(ours, proc.image_processor(images=Image.open(f).convert("RGB"), return_tensors="pt"))


def test_exif_rotated_jpeg_is_turned_upright(tiny):
    _, _, _, icfg, proc = tiny
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = encoded(smooth(100, 180), "JPEG", exif=exif, quality=95)
    ours = preprocess_image(data, icfg)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert upright.size == (100, 180)
    assert_same(ours, proc.image_processor(images=upright, return_tensors="pt"))
    assert ours.grid_thw[0, 1] > ours.grid_thw[0, 2]  # taller than wide once upright


def test_transparent_grey_and_palette_images_become_white_where_transparent(tiny):
    icfg = tiny[3]
    la = Image.fromarray(np.stack([np.full((56, 56), 10, np.uint8), np.zeros((56, 56), np.uint8)], -1), "LA")
    pal = Image.new("P", (56, 56), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    for img in (la, pal):
        arr, _ = decode_image(encoded(img, "PNG"), min_pixels=icfg.min_pixels, max_pixels=icfg.max_pixels,
                              factor=icfg.factor)
        assert arr.shape == (56, 56, 3) and (arr == 255).all()


def test_bgr_arrays_and_pil_and_bytes_agree(tiny):
    icfg = tiny[3]
    arr = smooth(70, 50)
    want = preprocess_image(arr, icfg)
    for got in (preprocess_image(np.ascontiguousarray(arr[..., ::-1]), icfg, bgr=True),
                preprocess_image(Image.fromarray(arr), icfg), preprocess_image(encoded(arr, "PNG"), icfg)):
        assert torch.equal(got.pixel_values, want.pixel_values) and torch.equal(got.grid_thw, want.grid_thw)


def test_several_images_concatenate_in_order(tiny):
    icfg = tiny[3]
    a, b = preprocess_image(smooth(40, 60), icfg), preprocess_image(noise(90, 30), icfg)
    both = preprocess_images([smooth(40, 60), noise(90, 30)], icfg)
    assert torch.equal(both.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))
    assert both.grid_thw.tolist() == [a.grid_thw[0].tolist(), b.grid_thw[0].tolist()]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but holds no pixel data (enough for Pillow's size checks)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_huge_image_gives_clear_value_error(tiny):
    with pytest.raises(ValueError, match="too large to decode safely"):
        preprocess_image(_png_header_only(20000, 20000), tiny[3])


def test_large_jpeg_is_decoded_reduced_with_the_full_size_grid(tiny):
    icfg = tiny[3]
    data = encoded(smooth(1800, 2400), "JPEG", quality=95)
    target = smart_resize(1800, 2400, icfg.factor, icfg.min_pixels, 200_000)
    arr, got_target = decode_image(data, min_pixels=icfg.min_pixels, max_pixels=200_000, factor=icfg.factor,
                                   max_decode_pixels=1_000_000)
    assert got_target == target and target[0] <= arr.shape[0] < 1800 and target[1] <= arr.shape[1] < 2400
    reduced = preprocess_image(data, icfg, max_pixels=200_000, max_decode_pixels=1_000_000)
    full = preprocess_image(data, icfg, max_pixels=200_000)
    assert reduced.grid_thw.tolist() == full.grid_thw.tolist() == [[1, target[0] // 14, target[1] // 14]]
    assert (reduced.pixel_values - full.pixel_values).abs().mean() < 0.05


def test_bad_image_inputs_raise_value_error(tiny):
    icfg = tiny[3]
    with pytest.raises(ValueError, match="cannot decode"):
        preprocess_image(b"not an image at all", icfg)
    with pytest.raises(ValueError, match="cannot decode"):
        preprocess_image(encoded(smooth(64, 64), "JPEG")[:200], icfg)
    with pytest.raises(ValueError, match="does not exist"):
        preprocess_image("/nonexistent/picture.png", icfg)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8), icfg)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((30, 30, 3), np.float32), icfg)


def test_processor_config_reads_official_flat_preprocessor_config(tmp_path):
    flat = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
            "image_processor_type": "Qwen2VLImageProcessor", "feature_size": 128, "sampling_rate": 16000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(flat))
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean, cfg.resample) == (3136, 12845056, (0.1, 0.2, 0.3), 3)
    with pytest.raises(ValueError, match="preprocessor_config"):
        ImageProcessorConfig.from_dir(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# Video frames


@pytest.mark.parametrize("t,h,w", [(5, 50, 70), (4, 400, 600), (1, 100, 100)])
def test_video_frames_match_reference(tiny, t, h, w):
    _, _, _, icfg, proc = tiny
    frames = np.random.default_rng(t).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    for cap in (True, False):
        ref = proc.video_processor(videos=[frames], size=size, cap_pixels_per_frame=cap, return_tensors="pt")
        ours = preprocess_frames(frames, icfg, total_pixels="default" if cap else None, fps=2.0)
        assert_same(ours, ref, "pixel_values_videos", "video_grid_thw")
        assert ours.grid_thw[0, 0] == (t + 1) // 2 and ours.second_per_grid.tolist() == [1.0]


def test_video_per_frame_cap_matches_reference_when_it_binds(tiny):
    _, _, _, icfg, proc = tiny
    frames = np.random.default_rng(1).integers(0, 256, (6, 300, 400, 3), dtype=np.uint8)
    video_processor = copy.deepcopy(proc.video_processor)
    video_processor.max_video_tokens = 60  # read from the instance, not from call arguments
    ref = video_processor(videos=[frames], size={"shortest_edge": 3136, "longest_edge": 768 * 784},
                          cap_pixels_per_frame=True, return_tensors="pt")
    ours = preprocess_frames(frames, icfg, min_pixels=3136, total_pixels=int(60 * 28 * 28 * 0.9))
    assert_same(ours, ref, "pixel_values_videos", "video_grid_thw")
    uncapped = preprocess_frames(frames, icfg, min_pixels=3136, total_pixels=None)
    assert ours.grid_thw[0].prod() < uncapped.grid_thw[0].prod()


def test_video_defaults_match_the_omni_processor(tiny):
    _, _, _, icfg, proc = tiny
    frames = np.random.default_rng(2).integers(0, 256, (4, 50, 70, 3), dtype=np.uint8)
    ref = proc(text=["<|vision_bos|><|VIDEO|><|vision_eos|>"], videos=[frames], return_tensors="pt")
    ours = preprocess_frames(frames, icfg, total_pixels=None, fps=2.0)
    assert_same(ours, ref, "pixel_values_videos", "video_grid_thw")
    assert ours.second_per_grid.tolist() == ref["video_second_per_grid"].tolist()


def test_video_frames_from_lists_and_bgr_agree(tiny):
    icfg = tiny[3]
    frames = np.random.default_rng(3).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    want = preprocess_frames(frames, icfg)
    for got in (preprocess_frames(list(frames), icfg), preprocess_frames(torch.from_numpy(frames), icfg),
                preprocess_frames(np.ascontiguousarray(frames[..., ::-1]), icfg, bgr=True)):
        assert torch.equal(got.pixel_values, want.pixel_values)


def test_bad_video_frames_raise_value_error(tiny):
    icfg = tiny[3]
    with pytest.raises(ValueError, match="same shape"):
        preprocess_frames([np.zeros((10, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8)], icfg)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((2, 10, 10, 3), np.float32), icfg)
    with pytest.raises(ValueError, match="at least one"):
        preprocess_frames([], icfg)
    with pytest.raises(ValueError, match="fps"):
        preprocess_frames(np.zeros((2, 28, 28, 3), np.uint8), icfg, fps=0)
