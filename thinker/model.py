"""The Thinker: a Qwen2.5 decoder with multimodal RoPE over a static, position-indexed KV cache.

What is notable here:
- Multimodal RoPE (the reference's `apply_multimodal_rotary_pos_emb`): positions come as (3, B, T) ids for the
  (temporal, height, width) axes; the rotary half-dimension is split by `mrope_section` and chunk i takes its
  angles from axis i % 3. We compute only the angles each chunk needs (no (3, B, T, D) table), in fp32 like the
  reference, and cast to the activation dtype before rotating.
- `KVCache` is preallocated (L, B, Hkv, S_max, D) and written by slice assignment at `cache.length`; `prefill` may
  be called many times in a row (streaming input, multi-turn chats) and `truncate` rolls the cache back (barge-in,
  conversation edits) without copying; `resized` copies it into a larger allocation (a growing conversation).
- Masks: a first chunk uses SDPA's own causal path, a later chunk gets a small (T, S) boolean mask (causal inside
  the chunk, full view of the prefix), and a decode step (T == 1) needs none. GQA decode folds the query groups
  into the query-length axis, so SDPA reads each K/V head once with no expanded copy (on CPU, `enable_gqa` is
  ~3x slower in fp32 and >10x in bf16 at 1k context).
- Fewer kernels per layer for decode speed: q/k/v and gate/up each run as one GEMM over a fused weight whose row
  blocks *are* the checkpoint-named parameters (views, no extra memory; see `_fuse`); q and k rotate together;
  rotate_half is one `roll` against a sign-flipped sin (bit-identical to the reference's formula).
- `inv_freq` is a non-persistent fp32 buffer that stays fp32 when the module is cast to bf16 (`_apply`), as the
  reference's does when loaded in bf16.
- `TextDecoder` knows nothing of the vocabulary head, so the Talker reuses it as-is (its `embed_tokens` width
  `embedding_size` differs from `hidden_size`; the Talker projects embeddings itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.thinker.config import DecoderConfig


# ----------------------------------------------------------------------------------------------------------------
# KV cache


@dataclass
class KVCache:
    """Preallocated keys/values for every layer; positions [0, length) are valid."""
    k: Tensor  # (L, B, Hkv, S_max, D)
    v: Tensor  # (L, B, Hkv, S_max, D)
    length: int = 0

    @classmethod
    def allocate(cls, cfg: DecoderConfig, batch: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32) -> "KVCache":
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions; later writes overwrite the rest."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.length = n

    def fill(self, k: Tensor, v: Tensor, n: int) -> None:
        """Start an empty cache with the first n positions of keys/values k, v (L, B, Hkv, >= n, D) computed
        elsewhere (a stored prompt prefix)."""
        if self.length != 0:
            raise ValueError("prefix rows go into an empty cache")
        if k.shape[:3] != self.k.shape[:3] or k.shape[4:] != self.k.shape[4:] or not 0 <= n <= min(k.shape[3],
                                                                                                  self.max_len):
            raise ValueError(f"{n} rows of keys {tuple(k.shape)} do not fit a cache of keys {tuple(self.k.shape)}")
        self.k[:, :, :, :n].copy_(k[:, :, :, :n])
        self.v[:, :, :, :n].copy_(v[:, :, :, :n])
        self.length = n

    def resized(self, max_len: int) -> "KVCache":
        """A new cache of capacity max_len holding a copy of the valid positions (grow a cache that is full)."""
        if max_len < self.length:
            raise ValueError(f"cannot resize a KV cache holding {self.length} positions to max_len {max_len}")
        shape = self.k.shape[:3] + (max_len,) + self.k.shape[4:]
        k = torch.zeros(shape, device=self.k.device, dtype=self.k.dtype)  # (L, B, Hkv, S_new, D)
        v = torch.zeros(shape, device=self.v.device, dtype=self.v.dtype)
        k.narrow(3, 0, self.length).copy_(self.k.narrow(3, 0, self.length))
        v.narrow(3, 0, self.length).copy_(self.v.narrow(3, 0, self.length))
        return KVCache(k, v, self.length)

    @property
    def nbytes(self) -> int:
        """Memory held by the preallocated keys and values."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding


