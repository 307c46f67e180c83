"""The Qwen3-Omni Thinker: a Qwen3 MoE decoder with interleaved multimodal RoPE and DeepStack inputs.

What is notable here:
- Attention is Qwen3's (`qwen3_layers.Qwen3Attention`: RMSNorm over each head's q and k before RoPE, GQA, no
  biases) over the same static, position-indexed `KVCache` as the Qwen2.5 Thinker, with interleaved multimodal
  RoPE (position ids (3, 1, T) for the temporal, height and width axes).
- Feed-forward: a layer is sparse when it is not in `mlp_only_layers` and (index + 1) is a multiple of
  `decoder_sparse_step` (the reference's rule); dense layers use the plain gated MLP (`intermediate_size`).
  The router is a softmax over experts in fp32, top-k, renormalised to sum to 1 when `norm_topk_prob`. The
  experts run grouped: the token-expert pairs are sorted by expert and each active expert runs one GEMM chain
  over its rows (no loop over tokens). The Thinker has no shared expert; the Talker's MoE adds one
  (`shared_intermediate_size` > 0), so both use `SparseMoE` from here.
- Expert weights keep the checkpoint's per-expert names (`mlp.experts.{e}.gate_proj.weight`, ...), as the
  official files and the reference's `save_pretrained` store them.
- DeepStack: the vision encoder returns features from several of its layers; feature k is added to the hidden
  state of the visual rows (image/video placeholders) after decoder layer k, for the first len(features)
  layers (`Deepstack`). A chunked prefill passes each chunk the rows of it that are visual.
- `prefill` can keep the hidden state after a given layer (`keep_layer`), which the Qwen3 Talker reads for media
  rows (the config's `accept_hidden_layer`).
- Batch 1: one conversation per cache, as the pipeline runs the Thinker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from omnivox.thinker.config import MoEConfig, MoEThinkerConfig
from omnivox.thinker.model import MLP, KVCache, RMSNorm
from omnivox.thinker.qwen3_layers import (Qwen3Attention, allocate_cache, check_rows, rope_axes, rope_cos_sin,
                                          rope_inv_freq)


class SparseMoE(nn.Module):
    """Top-k routed experts (+ a sigmoid-gated shared expert when the config has one)."""

    def __init__(self, hidden: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)  # router
        self.experts = nn.ModuleList(MLP(hidden, moe.intermediate_size) for _ in range(moe.num_experts))
        if moe.shared_intermediate_size:
            self.shared_expert = MLP(hidden, moe.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, H) -> (N, H)."""
        k = self.moe.top_k
        logits = self.gate(x)  # (N, E)
        probs = logits.softmax(-1, dtype=torch.float32)  # (N, E) fp32 like the reference
        weights, experts = probs.topk(k, dim=-1)  # (N, k)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.reshape(-1)  # (N*k,) expert of each token-expert pair
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.moe.num_experts).tolist()  # one host sync per layer
        token_of = order // k  # (N*k,) token of each sorted pair
        w_sorted = weights.reshape(-1)[order]  # (N*k,)
        out = torch.zeros_like(x)  # (N, H)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]  # (n,)
            y = self.experts[e](x[rows]) * w_sorted[start:start + n, None]  # (n, H): one GEMM chain per expert
            out.index_add_(0, rows, y)
            start += n
        if self.moe.shared_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (N, H)
        return out


@dataclass
class Deepstack:
    """DeepStack inputs of one prefill chunk: features[k] (Nv, H) is added to the visual rows after layer k."""
    visual_rows: Tensor               # (T,) bool: which rows of the chunk are image/video placeholders
    features: list[Tensor]            # each (Nv, H), Nv = visual_rows.sum()

    def check(self, t: int, hidden: int, layers: int) -> None:
        if self.visual_rows.dim() != 1 or self.visual_rows.shape[0] != t or self.visual_rows.dtype != torch.bool:
            raise ValueError(f"Deepstack.visual_rows must be a ({t},) bool tensor, got "
                             f"{tuple(self.visual_rows.shape)} {self.visual_rows.dtype}")
        if len(self.features) > layers:
            raise ValueError(f"{len(self.features)} DeepStack features for a {layers}-layer decoder")
        n = int(self.visual_rows.sum())
        for f in self.features:
            if tuple(f.shape) != (n, hidden):
                raise ValueError(f"a DeepStack feature must be ({n}, {hidden}) for this chunk, got {tuple(f.shape)}")


class MoEDecoderLayer(nn.Module):
    def __init__(self, cfg: MoEThinkerConfig, sparse: bool):
        super().__init__()
        dec = cfg.decoder
        self.self_attn = Qwen3Attention(dec)
        self.mlp = SparseMoE(dec.hidden_size, cfg.moe) if sparse else MLP(dec.hidden_size, dec.intermediate_size)
        self.input_layernorm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        b, t, h = x.shape
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)  # (1, T, H)
        return x + self.mlp(self.post_attention_layernorm(x).view(b * t, h)).view(b, t, h)


