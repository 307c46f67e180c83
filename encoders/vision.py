"""The Thinker's vision encoder (`thinker.visual.*`): a ViT over 14×14×2 patches with a 2×2 patch merger.

What is notable here:
- Input is the flat patch list the preprocessor makes (`encoders.images`): (N, C·T·P·P) rows in merge-block
  order (each run of `merge²` rows is one 2×2 block of neighbouring patches), frames one after another, items
  one after another; `grid_thw` (n, 3) says how many (t, h, w) patches each item has. The patch embedding is a
  Conv3d whose kernel equals its stride, so we run it as one matmul with the conv weight (same parameter name).
- 2-D rotary embedding: the first half of each head's rotary frequencies turn with the patch row, the second half
  with the patch column (`head_dim // 4` frequencies each, duplicated rotate-half style), computed in fp32.
- Window attention: merged tokens are reordered so that each window of `window_size // patch_size // merge`
  merged tokens squared (112 px → 4×4 merged tokens = 64 patches) is contiguous; the `fullatt_block_indexes`
  layers attend over the whole frame instead. Attention never crosses a frame (each temporal step of a video is
  its own segment, as in the reference). The merger runs in window order and the output is put back in
  raster order at the end.
- Attention over ragged segments, never with an (N, N) block-diagonal mask: on a GPU, segments of equal length
  are gathered into one batch and run through a single SDPA call (a frame has at most four distinct window
  sizes: full, right edge, bottom edge, corner), so there is no per-window kernel launch; on the CPU a plain loop
  over contiguous slices is faster (measured ~2x: the gathered batch falls out of cache) and is what we do.
  The plan is built once per `encode` call and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class VisionEncoderConfig:
    """`thinker_config.vision_config`; defaults are the reference config class's."""
    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112                                  # window side in pixels
    out_hidden_size: int = 3584                             # merger output = the Thinker's hidden size
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # layers with whole-frame attention
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6                              # fixed in the reference, not read from the config

    @classmethod
    def from_dict(cls, d: dict) -> "VisionEncoderConfig":
        params = d.get("rope_parameters") or {}
        theta = params.get("rope_theta", d.get("rope_theta", cls.rope_theta))
        fields = {k: d[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                    "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size",
                                    "out_hidden_size") if d.get(k) is not None}
        for k, v in fields.items():
            if isinstance(v, (list, tuple)):
                raise ValueError(f"vision_config.{k} must be a single integer, got {v!r}")
            fields[k] = int(v)
        cfg = cls(**fields, rope_theta=float(theta),
                  fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes",
                                                                    cls.fullatt_block_indexes)),
                  hidden_act=str(d.get("hidden_act", cls.hidden_act)))
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {cfg.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a head "
                             "size divisible by 4 (2-D rotary embedding)")
        if cfg.window_size // cfg.spatial_merge_size // cfg.patch_size < 1:
            raise ValueError(f"vision window_size {cfg.window_size} is smaller than one merged patch")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


# ----------------------------------------------------------------------------------------------------------------
# Layout: positions, windows, segments (all from grid_thw; no weights)