def rope_inv_freq(cfg: DecoderConfig, device=None) -> Tensor:
    """(D/2,) fp32 inverse frequencies, computed exactly like the reference's default RoPE."""
    exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    return 1.0 / (cfg.rope_theta ** exponent)  # (D/2,)


def rope_cos_sin(inv_freq: Tensor, mrope_section, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """position_ids (3, B, T) -> fp32 cos, sin (B, T, D); chunk i of the half dimension reads axis i % 3."""
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must have shape (3, B, T), got {tuple(position_ids.shape)}")
    pos = position_ids.to(torch.float32)  # (3, B, T)
    parts = []
    start = 0
    for i, n in enumerate(mrope_section):
        if n:
            parts.append(pos[i % 3, :, :, None] * inv_freq[start:start + n])  # (B, T, n)
        start += n
    freqs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos(), emb.sin()


def text_positions(start: int, length: int, batch: int = 1, device=None) -> Tensor:
    """(3, B, T) position ids for plain text: start, start+1, ... on all three axes."""
    ids = torch.arange(start, start + length, dtype=torch.long, device=device)  # (T,)
    return ids.view(1, 1, length).expand(3, batch, length)


# ----------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shape = (dim,)

    def forward(self, x: Tensor) -> Tensor:
        # the reference: normalise in fp32, cast back, then scale (the scale runs in the weight's dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        h = F.rms_norm(x.to(torch.float32), self.shape, None, self.eps)
        return self.weight * h.to(x.dtype)


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """Re-point the Linears' weights (and biases) at row blocks of one tensor, so one GEMM serves them all.

    The parameters stay what the checkpoint names (`q_proj.weight`, ...); they are views, so loading a state
    dict in place fills the fused tensor and no memory is duplicated. Returns (weight, bias, data pointers).
    """
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])  # (sum(out), in)
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row:row + n], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + n], requires_grad=lin.bias.requires_grad)
        row += n
    return weight, bias, _pointers(linears)


def _pointers(linears: list[nn.Linear]) -> tuple[int, ...]:
    return tuple(p.data_ptr() for lin in linears for p in lin._parameters.values() if p is not None)


def _refuse_after_load(module, incompatible_keys) -> None:
    module._refuse()


