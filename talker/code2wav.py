"""Code2Wav (Qwen3-Omni): the causal ConvNet that turns codec frames of all codebooks into 24 kHz audio.

What is notable here:
- Pipeline, re-stated from the reference's `Qwen3OmniMoeCode2Wav` (transformers 5.23): the Q codes of a frame
  are looked up in one table (codebook q at offset q * codebook_size) and *averaged*; a small pre-transformer
  (RMSNorm, sliding-window causal attention with RoPE, SwiGLU, per-channel layer scales) runs over the frames;
  two transposed convolutions with kernel == stride, each followed by a ConvNeXt block, upsample ×4; then a
  causal conv, decoder blocks (SnakeBeta, transposed conv with kernel 2·r and stride r, three residual units with
  dilations 1, 3, 9), SnakeBeta, a causal conv to one channel, clamp to [-1, 1].
- Everything is causal or has a bounded look-back, so a prefix of frames fixes a prefix of samples, and
  `Code2WavState` lets frames arrive in chunks of any size (one frame included) with output equal to a one-shot
  decode of all frames. What each layer keeps between chunks:
    causal conv (kernel k, dilation d)      the last (k - 1)·d input samples (zeros at the start = the left pad)
    transposed conv, kernel 2r, stride r    the last input sample: output block j needs inputs j and j + 1
    transposed conv, kernel r, stride r     nothing
    sliding-window attention (window w)     keys/values of the last w - 1 frames, and the frame count (RoPE)
  The one-shot decode is this same code with one chunk, so there is one code path.
- The kernel-2r transposed convolutions trim r samples at both ends (the reference's `CausalTransConvNet`), so
  each holds one input sample back: N frames give N·1920 - 555 samples for the real config, not N·1920
  (`samples_for_frames`). Streaming emits exactly those samples: the first frame yields 1365 samples (57 ms at
  24 kHz) before a second frame exists; each later frame yields 1920 (80 ms).
- The reference's `generate` decodes with `chunked_decode(chunk_size=300, left_context_size=25)`: exact up to 300
  frames (24 s), an approximation past that (each 300-frame chunk restarts with 25 frames of context and loses its
  last 555 samples). Ours stays the exact causal decode at any length.
- `keep_fp32 = True`: the loader keeps these weights in float32 whatever the Thinker's dtype (0.22B parameters;
  the vocoder's output is small and precision-sensitive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.thinker.config import rope_settings
from omnivox.thinker.model import MLP, RMSNorm

SAMPLE_RATE = 24000  # Hz; not stored in the config (the report and the reference's processor say 24 kHz)


@dataclass(frozen=True)
class Code2WavConfig:
    codebook_size: int               # codes per codebook
    num_quantizers: int              # codebooks per frame (= the Talker's num_code_groups)
    hidden_size: int                 # pre-transformer width
    num_layers: int                  # pre-transformer layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int           # pre-transformer SwiGLU width
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int              # a frame attends to itself and the previous sliding_window - 1 frames
    upsampling_ratios: tuple[int, ...]   # transposed conv (kernel == stride) + ConvNeXt, after the transformer
    upsample_rates: tuple[int, ...]      # decoder blocks (transposed conv kernel 2r, stride r)
    decoder_dim: int                 # decoder width; halved by each decoder block
    attention_bias: bool = False
    layer_scale_initial_scale: float = 0.01  # only the init value of the stored layer scales
    max_position_embeddings: int = 8000      # the reference's nominal limit; RoPE here has none

    @classmethod
    def from_dict(cls, d: dict) -> "Code2WavConfig":
        theta, _, rope_type = rope_settings(d)
        if rope_type != "default":
            raise ValueError(f"code2wav_config: unsupported rope type {rope_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"code2wav_config: unsupported hidden_act {d.get('hidden_act')!r}")
        try:
            heads = int(d["num_attention_heads"])
            cfg = cls(
                codebook_size=int(d["codebook_size"]), num_quantizers=int(d["num_quantizers"]),
                hidden_size=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                intermediate_size=int(d["intermediate_size"]), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=theta, sliding_window=int(d["sliding_window"]),
                upsampling_ratios=tuple(int(r) for r in d["upsampling_ratios"]),
                upsample_rates=tuple(int(r) for r in d["upsample_rates"]), decoder_dim=int(d["decoder_dim"]),
                attention_bias=bool(d.get("attention_bias", False)),
                layer_scale_initial_scale=float(d.get("layer_scale_initial_scale", 0.01)),
                max_position_embeddings=int(d.get("max_position_embeddings", 8000)),
            )
        except KeyError as e:
            raise ValueError(f"code2wav_config lacks {e}") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"code2wav_config: num_attention_heads {cfg.num_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_kv_heads}")
        if cfg.sliding_window < 1:
            raise ValueError(f"code2wav_config: sliding_window must be >= 1, got {cfg.sliding_window}")
        if cfg.decoder_dim % 2 ** len(cfg.upsample_rates):
            raise ValueError(f"code2wav_config: decoder_dim {cfg.decoder_dim} cannot be halved "
                             f"{len(cfg.upsample_rates)} times")
        return cfg

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsampling_ratios) * math.prod(self.upsample_rates)

    def samples_for_frames(self, n: int) -> int:
        """Samples a decode of n frames yields (the kernel-2r transposed convolutions hold one input back each)."""
        if n <= 0:
            return 0
        length = n * math.prod(self.upsampling_ratios)
        for r in self.upsample_rates:
            length = max(length - 1, 0) * r
        return length


# ----------------------------------------------------------------------------------------------------------------
# Streaming state


@dataclass
class Code2WavState:
    """What a chunked decode carries from one chunk to the next (module docstring); `reset()` starts over."""
    frames: int = 0                                           # frames decoded so far (the next RoPE position)
    attn_k: list = field(default_factory=list)                # per layer (1, Hkv, <= w-1, D) keys after RoPE
    attn_v: list = field(default_factory=list)                # per layer (1, Hkv, <= w-1, D)
    conv: dict = field(default_factory=dict)                  # id(layer) -> (1, C, k_eff - 1) last inputs
    last: dict = field(default_factory=dict)                  # id(layer) -> (1, C, 1) last input (kernel-2r)

    def reset(self) -> None:
        self.frames = 0
        self.attn_k.clear()
        self.attn_v.clear()
        self.conv.clear()
        self.last.clear()


# ----------------------------------------------------------------------------------------------------------------
# Convolutions (parameter names as the checkpoint: `<name>.conv.weight`)


class CausalConv(nn.Module):
    """Conv1d (stride 1) with its whole receptive field on the left: out[t] depends on in[.. t]."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups)
        self.context = (kernel - 1) * dilation  # input samples of look-back

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        """x (1, C, T) new samples -> (1, C', T)."""
        prev = state.conv.get(id(self))
        if prev is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], self.context)  # (1, C, K-1) the reference's left pad
        z = torch.cat([prev, x], dim=-1)  # (1, C, K-1+T)
        if self.context:
            state.conv[id(self)] = z[..., z.shape[-1] - self.context:]
        return self.conv(z)  # (1, C', T)


