"""Encoder speed, ours vs the reference (`transformers`), same random weights, one timed run each, side by side.

    python benchmarks/encoders.py [--audio-layers 8] [--vision-layers 4] [--seconds 30] [--video-seconds 10]
    omnivox bench encoders ...

(a) Audio: `--seconds` of 16 kHz audio. Features: our `log_mel` vs `WhisperFeatureExtractor` as the
    `Qwen2_5OmniProcessor` calls it (padding="max_length" to 300 s, attention mask). Encoder: our
    `AudioEncoder.encode` vs the reference Thinker's `get_audio_features` (its `audio_tower`).
(b) Video: a generated `--video-seconds` clip, 640x360 at 25 fps (moving gradient, libx264), sampled at 2 fps.
    Preprocessing: ours = `read_video` (decode, sample, resize while decoding) + `patch_batches` (normalise,
    patchify); reference = transformers' `load_video` (PyAV backend, the same sampled indices) + the Omni
    processor's video processor. Encoder: our `VisionEncoder.encode` (batch by batch, as the prompt builder runs
    it) vs the reference Thinker's `get_video_features` (its `visual`).

Encoder sizes are the official 3B ones (thinker_config.audio_config / vision_config of
/work/shared/configs/qwen2.5-omni-3b.config.json) with fewer layers when asked (the printout says how many;
the full-attention layers kept are the config's indices below the depth, else the last layer). Weights are
random and shared (our modules are loaded with the reference's tensors). fp32 on the CPU. Each side runs once
on a short input first (warm-up), then once timed. Peak RSS: the process's high-water mark reset before each
step (/proc/self/clear_refs), reported as the growth over the resident size at the step's start.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG_3B = Path("/work/shared/configs/qwen2.5-omni-3b.config.json")


# ------------------------------------------------------------------------------------------------ measuring


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


_PEAK_KIB = [0]  # the process's high-water mark before the latest reset


def process_peak_mib() -> float:
    return max(_PEAK_KIB[0], _status_kib("VmHWM")) / 1024


def measure(fn):
    """-> (result, seconds, peak RSS growth in MiB during fn, peak RSS of the process so far in MiB)."""
    gc.collect()
    _PEAK_KIB[0] = max(_PEAK_KIB[0], _status_kib("VmHWM"))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    base = _status_kib("VmRSS")
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    return out, dt, ((peak - base) / 1024 if resettable else float("nan")), peak / 1024


# ------------------------------------------------------------------------------------------------ models


def official_configs(path: Path) -> tuple[dict, dict]:
    thinker = json.loads(path.read_text())["thinker_config"]
    keep = lambda d: {k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return keep(thinker["audio_config"]), keep(thinker["vision_config"])


def with_layers(audio: dict, vision: dict, audio_layers: int, vision_layers: int) -> tuple[dict, dict]:
    audio = dict(audio, encoder_layers=audio_layers or audio["encoder_layers"])
    depth = vision_layers or vision["depth"]
    full = [i for i in vision["fullatt_block_indexes"] if i < depth] or [depth - 1]
    return audio, dict(vision, depth=depth, fullatt_block_indexes=full)


def tiny_encoder_configs(out_dim: int) -> tuple[dict, dict]:
    return (dict(encoder_layers=1, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=out_dim),
            dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=out_dim,
                 fullatt_block_indexes=[0]))


def reference_thinker(audio: dict, vision: dict):
    """The reference Thinker with a 1-layer toy text model (only its encoders are timed)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [4, 6, 6]})
    cfg = Qwen2_5OmniThinkerConfig(text_config=text, audio_config=audio, vision_config=vision)
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


def ours_sharing(module_cls, cfg, ref_module):
    """Our module built on meta, then given the reference module's tensors (no copy)."""
    with torch.device("meta"):
        ours = module_cls(cfg)
    ours.load_state_dict(ref_module.state_dict(), strict=True, assign=True)
    for m in ours.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return ours.eval()