class _FusedLinears(nn.Module):
    """Base for modules that run several same-input Linears as one GEMM (see `_fuse`)."""
    fused_groups: dict[str, tuple[str, ...]] = {}  # attribute holding the fused tensors -> the Linears' names

    def fused(self, attr: str) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) of one fused group, rebuilt first when a parameter no longer lives in it (after .to(),
        load_state_dict(assign=True) or a plain assignment); an in-place update needs no rebuild."""
        linears = [self._modules[name] for name in self.fused_groups[attr]]
        state = self.__dict__.get(attr)
        if state is None or state[2] != _pointers(linears):
            state = self.__dict__[attr] = _fuse(linears)
        return state[0], state[1]

    def _refuse(self) -> None:
        for attr in self.fused_groups:
            self.fused(attr)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refuse()  # right away, so the old fused tensors (e.g. an fp32 CPU copy) are freed
        return self

    def reset_buffers(self) -> None:
        """After a loader assigned the parameters directly (meta-device build): build the fused tensors now."""
        self._refuse()

    def _start_fused(self) -> None:
        self._refuse()
        # after a state dict is loaded (children included): a no-op after the usual in-place copy, a rebuild
        # after load_state_dict(assign=True)
        self.register_load_state_dict_post_hook(_refuse_after_load)


class MLP(_FusedLinears):
    fused_groups = {"_gate_up": ("gate_proj", "up_proj")}

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.intermediate_size = intermediate_size
        self._start_fused()

    def forward(self, x: Tensor) -> Tensor:
        """x (N, H) or (B, T, H)."""
        gate_up = F.linear(x, self.fused("_gate_up")[0])  # (..., 2F)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # (..., F) each
        return self.down_proj(F.silu(gate) * up)  # (..., H)


def _chunk_mask(t: int, start: int, device) -> Tensor:
    """(T, start+T) bool: query i (absolute position start+i) sees keys 0..start+i."""
    keys = torch.arange(start + t, device=device)  # (S,)
    queries = torch.arange(start, start + t, device=device)  # (T,)
    return keys[None, :] <= queries[:, None]  # (T, S)


class Attention(_FusedLinears):
    fused_groups = {"_qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_heads // cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self._start_fused()
        # rotate_half(x) == x.roll(D/2) * sign: one roll instead of two slices, a negation and a cat
        self.register_buffer("rope_sign", self._rope_sign(), persistent=False)

    def _rope_sign(self, device=None, dtype=None) -> Tensor:
        half = self.head_dim // 2
        return torch.cat((-torch.ones(half, device=device, dtype=dtype),
                          torch.ones(half, device=device, dtype=dtype)))  # (D,)

    def reset_buffers(self) -> None:
        """Rebuild the computed buffer (and the fused weights) after the parameters were assigned by a loader."""
        weight = self.q_proj.weight
        self.rope_sign = self._rope_sign(device=weight.device, dtype=weight.dtype)
        self._refuse()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        """x (B, T, H), cos/sin (B, T, D) -> (B, T, H); writes K/V at cache.length..+T."""
        b, t, _ = x.shape
        d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        weight, bias = self.fused("_qkv")  # one GEMM for q, k and v
        qkv = F.linear(x.reshape(b * t, -1), weight, bias)  # (B*T, (Hq+2Hkv)*D)
        qkv = qkv.view(b, t, hq + 2 * hkv, d)  # (B, T, Hq+2Hkv, D)
        qk = qkv[:, :, :hq + hkv]  # (B, T, Hq+Hkv, D): q and k heads rotate together
        cos, sin = cos.unsqueeze(2), (sin * self.rope_sign).unsqueeze(2)  # (B, T, 1, D)
        qk = qk * cos + qk.roll(d // 2, -1) * sin  # the reference's q * cos + rotate_half(q) * sin, exactly
        q = qk[:, :, :hq].transpose(1, 2)  # (B, Hq, T, D)
        k = qk[:, :, hq:].transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, :, hq + hkv:].transpose(1, 2)  # (B, Hkv, T, D)

        start = cache.length
        end = start + t
        k_cache, v_cache = cache.k[layer_idx], cache.v[layer_idx]  # (B, Hkv, S_max, D)
        k_cache.narrow(2, start, t).copy_(k)
        v_cache.narrow(2, start, t).copy_(v)
        keys = k_cache.narrow(2, 0, end)  # (B, Hkv, S, D)
        values = v_cache.narrow(2, 0, end)  # (B, Hkv, S, D)

        if t == 1:
            # decode: no mask; the query groups of one K/V head become rows of one query block, so SDPA reads
            # each K/V head once (enable_gqa / expanded K/V are several times slower on CPU, worst in bf16)
            q = q.reshape(b, self.num_kv_heads, self.groups, d)  # (B, Hkv, G, D)
            out = F.scaled_dot_product_attention(q, keys, values)  # (B, Hkv, G, D)
            out = out.reshape(b, self.num_heads * d)  # (B, Hq*D)
        else:
            if start == 0:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                     enable_gqa=self.groups > 1)  # (B, Hq, T, D)
            else:
                mask = _chunk_mask(t, start, x.device)  # (T, S)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                     enable_gqa=self.groups > 1)  # (B, Hq, T, D)
            out = out.transpose(1, 2).reshape(b * t, self.num_heads * d)  # (B*T, Hq*D)
        return self.o_proj(out).view(b, t, -1)  # (B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        """x (B, T, H); writes this layer's K/V at cache.length..+T (the caller advances cache.length)."""
        b, t, h = x.shape
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)  # (B, T, H)
        rows = self.post_attention_layernorm(x).view(b * t, h)  # (B*T, H)
        return x + self.mlp(rows).view(b, t, h)  # (B, T, H)