class UpsampleConv(nn.Module):
    """ConvTranspose1d with kernel == stride: every input sample becomes `stride` output samples, no overlap."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, factor, stride=factor)

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        return self.conv(x)  # (1, C', T * factor)


class OverlapUpsampleConv(nn.Module):
    """ConvTranspose1d kernel 2r, stride r, r samples trimmed at each end (the reference's CausalTransConvNet).

    Output block j (r samples) sums inputs j and j + 1, so N inputs give (N - 1)·r samples; a chunk is decoded
    together with the previous chunk's last input, which yields exactly the blocks that became complete.
    """

    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, 2 * rate, stride=rate)
        self.rate = rate

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        """x (1, C, T) -> (1, C', (T - 1)·r) for the first chunk, (1, C', T·r) after."""
        prev = state.last.get(id(self))
        z = x if prev is None else torch.cat([prev, x], dim=-1)  # (1, C, T or T+1)
        state.last[id(self)] = z[..., -1:]
        if z.shape[-1] < 2:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        y = self.conv(z)  # (1, C', (len(z) + 1)·r)
        return y[..., self.rate:y.shape[-1] - self.rate]  # (1, C', (len(z) - 1)·r)


class SnakeBeta(nn.Module):
    """x + 1/(exp(beta) + 1e-9) · sin²(exp(alpha) · x), per channel (alpha, beta stored in log scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, state: Code2WavState | None = None) -> Tensor:
        alpha = torch.exp(self.alpha)[None, :, None]  # (1, C, 1)
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        """x (1, C, T) -> (1, C, T)."""
        h = self.dwconv(x, state).transpose(1, 2)  # (1, T, C)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))  # (1, T, C)
        return x + (self.gamma * h).transpose(1, 2)  # (1, C, T)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), state)), state)  # (1, C, T)


class DecoderBlock(nn.Module):
    """`block`: SnakeBeta, kernel-2r transposed conv (C -> C/2), residual units with dilations 1, 3, 9."""

    def __init__(self, cin: int, rate: int):
        super().__init__()
        cout = cin // 2
        self.block = nn.ModuleList([SnakeBeta(cin), OverlapUpsampleConv(cin, cout, rate)]
                                   + [ResidualUnit(cout, d) for d in (1, 3, 9)])

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        for layer in self.block:
            x = layer(x, state)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Pre-transformer (sliding-window attention over frames)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class WindowAttention(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: Code2WavState, layer_idx: int) -> Tensor:
        """x (1, T, H) new frames, cos/sin (T, D) at their absolute positions -> (1, T, H)."""
        cfg = self.cfg
        b, t, _ = x.shape
        d, w = cfg.head_dim, cfg.sliding_window
        q = self.q_proj(x).view(b, t, cfg.num_heads, d).transpose(1, 2)  # (1, Hq, T, D)
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, d).transpose(1, 2)  # (1, Hkv, T, D)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, d).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        past = state.attn_k[layer_idx].shape[2] if layer_idx < len(state.attn_k) else 0
        if past:
            k = torch.cat([state.attn_k[layer_idx], k], dim=2)  # (1, Hkv, P+T, D)
            v = torch.cat([state.attn_v[layer_idx], v], dim=2)
        keep_k, keep_v = k[:, :, max(0, k.shape[2] - (w - 1)):], v[:, :, max(0, v.shape[2] - (w - 1)):]
        if layer_idx < len(state.attn_k):
            state.attn_k[layer_idx], state.attn_v[layer_idx] = keep_k, keep_v
        else:
            state.attn_k.append(keep_k)
            state.attn_v.append(keep_v)
        # query i (absolute frame past+i) sees key j (absolute past_start+j) iff 0 <= qpos - kpos < w
        qpos = torch.arange(past, past + t, device=x.device)[:, None]  # (T, 1) relative to the first kept key
        kpos = torch.arange(past + t, device=x.device)[None, :]  # (1, P+T)
        mask = (kpos <= qpos) & (kpos > qpos - w)  # (T, P+T)
        groups = cfg.num_heads // cfg.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (1, Hq, P+T, D)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_heads * d))  # (1, T, H)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) * cos + rotate_half(x) * sin, cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = WindowAttention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: Code2WavState, layer_idx: int) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, state, layer_idx))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))  # (1, T, H)


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, state: Code2WavState) -> Tensor:
        """x (1, T, H) new frames -> (1, T, H)."""
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
        pos = torch.arange(state.frames, state.frames + x.shape[1], device=x.device, dtype=torch.float32)  # (T,)
        freqs = pos[:, None] * inv_freq  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, state, i)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# Code2Wav


