"""Qwen3-Omni's vision encoder (`thinker.visual.*`): a ViT over 16x16x2 patches with DeepStack outputs.

Checked against the reference `Qwen3OmniMoeVisionEncoder` (transformers 5.23). What differs from Qwen2.5-Omni's
(`vision.py`, whose layout helpers this file reuses):
- Input is the same flat patch list in merge-block order with `grid_thw`; the patch embedding is a Conv3d with
  a bias, run as one matmul.
- Learned absolute positions: a square table of `num_position_embeddings` rows (48x48 for the official model)
  resampled to each item's (h, w) patch grid bilinearly with aligned corners, in merge-block order, the same for
  every frame of a video; added to the patch embeddings. Plus the same 2-D rotary embedding as Qwen2.5 (rows in
  the first half of the frequencies, columns in the second, fp32).
- Every block attends over the whole frame (no windows); LayerNorm (eps 1e-6) and a plain two-layer MLP.
- DeepStack: after each block named in `deepstack_visual_indexes`, a merger of its own (`merger_list[i]`, with
  its LayerNorm over the 2x2-merged width) turns the hidden state into Thinker-width features, one row per merged
  token like the final output. The Thinker adds feature i to its visual rows after decoder layer i
  (`thinker/moe.Deepstack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.encoders.vision import _ACTIVATIONS, SegmentPlan, check_grid, patch_positions, rotate, segment_attention

__all__ = ["Qwen3VisionConfig", "Qwen3VisionEncoder"]


@dataclass(frozen=True)
class Qwen3VisionConfig:
    """`thinker_config.vision_config` of a Qwen3-Omni config.json; defaults are the reference config class's."""
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    out_hidden_size: int = 3584
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3VisionConfig:
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "axial")) not in ("axial", "default"):
            raise ValueError(f"vision_config: unsupported rope type {rope.get('rope_type')!r} (axial only)")
        defaults = cls()
        kw = {}
        for f in cls.__dataclass_fields__:
            if f in d and f not in ("deepstack_visual_indexes", "rope_theta"):
                kw[f] = type(getattr(defaults, f))(d[f])
        cfg = cls(**kw, deepstack_visual_indexes=tuple(int(i) for i in d.get("deepstack_visual_indexes",
                                                                            defaults.deepstack_visual_indexes)),
                  rope_theta=float(rope.get("rope_theta", d.get("rope_theta", defaults.rope_theta))))
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision_config: head_dim {cfg.hidden_size}/{cfg.num_heads} must be a multiple of 4 "
                             "(2-D rotary embedding)")
        side = int(round(cfg.num_position_embeddings ** 0.5))
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"vision_config: num_position_embeddings {cfg.num_position_embeddings} is not a square")
        if any(not 0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
            raise ValueError(f"vision_config: deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} must "
                             f"name blocks 0..{cfg.depth - 1}")
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config: unsupported hidden_act {cfg.hidden_act!r}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings ** 0.5))


def position_taps(grids: list[tuple[int, int, int]], merge: int, side: int) -> tuple[Tensor, Tensor]:
    """Bilinear (aligned-corner) resampling of a side x side table to each item's patch grid: per pixel row, 4
    table indices (N, 4) long and weights (N, 4) fp32, rows in merge-block order, repeated for every frame."""
    rc = patch_positions(grids, merge).float()  # (N, 2) patch row, col
    sizes = torch.cat([torch.tensor([[h, w]], dtype=torch.float32).expand(t * h * w, 2) for t, h, w in grids])
    src = rc * (side - 1) / (sizes - 1).clamp(min=1)  # (N, 2) fractional table coordinates
    lo = src.floor()
    frac = src - lo  # (N, 2)
    lo = lo.long()
    hi = (lo + 1).clamp(max=side - 1)
    lo = lo.clamp(max=side - 1)
    rows = torch.stack([lo[:, 0], lo[:, 0], hi[:, 0], hi[:, 0]], 1)  # (N, 4)
    cols = torch.stack([lo[:, 1], hi[:, 1], lo[:, 1], hi[:, 1]], 1)
    wr = torch.stack([1 - frac[:, 0], 1 - frac[:, 0], frac[:, 0], frac[:, 0]], 1)
    wc = torch.stack([1 - frac[:, 1], frac[:, 1], 1 - frac[:, 1], frac[:, 1]], 1)
    return rows * side + cols, wr * wc


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: SegmentPlan) -> Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each (N, H, D)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.proj(segment_attention(q, k, v, plan).reshape(n, -1))  # (N, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: SegmentPlan) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, plan)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixels: Tensor) -> Tensor:
        w = self.proj.weight  # kernel == stride == patch: one matmul per patch row
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)  # (N, hidden)


class PatchMerger(nn.Module):
    """2x2 merge + MLP; the final merger norms each patch, the DeepStack mergers norm the merged row."""

    def __init__(self, cfg: Qwen3VisionConfig, norm_after_merge: bool):
        super().__init__()
        wide = cfg.hidden_size * cfg.merge_unit
        self.norm_after_merge = norm_after_merge
        self.ln_q = nn.LayerNorm(wide if norm_after_merge else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        wide = self.mlp[0].in_features
        x = self.ln_q(x.reshape(-1, wide)) if self.norm_after_merge else self.ln_q(x).reshape(-1, wide)
        return self.mlp(x)  # (N / merge², out_hidden)


class Qwen3VisionEncoder(nn.Module):
    """state_dict keys == the checkpoint's keys under `thinker.visual.`."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_merge=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_merge=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def rotary(self, positions: Tensor, device) -> tuple[Tensor, Tensor]:
        """cos, sin (N, head_dim) fp32 for (N, 2) patch (row, col) positions."""
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        angles = (positions.to(device).float()[..., None] * inv_freq).flatten(1)  # (N, head_dim/2): rows, cols
        angles = torch.cat([angles, angles], -1)  # (N, head_dim)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """pixel_values (N, C*T*P*P), grid_thw (n, 3) -> (tokens (N / merge², out_hidden), DeepStack features:
        one (N / merge², out_hidden) per `deepstack_visual_indexes` entry)."""
        cfg = self.cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(f"pixel_values must be (N, {patch_dim}), got {tuple(pixel_values.shape)}")
        grids = check_grid(grid_thw, cfg, pixel_values.shape[0])
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixel_values.to(device))  # (N, hidden)
        idx, weights = position_taps(grids, cfg.spatial_merge_size, cfg.grid_side)
        pos = (self.pos_embed(idx.to(device)) * weights.to(device)[:, :, None]).sum(1)  # (N, hidden), fp32 weights
        x = x + pos.to(x.dtype)
        cos, sin = self.rotary(patch_positions(grids, cfg.spatial_merge_size), device)
        frames = [h * w for t, h, w in grids for _ in range(t)]  # attention never crosses a frame
        plan = SegmentPlan.from_lengths(frames, device, batched=device.type != "cpu")
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