class TextDecoder(nn.Module):
    """Embedding table + decoder layers + final norm (the reference's ThinkerTextModel / TalkerModel body)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mrope_section = tuple(cfg.mrope_section)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (D/2,) fp32

    def _apply(self, fn, recurse=True):
        # keep the RoPE table fp32 (and real, after to_empty) whatever dtype/device the weights move to
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg, device=self.inv_freq.device)
        return self

    def reset_buffers(self) -> None:
        """Rebuild inv_freq after a meta-device build (called by the loader inside `with torch.device(...)`)."""
        self.inv_freq = rope_inv_freq(self.cfg, device=self.embed_tokens.weight.device)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, cache: KVCache) -> Tensor:
        """inputs_embeds (B, T, H), position_ids (3, B, T) -> hidden after the final norm (B, T, H).

        Appends T positions to the cache and advances cache.length by T.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be (B, T, {self.cfg.hidden_size}), got {tuple(inputs_embeds.shape)}")
        b, t, _ = inputs_embeds.shape
        if t == 0:
            raise ValueError("inputs_embeds has no positions (T == 0)")
        if tuple(position_ids.shape) != (3, b, t):
            raise ValueError(f"position_ids must be (3, {b}, {t}), got {tuple(position_ids.shape)}")
        if b != cache.batch:
            raise ValueError(f"batch {b} does not match the KV cache's batch {cache.batch}")
        if cache.length + t > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {t} positions exceed max_len {cache.max_len}")
        cos, sin = rope_cos_sin(self.inv_freq, self.mrope_section, position_ids)  # (B, T, D) fp32
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)  # (B, T, H)
        cache.length += t
        return self.norm(x)  # (B, T, H)


class Thinker(nn.Module):
    """Text decoder + vocabulary head, with the encoders attached under the checkpoint's names."""

    def __init__(self, cfg: DecoderConfig, audio_tower: nn.Module | None = None, visual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.embedding_size != cfg.hidden_size:
            raise ValueError(f"the Thinker's embedding_size ({cfg.embedding_size}) must equal hidden_size "
                             f"({cfg.hidden_size})")
        if audio_tower is not None:
            self.audio_tower = audio_tower
        if visual is not None:
            self.visual = visual
        self.model = TextDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            # the checkpoint stores only the embedding: fill lm_head from it on load, leave it out of state_dict
            self.register_load_state_dict_pre_hook(_fill_tied_head)
            self.register_load_state_dict_post_hook(_retie_head)
            self.register_state_dict_post_hook(_drop_tied_head)


def _fill_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    emb = state_dict.get(prefix + "model.embed_tokens.weight")
    head = state_dict.get(prefix + "lm_head.weight")
    if emb is None:
        return
    if head is None:
        state_dict[prefix + "lm_head.weight"] = emb
    elif head is not emb and not torch.equal(head, emb):
        error_msgs.append(f"{prefix}lm_head.weight differs from {prefix}model.embed_tokens.weight, but the config "
                          f"ties them (tie_word_embeddings): the checkpoint and its config disagree")


def _retie_head(module, incompatible_keys) -> None:
    module.lm_head.weight = module.model.embed_tokens.weight  # load_state_dict(assign=True) would untie them


def _drop_tied_head(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)


# ----------------------------------------------------------------------------------------------------------------
# Prefill / decode


def embed(thinker: Thinker, input_ids: Tensor) -> Tensor:
    """input_ids (B, T) long -> token embeddings (B, T, H)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    return thinker.model.embed_tokens(input_ids)  # (B, T, H)


@torch.no_grad()
def prefill(thinker: Thinker, cache: KVCache, inputs_embeds: Tensor, position_ids: Tensor,
            last_only: bool = True) -> tuple[Tensor, Tensor]:
    """Append a chunk of T positions -> (logits (B, V) of the last position, or (B, T, V); hidden (B, T, H)).

    Calling it chunk by chunk gives the same result as one call over the whole prompt.
    """
    hidden = thinker.model(inputs_embeds, position_ids, cache)  # (B, T, H)
    logits = thinker.lm_head(hidden[:, -1] if last_only else hidden)  # (B, V) or (B, T, V)
    return logits, hidden


@torch.no_grad()
def decode_step(thinker: Thinker, cache: KVCache, token_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """token_ids (B,) long, position_ids (3, B, 1) -> (logits (B, V), hidden (B, H))."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be (B,), got {tuple(token_ids.shape)}")
    x = thinker.model.embed_tokens(token_ids[:, None])  # (B, 1, H)
    hidden = thinker.model(x, position_ids, cache)[:, 0]  # (B, H)
    return thinker.lm_head(hidden), hidden  # (B, V), (B, H)