def reference_processor(tmp: Path):
    """The saved Qwen2.5-Omni processor of the tiny test checkpoints (official preprocessing numbers)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from transformers import Qwen2_5OmniProcessor

    tok, ids = tiny.build_tokenizer()
    tiny.make_processor(tmp, tok, ids)
    return Qwen2_5OmniProcessor.from_pretrained(str(tmp))


# ------------------------------------------------------------------------------------------------ media


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 3.1 * t)
    return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_video(path: Path, seconds: float, fps: int = 25, width: int = 640, height: int = 360) -> Path:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=Fraction(fps))
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(int(seconds * fps)):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + i) % 256], -1)
            for packet in v.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------ benchmarks


def bench_audio(args, audio_cfg: dict, vision_tiny: dict, proc, tmp: Path) -> list[tuple]:
    from omnivox.encoders.audio import AudioEncoder, AudioEncoderConfig
    from omnivox.encoders.audio_features import FeatureConfig, log_mel

    fcfg = FeatureConfig.from_dir(tmp)
    x = speech_like(args.seconds)
    warm = x[:16000]

    def ref_features(a):
        out = proc.feature_extractor(a, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                     return_tensors="pt")
        return out["input_features"], out["attention_mask"]

    log_mel(warm, fcfg), ref_features(warm)
    ours_f, o_feat_s, o_feat_mb, _ = measure(lambda: log_mel(x, fcfg))
    (ref_f, ref_mask), r_feat_s, r_feat_mb, _ = measure(lambda: ref_features(x))
    feat_diff = (ref_f[0][:, ref_mask[0].bool()] - ours_f).abs().max().item()

    ref = reference_thinker(audio_cfg, vision_tiny)
    ours = ours_sharing(AudioEncoder, AudioEncoderConfig.from_dict(audio_cfg), ref.model.audio_tower)

    def ref_encode(f, m):
        with torch.inference_mode():
            out = ref.get_audio_features(f, feature_attention_mask=m).pooler_output
            return torch.cat(out) if isinstance(out, (tuple, list)) else out

    def ours_encode(f):
        with torch.inference_mode():
            return ours.encode(f)

    wf, wm = ref_features(warm)
    ours_encode(log_mel(warm, fcfg)), ref_encode(wf, wm)
    ours_e, o_enc_s, o_enc_mb, _ = measure(lambda: ours_encode(ours_f))
    ref_e, r_enc_s, r_enc_mb, _ = measure(lambda: ref_encode(ref_f, ref_mask))
    enc_diff = (ref_e - ours_e).abs().max().item()
    n_tok = ours_e.shape[0]
    del ref, ours
    gc.collect()
    return [
        (f"audio features ({args.seconds:g} s, {ours_f.shape[1]} frames)", r_feat_s, o_feat_s, r_feat_mb, o_feat_mb,
         feat_diff),
        (f"audio encoder ({audio_cfg['encoder_layers']} layers, {n_tok} tokens)", r_enc_s, o_enc_s, r_enc_mb,
         o_enc_mb, enc_diff),
    ]


def bench_video(args, audio_tiny: dict, vision_cfg: dict, proc, tmp: Path) -> list[tuple]:
    from transformers.video_utils import load_video

    from omnivox.encoders.images import ImageProcessorConfig
    from omnivox.encoders.video import patch_batches, read_video
    from omnivox.encoders.vision import VisionEncoder, VisionEncoderConfig

    icfg = ImageProcessorConfig.from_dir(tmp)
    path = write_video(tmp / "bench.mp4", args.video_seconds)
    warm_path = write_video(tmp / "warm.mp4", 2.0, width=160, height=90)

    def ours_pre(p):
        sampled = read_video(p, icfg)
        batches = list(patch_batches(torch.from_numpy(sampled.frames), sampled.frames.shape[1:3], icfg))
        return sampled, batches

    def ref_pre(p, indices, fps):
        frames, _ = load_video(str(p), backend="pyav", sample_indices_fn=lambda metadata, **kw: np.array(indices))
        out = proc(text="<|VIDEO|>", videos=[frames], videos_kwargs={"fps": fps, "cap_pixels_per_frame": True},
                   return_tensors="pt")
        return out["pixel_values_videos"], out["video_grid_thw"]

    w_sampled, w_batches = ours_pre(warm_path)
    ref_pre(warm_path, w_sampled.indices, w_sampled.sample_fps)
    (sampled, batches), o_pre_s, o_pre_mb, _ = measure(lambda: ours_pre(path))
    (ref_px, ref_grid), r_pre_s, r_pre_mb, _ = measure(lambda: ref_pre(path, sampled.indices, sampled.sample_fps))
    ours_px = torch.cat([b[0] for b in batches])
    pre_diff = (ours_px - ref_px).abs().max().item() if ours_px.shape == ref_px.shape else float("nan")

    ref = reference_thinker(audio_tiny, vision_cfg)
    ours = ours_sharing(VisionEncoder, VisionEncoderConfig.from_dict(vision_cfg), ref.model.visual)

    def ours_encode(bs):
        with torch.inference_mode():
            return torch.cat([ours.encode(px, grid) for px, grid in bs])

    def ref_encode(px, grid):
        with torch.inference_mode():
            out = ref.get_video_features(px, video_grid_thw=grid).pooler_output
            return torch.cat(out) if isinstance(out, (tuple, list)) else out

    w_px, w_grid = ref_pre(warm_path, w_sampled.indices, w_sampled.sample_fps)
    ours_encode(w_batches), ref_encode(w_px, w_grid)
    ours_e, o_enc_s, o_enc_mb, _ = measure(lambda: ours_encode(batches))
    ref_e, r_enc_s, r_enc_mb, _ = measure(lambda: ref_encode(ref_px, ref_grid))
    enc_diff = (ref_e - ours_e).abs().max().item()
    t, h, w = ref_grid[0].tolist()
    del ref, ours
    gc.collect()
    return [
        (f"video preprocess ({len(sampled.indices)} frames of {args.video_seconds:g} s 640x360 -> grid {t}x{h}x{w})",
         r_pre_s, o_pre_s, r_pre_mb, o_pre_mb, pre_diff),
        (f"vision encoder ({vision_cfg['depth']} layers, {ours_e.shape[0]} tokens)", r_enc_s, o_enc_s, r_enc_mb,
         o_enc_mb, enc_diff),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG_3B, help="official config.json for the encoder sizes")
    p.add_argument("--audio-layers", type=int, default=8, help="audio encoder layers (0: the config's)")
    p.add_argument("--vision-layers", type=int, default=4, help="vision encoder layers (0: the config's)")
    p.add_argument("--seconds", type=float, default=30.0, help="audio length")
    p.add_argument("--video-seconds", type=float, default=10.0, help="video length")
    p.add_argument("--only", choices=["audio", "video"], help="run one half")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    audio_full, vision_full = official_configs(args.config)
    audio_cfg, vision_cfg = with_layers(audio_full, vision_full, args.audio_layers, args.vision_layers)
    audio_tiny, vision_tiny = tiny_encoder_configs(audio_cfg["output_dim"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, "
          f"sizes from {args.config.name}")
    print(f"audio encoder: d_model {audio_cfg['d_model']}, {audio_cfg['encoder_layers']} of "
          f"{audio_full['encoder_layers']} layers; vision encoder: hidden {vision_cfg['hidden_size']}, "
          f"{vision_cfg['depth']} of {vision_full['depth']} layers (full attention at "
          f"{vision_cfg['fullatt_block_indexes']})")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc = reference_processor(tmp)
        if args.only in (None, "audio"):
            rows += bench_audio(args, audio_cfg, vision_tiny, proc, tmp)
        if args.only in (None, "video"):
            rows += bench_video(args, audio_tiny, vision_cfg, proc, tmp)
    name_w = max(len(r[0]) for r in rows)
    hdr = (f"{'step':{name_w}} | {'ref s':>7} {'ours s':>7} {'speedup':>7} | {'ref +RSS MiB':>12} "
           f"{'ours +RSS MiB':>13} | {'max|diff|':>9}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for name, rs, os_, rm, om, diff in rows:
        print(f"{name:{name_w}} | {rs:7.3f} {os_:7.3f} {rs / os_:6.2f}x | {rm:12.0f} {om:13.0f} | {diff:9.2e}")
    print(f"\npeak RSS of the whole process (both models of a half built at once, reference and inputs "
          f"included): {process_peak_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
