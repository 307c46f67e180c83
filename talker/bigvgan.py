"""token2wav part 2: the BigVGAN vocoder, log-mel (mel_dim bins, 100 frames/s) -> 24 kHz waveform (Qwen2.5-Omni).

What is notable here:
- The input is the DiT's natural-log amplitude mel. The vocoder first maps it to dB (floor -115 dB, then -20 dB)
  and scales that to [-1, 1]; this is pointwise, so it does not widen the receptive field.
- `len(upsample_rates)` transposed-conv upsamplers (x240 in all for the official config), each followed by the
  mean of `len(resblock_kernel_sizes)` AMP residual blocks. Every activation is anti-aliased SnakeBeta:
  x2 kaiser-sinc upsample (replicate padding), x + sin^2(alpha x) / beta with log-scale alpha/beta, x2 kaiser-sinc
  downsample. The 12-tap filters are computed tables (the checkpoint does not store them): non-persistent buffers.
- No weight norm: the checkpoint stores plain conv weights. The output is clamped to [-1, 1].
- `receptive_field(cfg)` walks the layers backwards and returns how many mel frames to the left and right the
  samples of one frame depend on (34 / 34 for the official config). The streaming vocoder in `token2wav.py`
  overlaps its windows by exactly that much, so chunked output equals one-shot output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AA_RATIO = 2     # anti-aliased activations run at twice the rate (fixed in the architecture)
AA_KERNEL = 12   # taps of the kaiser-sinc up/down filters


@dataclass(frozen=True)
class BigVGANConfig:
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)

    @classmethod
    def from_dict(cls, d: dict) -> "BigVGANConfig":
        base = cls()
        cfg = cls(
            mel_dim=int(d.get("mel_dim", base.mel_dim)),
            upsample_initial_channel=int(d.get("upsample_initial_channel", base.upsample_initial_channel)),
            resblock_kernel_sizes=tuple(int(k) for k in d.get("resblock_kernel_sizes", base.resblock_kernel_sizes)),
            resblock_dilation_sizes=tuple(tuple(int(x) for x in ds)
                                          for ds in d.get("resblock_dilation_sizes", base.resblock_dilation_sizes)),
            upsample_rates=tuple(int(r) for r in d.get("upsample_rates", base.upsample_rates)),
            upsample_kernel_sizes=tuple(int(k) for k in d.get("upsample_kernel_sizes", base.upsample_kernel_sizes)),
        )
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise ValueError("BigVGAN: upsample_rates and upsample_kernel_sizes must have the same length")
        if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
            raise ValueError("BigVGAN: resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        return cfg

    @property
    def usable(self) -> bool:
        """False when the channel halvings reach zero (it builds, as the reference does, but cannot run)."""
        return self.upsample_initial_channel >> len(self.upsample_rates) >= 1

    @property
    def hop(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates)


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> Tensor:
    """Kaiser-windowed sinc low-pass, normalised to unit DC gain -> (1, 1, kernel_size)."""
    half = kernel_size // 2
    delta_f = 4 * half_width
    atten = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    if kernel_size % 2 == 0:
        t = torch.arange(-half, half) + 0.5
    else:
        t = torch.arange(kernel_size) - half
    filt = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    filt /= filt.sum()
    return filt.view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """x + sin^2(x e^alpha) / e^beta, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class AntiAliasedSnake(nn.Module):
    """Upsample x2 -> SnakeBeta -> downsample x2, with kaiser-sinc filters and replicate padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        r, k = AA_RATIO, AA_KERNEL
        self.up_pad = k // r - 1
        self.up_trim = (self.up_pad * r + (k - r) // 2, self.up_pad * r + (k - r + 1) // 2)
        self.down_pad = (k // 2 - int(k % 2 == 0), k // 2)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the computed filters; the meta-device loader calls this after assigning the weights."""
        r, k = AA_RATIO, AA_KERNEL
        self.register_buffer("up_filter", kaiser_sinc_filter(0.5 / r, 0.6 / r, k), persistent=False)
        self.register_buffer("down_filter", kaiser_sinc_filter(0.5 / r, 0.6 / r, k), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        C, r = x.shape[1], AA_RATIO
        x = F.pad(x, (self.up_pad, self.up_pad), mode="replicate")
        x = r * F.conv_transpose1d(x, self.up_filter.expand(C, -1, -1), stride=r, groups=C)  # (B, C, r T')
        x = x[..., self.up_trim[0]:-self.up_trim[1]]                                          # (B, C, r T)
        x = self.act(x)
        x = F.pad(x, self.down_pad, mode="replicate")
        return F.conv1d(x, self.down_filter.expand(C, -1, -1), stride=r, groups=C)           # (B, C, T)


class AMPBlock(nn.Module):
    """Residual stack: for each dilation d, x += conv_1(act(conv_d(act(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList([nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)
                                     for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                     for _ in dilations])
        self.activations = nn.ModuleList([AntiAliasedSnake(channels) for _ in range(2 * len(dilations))])

    def forward(self, x: Tensor) -> Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(self.activations[2 * i + 1](c1(self.activations[2 * i](x))))
        return x


class BigVGAN(nn.Module):
    """mel (1, mel_dim, T) -> waveform. State-dict keys equal `token2wav.code2wav_bigvgan_model.*`."""

    keep_fp32 = True  # token2wav runs in fp32 whatever the checkpoint dtype (the loader honours this)

    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_dim, c0, 7, 1, padding=3)
        # one extra ModuleList level per upsampler: the checkpoint keys are ups.{i}.0.*
        self.ups = nn.ModuleList([
            nn.ModuleList([nn.ConvTranspose1d(c0 >> i, c0 >> (i + 1), k, s, padding=(k - s) // 2)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))])
        self.resblocks = nn.ModuleList([
            AMPBlock(c0 >> (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
        c_last = c0 >> len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnake(c_last)
        self.conv_post = nn.Conv1d(c_last, 1, 7, 1, padding=3, bias=False)

    @staticmethod
    def normalize_mel(mel: Tensor) -> Tensor:
        """Natural-log amplitude mel -> dB (floor -115, minus 20) scaled to [-1, 1]."""
        min_level = torch.exp(torch.tensor(-115 / 20.0 * math.log(10), device=mel.device, dtype=mel.dtype))
        db = 20 * torch.log10(torch.clamp(torch.exp(mel), min=min_level)) - 20
        return torch.clamp(2 * ((db - (-115)) / 115) - 1, -1, 1)

    def forward(self, mel: Tensor) -> Tensor:  # (B, mel_dim, T) -> (B, 1, T * hop)
        x = self.conv_pre(self.normalize_mel(mel))                                         # (B, C0, T)
        n = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up[0](x)                                                                   # (B, C_i, T * rates[:i+1])
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        x = self.conv_post(self.activation_post(x))                                        # (B, 1, T * hop)
        return torch.clamp(x, min=-1.0, max=1.0)


@torch.no_grad()
def mel_to_wav(bigvgan: BigVGAN, mel: Tensor) -> Tensor:
    """mel (1, mel_dim, T) -> waveform (T * hop,) in [-1, 1]; equals the reference BigVGAN forward."""
    if not bigvgan.cfg.usable:
        raise ValueError(f"BigVGAN config unusable: upsample_initial_channel {bigvgan.cfg.upsample_initial_channel} "
                         f"leaves no channels after {len(bigvgan.cfg.upsample_rates)} halvings")
    if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != bigvgan.cfg.mel_dim or mel.shape[2] < 1:
        raise ValueError(f"mel must be (1, {bigvgan.cfg.mel_dim}, T >= 1), got {tuple(mel.shape)}")
    return bigvgan(mel)[0, 0]


def receptive_field(cfg: BigVGANConfig) -> tuple[int, int]:
    """(left, right): the samples of mel frame f depend on mel frames [f - left, f + right] and no others.

    Walks the layers from the output back to the mel, mapping an index interval through each one (same-padded
    convs widen it by their half-span, transposed convs map it back to input indices, the anti-aliased activation
    by its up/down filter spans). The three resblocks of a stage run in parallel, so the widest one counts.
    """
    def conv(a, b, half):
        return a - half, b + half

    def act(a, b):
        r, k = AA_RATIO, AA_KERNEL
        down_left = k // 2 - int(k % 2 == 0)
        a, b = a * r - down_left, b * r + k - 1 - down_left        # downsample: indices at the doubled rate
        pad = k // r - 1
        trim_left = pad * r + (k - r) // 2
        a, b = a + trim_left, b + trim_left                         # upsample: raw transposed-conv output
        return math.ceil((a - k + 1) / r) - pad, (b // r) - pad

    f = 10_000                      # any frame far from the edges
    a, b = f * cfg.hop, (f + 1) * cfg.hop - 1
    a, b = conv(a, b, 3)            # conv_post
    a, b = act(a, b)                # activation_post
    for s, k in reversed(list(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))):
        widest = 0
        for kern, dils in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
            lo = hi = 0
            for d in dils:
                lo, hi = act(lo, hi)
                lo, hi = conv(lo, hi, d * (kern - 1) // 2)
                lo, hi = act(lo, hi)
                lo, hi = conv(lo, hi, (kern - 1) // 2)
            widest = max(widest, -lo, hi)
        a, b = a - widest, b + widest
        p = (k - s) // 2            # transposed conv: output o reads inputs i with 0 <= o + p - i s < k
        a, b = math.ceil((a + p - k + 1) / s), (b + p) // s
    a, b = conv(a, b, 3)            # conv_pre
    return f - a, b - f
