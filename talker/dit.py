"""token2wav part 1: the flow-matching DiT that turns codec codes into an 80-bin log-mel (Qwen2.5-Omni).

What is notable here:
- Conditioning: an ECAPA-TDNN speaker encoder reads the speaker's reference mel, the x-vector `cond` is
  broadcast over time, and each codec code is embedded and repeated `repeats` times (one code -> 2 mel frames).
  These do not depend on the ODE state, so `prepare` builds them once per utterance (or streaming window);
  the reference recomputes all of them (the speaker encoder included) on every one of the ~40 evaluations.
- Classifier-free guidance runs the conditional and the null branch (zero reference mel, zero x-vector, code 0)
  as one batch of 2; the time embedding and the AdaLN modulations are computed once and broadcast.
- Attention is block-banded: frames are grouped in blocks of `block_size`; in layer i a frame sees the blocks
  `[-back, +ahead]` around its own, with back = 1 for `look_backward_layers`, ahead = 1 for `look_ahead_layers`,
  0 otherwise. Masks are built from absolute frame indices so a window starting on a block boundary sees the
  same partition as the whole utterance.
- RoPE rotates the first head only (a training quirk of the released checkpoint) and is interleaved: pairs
  (x0, x1), (x2, x3), ... rotate together. Rotated q/k are stored de-interleaved (evens then odds); q and k are
  permuted alike, so q.k is unchanged, and this is the exact layout the reference computes in.
- The solver is the reference's RK4 (3/8 rule) over sway-sampled time points. The initial noise is an explicit
  input, so streaming and one-shot runs can share it (`frame_noise` makes it a function of the absolute frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.thinker.config import rope_settings

TIME_FREQ_DIM = 256  # sinusoidal time-embedding width (fixed in the architecture, not in the config)


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int = 1024
    num_layers: int = 22
    num_heads: int = 16
    head_dim: int = 64
    ff_mult: float = 2
    emb_dim: int = 512                            # codec-code embedding width
    block_size: int = 24                          # mel frames per attention block
    look_ahead_layers: tuple[int, ...] = (10,)    # layers that also see the next block
    look_backward_layers: tuple[int, ...] = (0, 20)  # layers that also see the previous block
    repeats: int = 2                              # mel frames per codec code
    num_embeds: int = 8193                        # codes 0..num_embeds are valid (the table has one more row)
    mel_dim: int = 80
    enc_emb_dim: int = 192                        # speaker x-vector (`cond`) width
    enc_dim: int = 128                            # ECAPA speaker-encoder output width
    enc_channels: tuple[int, ...] = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        theta, _, rope_type = rope_settings(d)
        if rope_type != "default":
            raise ValueError(f"DiT: unsupported rope type {rope_type!r}")
        base = cls()
        tup = lambda k: tuple(int(x) for x in d.get(k, getattr(base, k)))  # noqa: E731
        cfg = cls(
            hidden_size=int(d.get("hidden_size", base.hidden_size)),
            num_layers=int(d.get("num_hidden_layers", base.num_layers)),
            num_heads=int(d.get("num_attention_heads", base.num_heads)),
            head_dim=int(d.get("head_dim", base.head_dim)),
            ff_mult=d.get("ff_mult", base.ff_mult),
            emb_dim=int(d.get("emb_dim", base.emb_dim)),
            block_size=int(d.get("block_size", base.block_size)),
            look_ahead_layers=tup("look_ahead_layers"),
            look_backward_layers=tup("look_backward_layers"),
            repeats=int(d.get("repeats", base.repeats)),
            num_embeds=int(d.get("num_embeds", base.num_embeds)),
            mel_dim=int(d.get("mel_dim", base.mel_dim)),
            enc_emb_dim=int(d.get("enc_emb_dim", base.enc_emb_dim)),
            enc_dim=int(d.get("enc_dim", base.enc_dim)),
            enc_channels=tup("enc_channels"),
            enc_kernel_sizes=tup("enc_kernel_sizes"),
            enc_dilations=tup("enc_dilations"),
            enc_attention_channels=int(d.get("enc_attention_channels", base.enc_attention_channels)),
            enc_res2net_scale=int(d.get("enc_res2net_scale", base.enc_res2net_scale)),
            enc_se_channels=int(d.get("enc_se_channels", base.enc_se_channels)),
            rope_theta=theta,
            max_position_embeddings=int(d.get("max_position_embeddings", base.max_position_embeddings)),
        )
        if not len(cfg.enc_channels) == len(cfg.enc_kernel_sizes) == len(cfg.enc_dilations):
            raise ValueError("DiT: enc_channels, enc_kernel_sizes and enc_dilations must have the same length")
        return cfg

    def layer_band(self, i: int) -> tuple[int, int]:
        """(blocks back, blocks ahead) that layer i attends to."""
        return int(i in self.look_backward_layers), int(i in self.look_ahead_layers)

    @property
    def blocks_back(self) -> int:
        """Blocks back one evaluation sees through all layers (the union bounds the receptive field)."""
        return sum(self.layer_band(i)[0] for i in range(self.num_layers))

    @property
    def blocks_ahead(self) -> int:
        return sum(self.layer_band(i)[1] for i in range(self.num_layers))


# ----------------------------------------------------------------------------------------------------------------
# ECAPA-TDNN speaker encoder (reference mel -> enc_dim vector)


class TDNN(nn.Module):
    """Conv1d with 'same' reflect padding + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, padding="same", padding_mode="reflect")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(
            [TDNN(channels // scale, channels // scale, kernel, dilation) for _ in range(scale - 1)])

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        out = [parts[0]]
        y = None
        for i in range(1, self.scale):
            y = self.blocks[i - 1](parts[i] if i == 1 else parts[i] + y)
            out.append(y)
        return torch.cat(out, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, 1)
        self.conv2 = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))  # (B, C, 1)
        return x * s


class SERes2NetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNN(cin, cout, 1, 1)
        self.res2net_block = Res2Net(cout, scale, kernel, dilation)
        self.tdnn2 = TDNN(cout, cout, 1, 1)
        self.se_block = SqueezeExcite(cout, se_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


def _weighted_stats(x: Tensor, w: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Mean and std of x (B, C, T) over time under weights w summing to 1 over T."""
    mean = (w * x).sum(2)                                                              # (B, C)
    std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(eps))          # (B, C)
    return mean, std


class AttentiveStatsPool(nn.Module):
    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNN(channels * 3, attention_channels, 1, 1)
        self.conv = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, 2C, 1)
        T = x.shape[-1]
        uniform = torch.full((x.shape[0], 1, T), 1.0 / T, dtype=x.dtype, device=x.device)
        mean, std = _weighted_stats(x, uniform)
        ctx = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, T), std.unsqueeze(2).expand(-1, -1, T)], dim=1)
        attn = torch.softmax(self.conv(torch.tanh(self.tdnn(ctx))), dim=2)                # (B, C, T)
        mean, std = _weighted_stats(x, attn)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class ECAPA(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels,
                                              ks[i], dil[i]))
        self.mfa = TDNN(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = nn.Conv1d(ch[-1] * 2, cfg.enc_dim, 1)

    def forward(self, mel: Tensor) -> Tensor:  # (B, T, mel_dim) -> (B, enc_dim)
        x = mel.transpose(1, 2)                                                            # (B, mel, T)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1))                                           # (B, C, T)
        return self.fc(self.asp(x)).squeeze(-1)                                           # (B, enc_dim)


# ----------------------------------------------------------------------------------------------------------------
# DiT backbone


class _Linear1(nn.Module):
    """Holder for a single `linear` child (checkpoint names `...attn_norm.linear.*`, `norm_out.linear.*`)."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.linear = nn.Linear(din, dout)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        inner = cfg.num_heads * cfg.head_dim
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(cfg.hidden_size, inner)
        self.to_k = nn.Linear(cfg.hidden_size, inner)
        self.to_v = nn.Linear(cfg.hidden_size, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.hidden_size)])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = _linear(x, self.to_q).view(B, T, self.heads, self.head_dim)                    # (B, T, H, D)
        k = _linear(x, self.to_k).view(B, T, self.heads, self.head_dim)                    # (B, T, H, D)
        v = _linear(x, self.to_v).view(B, T, self.heads, self.head_dim)                    # (B, T, H, D)
        for t in (q, k):  # fresh projections: head 0 is rotated in place, the other heads are left as they are
            t[:, :, 0] = _rope_interleaved(t[:, :, 0], cos, sin)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))                     # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                      # (B, H, T, D)
        return _linear(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim), self.to_out[0])


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """layer(x) for x (B, T, in) -> (B, T, out), computed weight-major as (W x^T + b)^T.

    Same products and sums (bit-identical here); at this module's shapes (96 rows x 1024-2048: the first streaming
    window with guidance) MKL runs the weight-major product ~12% faster on this AVX2 CPU, and no slower at 336 rows. The result is a transposed-layout view (rows stride 1), which elementwise ops and the
    next `_linear` take as they are (its transpose is contiguous again), so the feed-forward pair copies nothing.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])                                                      # (M, in)
    out = torch.addmm(layer.bias[:, None], layer.weight, rows.t())                         # (out, M)
    return out.t().view(*lead, -1)                                                         # (B, T, out)


def _rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i; output de-interleaved (rotated evens, then rotated odds)."""
    even, odd = x[..., 0::2], x[..., 1::2]                                                 # (B, T, D/2)
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)            # (B, T, D)


class DiTLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.attn_norm = _Linear1(h, 6 * h)
        self.attn = Attention(cfg)
        inner = int(h * cfg.ff_mult)
        # [Linear, GELU(tanh), Dropout, Linear] in the checkpoint: keys ff.ff.0 and ff.ff.3
        self.ff = nn.Module()
        self.ff.ff = nn.ModuleList([nn.Linear(h, inner), nn.GELU(approximate="tanh"), nn.Identity(),
                                    nn.Linear(inner, h)])

    def forward(self, x: Tensor, mod: "Modulation", cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """mod: this layer's adaptive-norm modulation for the current time (`DiT.modulation`)."""
        h = _layer_norm(x, mod.scale_a, mod.shift_a)                # LN(x) * (1 + scale) + shift, one kernel
        x = torch.addcmul(x, mod.gate_a, self.attn(h, cos, sin, mask))                    # x + gate * attn
        h = _layer_norm(x, mod.scale_f, mod.shift_f)
        up, act, _, down = self.ff.ff
        h = _linear(act(_linear(h, up)), down)
        return torch.addcmul(x, mod.gate_f, h)


def _layer_norm(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Affine-free LayerNorm (eps 1e-6) modulated as LN(x) * scale + shift; scale holds 1 + the modulation's scale."""
    return F.layer_norm(x, (x.shape[-1],), scale, shift, eps=1e-6)


@dataclass
class Modulation:
    """One layer's adaptive-norm modulation at one ODE time, each (h,); `scale_*` already hold 1 + scale."""
    shift_a: Tensor
    scale_a: Tensor
    gate_a: Tensor
    shift_f: Tensor
    scale_f: Tensor
    gate_f: Tensor

    @classmethod
    def from_linear(cls, out: Tensor) -> "Modulation":  # out (1, 6h): the layer's `attn_norm.linear` output
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = out[0].chunk(6)                # (h,) each
        return cls(shift_a.contiguous(), (1 + scale_a), gate_a.contiguous(), shift_f.contiguous(), (1 + scale_f),
                   gate_f.contiguous())


@dataclass
class Speaker:
    """Per-utterance speaker conditioning, one row per CFG branch (row 1 = the null branch)."""
    spk: Tensor    # (B, enc_dim)      ECAPA output on the reference mel (zeros in the null branch)
    cond: Tensor   # (B, enc_emb_dim)  x-vector (zeros in the null branch)


@dataclass
class DiTInputs:
    """Everything an ODE evaluation needs besides the noisy mel and the time; built once per window."""
    static: Tensor            # (B, T, hidden): input projection of [speaker enc | code embedding | x-vector] + bias
    cos: Tensor               # (T, head_dim / 2)
    sin: Tensor               # (T, head_dim / 2)
    masks: list[Tensor]       # per layer (T, T) bool, True = may attend
    guidance: float

    @property
    def cfg(self) -> bool:
        return self.static.shape[0] == 2


class DiT(nn.Module):
    """Codes -> mel velocity field. State-dict keys equal `token2wav.code2wav_dit_model.*`."""

    keep_fp32 = True  # token2wav runs in fp32 whatever the checkpoint dtype (the loader honours this)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.time_embed = nn.Module()
        self.time_embed.time_mlp = nn.ModuleList([nn.Linear(TIME_FREQ_DIM, h), nn.SiLU(), nn.Linear(h, h)])
        self.text_embed = nn.Module()
        self.text_embed.codec_embed = nn.Embedding(cfg.num_embeds + 1, cfg.emb_dim)
        self.input_embed = nn.Module()
        self.input_embed.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim, h)
        self.input_embed.spk_encoder = ECAPA(cfg)
        self.transformer_blocks = nn.ModuleList([DiTLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = _Linear1(h, 2 * h)
        self.proj_out = nn.Linear(h, cfg.mel_dim)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the computed RoPE table; the meta-device loader calls this after assigning the weights."""
        c = self.cfg
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._mod_cache: dict = {}  # time -> modulations (see `modulation`); weights changed: start afresh

    # -- per-utterance / per-window conditioning ------------------------------------------------------------

    def encode_speaker(self, cond: Tensor, ref_mel: Tensor, cfg: bool) -> Speaker:
        """cond (1, enc_emb_dim), ref_mel (1, T_ref, mel_dim) -> Speaker with 2 rows when cfg (guidance on)."""
        c = self.cfg
        if cond.dim() != 2 or cond.shape != (1, c.enc_emb_dim):
            raise ValueError(f"cond must be (1, {c.enc_emb_dim}), got {tuple(cond.shape)}")
        min_len = max(d * (k - 1) // 2 for k, d in zip(c.enc_kernel_sizes, c.enc_dilations)) + 1  # reflect pad
        if ref_mel.dim() != 3 or ref_mel.shape[0] != 1 or ref_mel.shape[2] != c.mel_dim or ref_mel.shape[1] < min_len:
            raise ValueError(f"ref_mel must be (1, T_ref >= {min_len}, {c.mel_dim}), got {tuple(ref_mel.shape)}")
        if cfg:
            cond = torch.cat([cond, torch.zeros_like(cond)], dim=0)                        # (2, enc_emb_dim)
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)], dim=0)               # (2, T_ref, mel)
        return Speaker(spk=self.input_embed.spk_encoder(ref_mel), cond=cond)

    def prepare(self, codes: Tensor, speaker: Speaker, guidance: float, start: int = 0) -> DiTInputs:
        """Conditioning for the mel frames [start, start + len(codes) * repeats) of an utterance.

        codes (T_codes,) long; `start` (a block boundary when windowing) fixes RoPE positions and the block grid.
        """
        c = self.cfg
        if codes.dim() != 1 or codes.numel() == 0:
            raise ValueError(f"codes must be a non-empty 1-D tensor, got shape {tuple(codes.shape)}")
        if codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > c.num_embeds:
            raise ValueError(f"codec codes must lie in [0, {c.num_embeds}] (got {lo}..{hi}); "
                             "strip control codes such as EOS before token2wav")
        T = codes.numel() * c.repeats
        if start + T > c.max_position_embeddings:
            raise ValueError(f"mel length {start + T} exceeds dit max_position_embeddings "
                             f"({c.max_position_embeddings}); synthesize shorter pieces")
        B = speaker.cond.shape[0]
        codes = codes.long()
        emb = self.text_embed.codec_embed(codes).repeat_interleave(c.repeats, dim=0)      # (T, emb_dim)
        emb = emb.unsqueeze(0)
        if B == 2:  # null branch: every code replaced by code 0
            emb = torch.cat([emb, self.text_embed.codec_embed.weight[:1].expand(1, T, -1)], dim=0)  # (2, T, emb)
        static = torch.cat([speaker.spk.unsqueeze(1).expand(-1, T, -1), emb,
                            speaker.cond.unsqueeze(1).expand(-1, T, -1)], dim=-1)          # (B, T, enc+emb+x)
        # the input projection is linear: its conditioning columns are applied here, once per window; each
        # evaluation adds only the noisy mel's columns (`forward`)
        proj = self.input_embed.proj
        static = F.linear(static, proj.weight[:, c.mel_dim:], proj.bias)                  # (B, T, h)
        pos = torch.arange(start, start + T, device=codes.device)
        freqs = pos[:, None].float() * self.inv_freq.to(codes.device)                     # (T, D/2)
        block = pos // c.block_size
        diff = block[None, :] - block[:, None]                                             # (T, T) key - query
        bands: dict[tuple[int, int], Tensor] = {}
        masks = []
        for i in range(c.num_layers):
            back, ahead = c.layer_band(i)
            if (back, ahead) not in bands:
                bands[(back, ahead)] = (diff >= -back) & (diff <= ahead)
            masks.append(bands[(back, ahead)])
        return DiTInputs(static=static, cos=freqs.cos(), sin=freqs.sin(), masks=masks, guidance=float(guidance))

    # -- one evaluation of the velocity field ----------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, inp: DiTInputs) -> Tensor:
        """x (1, T, mel) noisy mel, t 0-d time in [0, 1] -> (B, T, mel) velocity per CFG branch."""
        mods, (out_scale, out_shift) = self.modulation(t, x.dtype)
        mel_cols = self.input_embed.proj.weight[:, :self.cfg.mel_dim]                      # (h, mel)
        h = inp.static + F.linear(x, mel_cols)                                             # (B, T, h)
        for layer, mod, mask in zip(self.transformer_blocks, mods, inp.masks):
            h = layer(h, mod, inp.cos, inp.sin, mask)
        h = _layer_norm(h, out_scale, out_shift)
        return self.proj_out(h)                                                            # (B, T, mel)

    def modulation(self, t: Tensor, dtype: torch.dtype) -> tuple[list[Modulation], tuple[Tensor, Tensor]]:
        """Per-layer adaptive-norm modulations and the output norm's (1 + scale, shift), each (h,), for time t.

        They depend on t alone, and the solver visits the same ~28 time points in every window, so they are
        computed once per (t, dtype) and reused: the same ops on the same inputs, bit-identical, but the 22 x 6h x h
        matrix-vector products (~0.5 GB of weights read per evaluation at the official size) run once per time
        point instead of once per evaluation of every streaming window.
        """
        w = self.norm_out.linear.weight
        # in-place weight updates (load_state_dict) bump the version counter; inference tensors have none
        version = -1 if w.is_inference() else w._version
        key = (float(t), dtype, w.device, id(w), version)
        hit = None if torch.is_grad_enabled() else self._mod_cache.get(key)
        if hit is None:
            t_act = F.silu(self._time_embedding(t.reshape(1).to(dtype)))                  # (1, h)
            scale, shift = self.norm_out.linear(t_act)[0].chunk(2)                          # (h,) each
            hit = ([Modulation.from_linear(layer.attn_norm.linear(t_act)) for layer in self.transformer_blocks],
                   (1 + scale, shift.contiguous()))
            if torch.is_grad_enabled():
                return hit
            if len(self._mod_cache) >= 256:  # a few solver schedules at most; never grows without bound
                self._mod_cache.clear()
            self._mod_cache[key] = hit
        return hit

    def _time_embedding(self, t: Tensor) -> Tensor:  # (1,) -> (1, h)
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        arg = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)                                   # (1, half)
        h = torch.cat([arg.sin(), arg.cos()], dim=-1).to(t.dtype)                          # (1, 256)
        for layer in self.time_embed.time_mlp:
            h = layer(h)
        return h

    def velocity(self, x: Tensor, t: Tensor, inp: DiTInputs) -> Tensor:
        """Guided velocity (1, T, mel): v_cond + (v_cond - v_null) * guidance."""
        v = self(x, t, inp)
        if not inp.cfg:
            return v
        guided, null = v[:1], v[1:]
        return guided + (guided - null) * inp.guidance


# ----------------------------------------------------------------------------------------------------------------
# ODE solver and the one-shot entry point


def sway_time_points(steps: int, sway: float | None, device=None) -> Tensor:
    """`steps` time points on [0, 1], bent towards 0 by sway sampling (t + s (cos(pi t / 2) - 1 + t))."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (time points include both ends), got {steps}")
    t = torch.linspace(0, 1, steps, device=device, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


@torch.no_grad()
def solve(dit: DiT, inp: DiTInputs, noise: Tensor, steps: int = 10, sway: float | None = -1.0) -> Tensor:
    """Integrate dx/dt = velocity from the noise at t=0 to t=1 with RK4 (3/8 rule); noise (1, T, mel)."""
    ts = sway_time_points(steps, sway, noise.device)
    third = 1 / 3
    x = noise
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        k1 = dit.velocity(x, t0, inp)
        k2 = dit.velocity(x + dt * k1 * third, t0 + dt * third, inp)
        k3 = dit.velocity(x + dt * (k2 - k1 * third), t0 + dt * (2 / 3), inp)
        k4 = dit.velocity(x + dt * (k1 - k2 + k3), t1, inp)
        x = x + (k1 + 3 * (k2 + k3) + k4) * dt / 8
    return x                                                                               # (1, T, mel)


@torch.no_grad()
def code_to_mel(dit: DiT, codes: Tensor, cond: Tensor, ref_mel: Tensor, noise: Tensor, steps: int = 10,
                guidance: float = 0.5, sway: float | None = -1.0) -> Tensor:
    """codes (T_codes,) -> log-mel (1, mel_dim, T_codes * repeats), from the initial noise (1, T_mel, mel_dim).

    Same as the reference `Qwen2_5OmniToken2WavDiTModel.sample` when its `torch.randn` draw equals `noise`.
    """
    T = codes.numel() * dit.cfg.repeats
    if noise.shape != (1, T, dit.cfg.mel_dim):
        raise ValueError(f"noise must be (1, {T}, {dit.cfg.mel_dim}) for {codes.numel()} codes, "
                         f"got {tuple(noise.shape)}")
    speaker = dit.encode_speaker(cond, ref_mel, cfg=guidance >= 1e-5)
    inp = dit.prepare(codes, speaker, guidance)
    return solve(dit, inp, noise, steps, sway).transpose(1, 2)                             # (1, mel, T)


def frame_noise(seed: int, start: int, end: int, mel_dim: int, block_size: int, device=None) -> Tensor:
    """Standard-normal noise for mel frames [start, end) as a function of the absolute frame index.

    Drawn per block of `block_size` frames from a generator seeded by (seed, block), so a streaming window and
    a whole-utterance run see the same noise wherever they overlap. -> (1, end - start, mel_dim)
    """
    if end <= start:
        return torch.zeros(1, 0, mel_dim, device=device)
    first, last = start // block_size, (end - 1) // block_size
    g = torch.Generator()
    blocks = []
    for b in range(first, last + 1):
        g.manual_seed((int(seed) << 24) + b)
        blocks.append(torch.randn(block_size, mel_dim, generator=g))
    noise = torch.cat(blocks)[start - first * block_size:end - first * block_size]        # (end - start, mel)
    return noise.unsqueeze(0).to(device)