def check_grid(grid_thw: Tensor, cfg: VisionEncoderConfig, n_rows: int | None = None) -> list[tuple[int, int, int]]:
    """grid_thw as a list of (t, h, w) ints, checked against the merge size and the pixel row count."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape (n >= 1, 3), got {tuple(grid_thw.shape)}")
    grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    m = cfg.spatial_merge_size
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not a positive grid with h, w divisible by the "
                             f"spatial merge size {m}")
    total = sum(t * h * w for t, h, w in grids)
    if n_rows is not None and n_rows != total:
        raise ValueError(f"pixel_values has {n_rows} patch rows but grid_thw describes {total}")
    return grids


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> Tensor:
    """(N, 2) patch (row, col) for every pixel_values row, in merge-block order, repeated per frame."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)  # (h/m, m, w/m, m)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # merge-block order: (block row, block col, row in block, col in block)
        rc = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], -1)
        out.append(rc.repeat(t, 1))                                                             # (t*h*w, 2)
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], cfg: VisionEncoderConfig) -> tuple[Tensor, list[int]]:
    """(order of merged tokens that makes every window contiguous (N/merge²,), window lengths in patches).

    Windows tile each frame row-major in steps of `window_size // patch_size // merge` merged tokens; inside a
    window the merged tokens stay row-major. Edge windows are smaller; none is empty.
    """
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        i = torch.arange(gh).view(-1, 1).expand(gh, gw)
        j = torch.arange(gw).view(1, -1).expand(gh, gw)
        nwh, nww = -(-gh // win), -(-gw // win)
        window_id = (i // win) * nww + (j // win)                                   # (gh, gw) window of each token
        # stable sort by window keeps row-major order inside each window
        frame = torch.argsort(window_id.reshape(-1), stable=True)                   # (gh*gw,)
        counts = torch.bincount(window_id.reshape(-1), minlength=nwh * nww) * m * m
        for f in range(t):
            order.append(frame + offset + f * gh * gw)
            lengths.extend(counts.tolist())
        offset += t * gh * gw
    return torch.cat(order), lengths


@dataclass
class SegmentPlan:
    """How to run attention over contiguous ragged segments.

    batched (GPU): one gather index per distinct segment length, one SDPA call per length. Unbatched (CPU): a
    loop over contiguous slices, which measured ~2x faster on CPU than gathering (cache-sized working sets).
    """
    lengths: list[int]
    groups: list[Tensor] | None = None  # each (n_segments, L) row indices of the segments of length L

    @classmethod
    def from_lengths(cls, lengths: list[int], device, batched: bool) -> "SegmentPlan":
        if not batched:
            return cls(lengths)
        lens = torch.tensor(lengths, dtype=torch.long)
        starts = torch.cumsum(lens, 0) - lens
        groups = []
        for length in torch.unique(lens).tolist():
            s = starts[lens == length]
            groups.append((s[:, None] + torch.arange(length)).to(device))           # (n_segments, L)
        return cls(lengths, groups)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, plan: SegmentPlan) -> Tensor:
    """Non-causal attention confined to each segment. q, k, v: (N, H, D) -> (N, H, D)."""
    if plan.groups is None or len(plan.lengths) == 1:
        outs, start = [], 0
        for length in plan.lengths:
            qs, ks, vs = (x[start:start + length].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))    # (L, H, D)
            start += length
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    out = torch.empty_like(q)
    for idx in plan.groups:
        flat = idx.reshape(-1)
        n, length = idx.shape
        qs, ks, vs = (x.index_select(0, flat).view(n, length, *x.shape[1:]).transpose(1, 2)
                      for x in (q, k, v))                                                # (n, H, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs)                                  # (n, H, L, D)
        out.index_copy_(0, flat, o.transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Modules (parameter names = checkpoint names under `thinker.visual.`)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in fp32. x: (N, H, D); cos, sin: (N, D)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos[:, None] + rot * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: SegmentPlan) -> Tensor:
        n = x.shape[0]
        q = rotate(self.q(x).view(n, self.num_heads, -1), cos, sin)  # (N, H, D)
        k = rotate(self.k(x).view(n, self.num_heads, -1), cos, sin)  # (N, H, D)
        v = self.v(x).view(n, self.num_heads, -1)                     # (N, H, D)
        return self.proj(segment_attention(q, k, v, plan).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: SegmentPlan) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, plan)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        # kernel == stride == patch: the conv is one matmul per patch row
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))  # (N, hidden)


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))  # (N / merge², out_hidden)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    def rotary(self, positions: Tensor, device) -> tuple[Tensor, Tensor]:
        """cos, sin (N, head_dim) in fp32 for (N, 2) patch (row, col) positions."""
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        angles = positions.to(device).float()[..., None] * inv_freq  # (N, 2, head_dim/4)
        angles = angles.flatten(1)                                    # (N, head_dim/2): rows then cols
        angles = torch.cat([angles, angles], -1)                      # (N, head_dim)
        return angles.cos(), angles.sin()

    def encode(self, pixel_values: Tensor, grid_thw: Tensor, batched_attention: bool | None = None) -> Tensor:
        """(N_patches, C·T·P·P), (n, 3) -> (N_patches / merge², out_hidden_size), items in grid_thw order.

        batched_attention: gather equal-length segments into one SDPA call (default: on any non-CPU device).
        """
        cfg = self.cfg
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must have shape (N, {cfg.patch_dim}), got {tuple(pixel_values.shape)}")
        grids = check_grid(grid_thw, cfg, pixel_values.shape[0])
        device, unit = self.patch_embed.proj.weight.device, cfg.merge_unit
        n = pixel_values.shape[0]

        order, window_lengths = window_order(grids, cfg)                     # (N / unit,)
        order = order.to(device)
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        batched = device.type != "cpu" if batched_attention is None else batched_attention
        window_plan = SegmentPlan.from_lengths(window_lengths, device, batched)
        frame_plan = SegmentPlan.from_lengths(frame_lengths, device, batched)

        def to_windows(x: Tensor) -> Tensor:  # permute whole merge blocks into window order
            return x.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        x = to_windows(self.patch_embed(pixel_values.to(device)))             # (N, hidden)
        cos, sin = self.rotary(patch_positions(grids, cfg.spatial_merge_size), device)
        cos, sin = to_windows(cos), to_windows(sin)                           # (N, head_dim)
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_plan if i in full else window_plan)
        merged = self.merger(x)                                               # (N / unit, out_hidden)
        return merged[torch.argsort(order)]

    forward = encode


def tokens_per_item(grid_thw: Tensor, merge: int) -> list[int]:
    """Merged tokens (= prompt placeholders) each image/video produces: t·h·w / merge²."""
    return [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]