class MoETextDecoder(nn.Module):
    """Embedding table + decoder layers + final norm (the reference's Qwen3OmniMoeThinkerTextModel)."""

    def __init__(self, cfg: MoEThinkerConfig):
        super().__init__()
        dec = cfg.decoder
        self.cfg = dec
        self.embed_tokens = nn.Embedding(dec.vocab_size, dec.hidden_size)
        self.layers = nn.ModuleList(MoEDecoderLayer(cfg, s) for s in cfg.sparse_layers)
        self.norm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)

    def forward(self, rows: Tensor, position_ids: Tensor, cache: KVCache, deepstack: Deepstack | None = None,
                keep_layer: int | None = None) -> tuple[Tensor, Tensor | None]:
        """rows (1, T, H), position_ids (3, 1, T) -> (hidden after the final norm (1, T, H), the hidden state
        after `keep_layer` layers (1, T, H) or None); advances the cache by T."""
        dec = self.cfg
        check_rows(rows, dec.hidden_size, cache, "Thinker rows")
        t = rows.shape[1]
        if tuple(position_ids.shape) != (3, 1, t):
            raise ValueError(f"position_ids must be (3, 1, {t}), got {tuple(position_ids.shape)}")
        if keep_layer is not None and not 0 <= keep_layer <= dec.num_layers:
            raise ValueError(f"keep_layer {keep_layer} is outside 0..{dec.num_layers}")
        if deepstack is not None:
            deepstack.check(t, dec.hidden_size, dec.num_layers)
        cos, sin = rope_cos_sin(rope_inv_freq(dec, rows.device), rope_axes(dec, rows.device), position_ids)
        cos, sin = cos.to(rows.dtype), sin.to(rows.dtype)  # (1, T, D)
        x, kept = rows, (rows if keep_layer == 0 else None)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)  # (1, T, H)
            if keep_layer == i + 1:
                kept = x  # the layer's output, before any DeepStack addition (what the reference records)
            if deepstack is not None and i < len(deepstack.features):
                x = x.clone()
                x[0, deepstack.visual_rows] += deepstack.features[i].to(x.dtype)  # (Nv, H) into the visual rows
        cache.length += t
        return self.norm(x), kept


class MoEThinker(nn.Module):
    """Text decoder + vocabulary head, with the encoders attached under the checkpoint's names."""

    def __init__(self, cfg: MoEThinkerConfig, audio_tower: nn.Module | None = None,
                 visual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if audio_tower is not None:
            self.audio_tower = audio_tower
        if visual is not None:
            self.visual = visual
        self.model = MoETextDecoder(cfg)
        self.lm_head = nn.Linear(cfg.decoder.hidden_size, cfg.decoder.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            raise ValueError("tie_word_embeddings is not supported for the Qwen3-Omni Thinker (no checkpoint ties)")


def allocate(thinker: MoEThinker, max_len: int, device=None, dtype=torch.float32) -> KVCache:
    return allocate_cache(thinker.cfg.decoder, max_len, device=device, dtype=dtype)


@torch.no_grad()
def prefill(thinker: MoEThinker, cache: KVCache, inputs_embeds: Tensor, position_ids: Tensor,
            last_only: bool = True, deepstack: Deepstack | None = None,
            keep_layer: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Append a chunk of T positions -> (logits (1, V) of the last position, or (1, T, V); hidden (1, T, H);
    the hidden state after `keep_layer` layers (1, T, H) or None). Chunk by chunk equals one call."""
    hidden, kept = thinker.model(inputs_embeds, position_ids, cache, deepstack, keep_layer)
    logits = thinker.lm_head(hidden[:, -1] if last_only else hidden)  # (1, V) or (1, T, V)
    return logits, hidden, kept


@torch.no_grad()
def decode_step(thinker: MoEThinker, cache: KVCache, token_ids: Tensor, position_ids: Tensor,
                keep_layer: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """token_ids (1,) long, position_ids (3, 1, 1) -> (logits (1, V), hidden (1, H), kept (1, H) or None)."""
    if token_ids.dim() != 1 or token_ids.shape[0] != 1:
        raise ValueError(f"token_ids must be (1,), got {tuple(token_ids.shape)}")
    x = thinker.model.embed_tokens(token_ids[:, None])  # (1, 1, H)
    hidden, kept = thinker.model(x, position_ids, cache, None, keep_layer)
    return thinker.lm_head(hidden[:, 0]), hidden[:, 0], None if kept is None else kept[:, 0]