class Code2Wav(nn.Module):
    """Parameter names equal the checkpoint's keys under `code2wav.`."""
    keep_fp32 = True

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.pre_transformer = PreTransformer(cfg)
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, h)
        self.upsample = nn.ModuleList(nn.ModuleList([UpsampleConv(h, h, r), ConvNeXtBlock(h)])
                                      for r in cfg.upsampling_ratios)
        layers = [CausalConv(h, cfg.decoder_dim, 7)]
        dim = cfg.decoder_dim
        for r in cfg.upsample_rates:
            layers.append(DecoderBlock(dim, r))
            dim //= 2
        layers += [SnakeBeta(dim), CausalConv(dim, 1, 7)]
        self.decoder = nn.ModuleList(layers)

    def new_state(self) -> Code2WavState:
        return Code2WavState()

    def forward(self, codes: Tensor, state: Code2WavState | None = None) -> Tensor:
        """codes (1, Q, T) long (T >= 1 new frames) -> waveform (1, 1, S) float in [-1, 1].

        Without a state: a one-shot decode of all frames. With one: the samples these T frames complete after
        the frames already decoded through that state (state updated in place).
        """
        cfg = self.cfg
        if codes.dim() != 3 or codes.shape[0] != 1 or codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"codes must be (1, {cfg.num_quantizers}, T) (batch 1, one row per codebook), "
                             f"got {tuple(codes.shape)}")
        if codes.shape[2] < 1:
            raise ValueError("codes hold no frame (T == 0)")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size:
            raise ValueError(f"codes must lie in 0..{cfg.codebook_size - 1} (codebook_size); got values "
                             f"{int(codes.min())}..{int(codes.max())} (a Talker EOS or control id?)")
        if state is None:
            state = Code2WavState()
        offset = torch.arange(cfg.num_quantizers, device=codes.device)[None, :, None] * cfg.codebook_size
        hidden = self.code_embedding(codes.long() + offset).mean(1)  # (1, T, H)
        hidden = self.pre_transformer(hidden, state)  # (1, T, H)
        state.frames += codes.shape[2]
        x = hidden.transpose(1, 2)  # (1, H, T)
        for up, block in self.upsample:
            x = block(up(x, state), state)  # (1, H, T * r)
        for layer in self.decoder:
            x = layer(x, state)
        return x.clamp(min=-1, max=1)  # (1, 1, S)


@torch.no_grad()
def code2wav_stream(code2wav: Code2Wav, frames, state: Code2WavState | None = None):
    """Generator: for each chunk of frames (1, Q, T) from `frames`, the waveform samples (S,) it completes."""
    state = state if state is not None else Code2WavState()
    for chunk in frames:
        yield code2wav(chunk, state)[0, 0]
