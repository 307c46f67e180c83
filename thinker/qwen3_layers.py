"""Qwen3 decoder pieces shared by the Qwen3-Omni Thinker (`moe.py`), Talker and code predictor.

What is notable here:
- Qwen3 attention: RMSNorm over each head's q and k (`q_norm`, `k_norm`, width head_dim) before RoPE, no
  biases (unless the config says `attention_bias`), GQA, over the Thinker's static, position-indexed `KVCache`.
- Interleaved multimodal RoPE (the reference's `Qwen3OmniMoeThinkerTextRotaryEmbedding`, which the Talker
  reuses): frequency j of the half dimension reads the height axis when j % 3 == 1 and j < 3·section[1], the
  width axis when j % 3 == 2 and j < 3·section[2], else the temporal axis. (Qwen2.5's mrope gave each axis one
  contiguous block instead.) The reference interleaves whatever the config's `interleaved` flag says; so do we.
  The code predictor's plain RoPE is the same table with every frequency on the temporal axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.thinker.config import Qwen3DecoderConfig
from omnivox.thinker.model import KVCache, RMSNorm


def allocate_cache(cfg: Qwen3DecoderConfig, max_len: int, device=None, dtype=torch.float32) -> KVCache:
    """A batch-1 static cache for `cfg`'s layers."""
    if max_len < 1:
        raise ValueError(f"a KV cache needs max_len >= 1, got {max_len}")
    shape = (cfg.num_layers, 1, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------
# RoPE


def rope_axes(cfg: Qwen3DecoderConfig, device=None) -> Tensor:
    """(D/2,) long: which position axis (0 t, 1 h, 2 w) each frequency reads (interleaved layout)."""
    half = cfg.head_dim // 2
    axes = torch.zeros(half, dtype=torch.long, device=device)
    if cfg.mrope_section is not None:
        for axis in (1, 2):
            axes[axis:cfg.mrope_section[axis] * 3:3] = axis
    return axes


def rope_inv_freq(cfg: Qwen3DecoderConfig, device=None) -> Tensor:
    """(D/2,) fp32, computed like the reference's default RoPE."""
    exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    return 1.0 / (cfg.rope_theta ** exponent)


def rope_cos_sin(inv_freq: Tensor, axes: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """position_ids (3, B, T) -> fp32 cos, sin (B, T, D)."""
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must have shape (3, B, T), got {tuple(position_ids.shape)}")
    pos = position_ids.to(torch.float32).permute(1, 2, 0)  # (B, T, 3)
    freqs = pos[..., axes] * inv_freq  # (B, T, D/2): frequency j at its axis's position
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Attention


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3DecoderConfig):
        super().__init__()
        d = cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        """x (1, T, H), cos/sin (1, T, D) -> (1, T, H); writes K/V at cache.length..+T (the caller advances)."""
        cfg = self.cfg
        b, t, _ = x.shape
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self.q_norm(self.q_proj(x).view(b, t, hq, d)).transpose(1, 2)  # (1, Hq, T, D)
        k = self.k_norm(self.k_proj(x).view(b, t, hkv, d)).transpose(1, 2)  # (1, Hkv, T, D)
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)  # (1, Hkv, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        start, end = cache.length, cache.length + t
        cache.k[layer_idx].narrow(2, start, t).copy_(k)
        cache.v[layer_idx].narrow(2, start, t).copy_(v)
        keys = cache.k[layer_idx].narrow(2, 0, end)  # (1, Hkv, S, D)
        values = cache.v[layer_idx].narrow(2, 0, end)
        gqa = hq != hkv
        if t == 1:
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)  # (1, Hq, 1, D)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)  # (1, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, hq * d))  # (1, T, H)


def check_rows(x: Tensor, width: int, cache: KVCache, what: str) -> None:
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != width or x.shape[1] < 1:
        raise ValueError(f"{what} must be (1, T, {width}) with T >= 1, got {tuple(x.shape)}")
    if cache.length + x.shape[1] > cache.max_len:
        raise ValueError(f"{what}: KV cache full ({cache.length} + {x.shape[1]} positions exceed max_len "
                         f"{cache.max_len})")
