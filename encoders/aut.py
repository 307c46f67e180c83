"""Qwen3-Omni's AuT audio encoder (`thinker.audio_tower.*`): 12.5 tokens per second of audio.

Checked against the reference `Qwen3OmniMoeAudioEncoder` (transformers 5.23). What it does:
- The log-mel frames (100 per second) of each audio are cut into chunks of 2 * n_window frames (1 s; the last one
  shorter). Each chunk goes through three 3x3 stride-2 Conv2d + GELU over (mel, time) on its own, so 100 frames
  become 13 tokens (`num_aut_tokens`); `conv_out` flattens channels x mel bins to d_model, and sinusoidal
  positions are added per chunk (they restart at 0 in every chunk).
- The chunks of one call are padded with zeros to the longest chunk among them before the convolutions, as the
  reference batches them. A short last chunk of odd length then reads, in its second and third convolutions,
  rows computed from that padding (GELU of the bias), not the convolution's own zero edge: a small difference
  that we reproduce. The reference encodes all audios of a prompt in one call, so the rule is per call -- a
  sub-second audio alone is not padded, beside a longer one it is -- and `encode` takes the list of audios.
- The valid tokens of each audio are concatenated and attention runs inside windows of
  (tokens of the longest chunk) x (n_window_infer / (2 * n_window)) tokens -- 104 tokens = 8 s with the official
  numbers --, never across windows or audios. Then ln_post, proj1, GELU, proj2 to the Thinker's width.
- Streaming: each 8 s window is independent of everything after it (once a full chunk exists, the padding rule
  is fixed), so a stream can encode window by window and get the one-shot result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.encoders.audio import _ACTIVATIONS, sinusoids

__all__ = ["AuTConfig", "AuTEncoder", "num_aut_tokens"]


@dataclass(frozen=True)
class AuTConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    downsample_hidden_size: int = 480
    n_window: int = 50                  # half a chunk in mel frames: chunks are 2 * n_window frames (1 s)
    n_window_infer: int = 800           # attention window in mel frames (8 s)
    conv_chunksize: int = 500           # chunks per convolution batch (memory only)
    output_dim: int = 2048              # the Thinker's hidden size
    max_source_positions: int = 1500
    activation_function: str = "gelu"   # of the feed-forward block and between proj1 and proj2
    layer_norm_eps: float = 1e-5        # nn.LayerNorm default; the reference does not configure it

    @classmethod
    def from_dict(cls, d: dict) -> AuTConfig:
        """From `thinker_config.audio_config` of a Qwen3-Omni config.json (defaults: the reference's)."""
        defaults = cls()
        cfg = cls(**{f: type(getattr(defaults, f))(d[f]) for f in cls.__dataclass_fields__
                     if f in d and f != "layer_norm_eps"})
        if cfg.d_model % cfg.encoder_attention_heads:
            raise ValueError(f"audio_config: d_model {cfg.d_model} is not divisible by "
                             f"{cfg.encoder_attention_heads} heads")
        if cfg.d_model % 2 or cfg.d_model < 4:
            raise ValueError(f"audio_config: d_model must be even and >= 4 (sinusoidal positions), got {cfg.d_model}")
        if cfg.n_window < 1 or cfg.n_window_infer < 2 * cfg.n_window:
            raise ValueError(f"audio_config: n_window {cfg.n_window} and n_window_infer {cfg.n_window_infer} must "
                             "give an attention window of at least one chunk")
        if cfg.activation_function not in _ACTIVATIONS:
            raise ValueError(f"audio_config: unsupported activation_function {cfg.activation_function!r}")
        if d.get("scale_embedding"):
            raise ValueError("audio_config: scale_embedding is not supported (no Qwen3-Omni checkpoint sets it)")
        return cfg

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def conv_mel_bins(self) -> int:
        """Mel bins left after the three stride-2 convolutions."""
        return (((self.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2


def _after_convs(n: Tensor | int):
    """Rows left of n frames after three stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(3):
        n = (n - 1) // 2 + 1
    return n


def num_aut_tokens(n_frames: int, n_window: int = 50) -> int:
    """Encoder tokens for n mel frames: 13 per full 1 s chunk (official n_window), the rest by the conv rule."""
    if n_frames < 1:
        return 0
    full, rest = divmod(n_frames, 2 * n_window)
    return full * _after_convs(2 * n_window) + (_after_convs(rest) if rest else 0)


class AuTAttention(nn.Module):
    def __init__(self, cfg: AuTConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: Tensor, windows: list[tuple[int, int]]) -> Tensor:
        """x (N, d) -> (N, d); attention only inside each [start, end) window."""
        n, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(n, h, hd).transpose(0, 1)  # (h, N, hd)
        k = self.k_proj(x).view(n, h, hd).transpose(0, 1)
        v = self.v_proj(x).view(n, h, hd).transpose(0, 1)
        out = torch.empty_like(q)  # (h, N, hd)
        by_size: dict[int, list[int]] = {}
        for a, b in windows:
            by_size.setdefault(b - a, []).append(a)
        for size, starts in by_size.items():  # equal-size windows run as one batch
            idx = (torch.tensor(starts, device=x.device)[:, None] + torch.arange(size, device=x.device)).reshape(-1)
            qs, ks, vs = (t[:, idx].view(h, len(starts), size, hd).transpose(0, 1) for t in (q, k, v))  # (W, h, s, hd)
            o = F.scaled_dot_product_attention(qs, ks, vs)  # (W, h, s, hd), no mask inside a window
            out[:, idx] = o.transpose(0, 1).reshape(h, -1, hd)
        return self.out_proj(out.transpose(0, 1).reshape(n, d))  # (N, d)


class AuTLayer(nn.Module):
    def __init__(self, cfg: AuTConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = AuTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.activation_function]

    def forward(self, x: Tensor, windows: list[tuple[int, int]]) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)  # (N, d)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))  # (N, d)


class AuTEncoder(nn.Module):
    """state_dict keys == the checkpoint's keys under `thinker.audio_tower.`."""

    def __init__(self, cfg: AuTConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.downsample_hidden_size, cfg.d_model
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, d), persistent=False)
        self.layers = nn.ModuleList(AuTLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv_out = nn.Linear(c * cfg.conv_mel_bins, d, bias=False)
        self.proj1 = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, cfg.output_dim)
        self.act = _ACTIVATIONS[cfg.activation_function]

    def reset_buffers(self) -> None:
        """Rebuild the computed position table (the loader builds modules on meta; see omnivox.loading)."""
        self.positional_embedding = sinusoids(self.cfg.max_source_positions, self.cfg.d_model)

    def _chunks(self, chunks: Tensor) -> Tensor:
        """(C, n_mels, F) zero-padded chunks -> (C, F', d) per-chunk tokens with positions (padding rows too)."""
        x = chunks[:, None].to(device=self.conv2d1.weight.device, dtype=self.conv2d1.weight.dtype)  # (C, 1, M, F)
        outs = []
        for part in x.split(self.cfg.conv_chunksize, dim=0):
            y = F.gelu(self.conv2d1(part))
            y = F.gelu(self.conv2d2(y))
            outs.append(F.gelu(self.conv2d3(y)))  # (c, ch, M', F')
        y = torch.cat(outs, dim=0)
        n, ch, m, f = y.shape
        y = self.conv_out(y.permute(0, 3, 1, 2).reshape(n, f, ch * m))  # (C, F', d)
        return y + self.positional_embedding[:f].to(y.dtype)  # positions restart in every chunk

    @torch.no_grad()
    def encode(self, features: list[Tensor]) -> list[Tensor]:
        """Log-mel features of the audios of one prompt, each (n_mels, L_i) -> tokens (num_aut_tokens(L_i),
        output_dim) each, encoded together as the reference encodes a prompt's audios."""
        cfg = self.cfg
        if not features:
            return []
        for f in features:
            if f.dim() != 2 or f.shape[0] != cfg.num_mel_bins or f.shape[1] < 1:
                raise ValueError(f"features must be (n_mels={cfg.num_mel_bins}, frames >= 1), got {tuple(f.shape)}")
        cf = cfg.chunk_frames
        pieces = [p for f in features for p in f.split(cf, dim=1)]  # chunk by chunk, each (M, <= cf)
        longest = max(p.shape[1] for p in pieces)
        padded = torch.stack([F.pad(p, (0, longest - p.shape[1])) for p in pieces])  # (C, M, longest)
        hidden = self._chunks(padded)  # (C, F', d)
        valid = [_after_convs(p.shape[1]) for p in pieces]  # tokens of each chunk
        rows, per_audio, c = [], [], 0
        for f in features:
            n_chunks = -(-f.shape[1] // cf)
            rows += [hidden[c + j, :valid[c + j]] for j in range(n_chunks)]
            per_audio.append(sum(valid[c:c + n_chunks]))
            c += n_chunks
        x = torch.cat(rows, dim=0)  # (N, d): every audio's tokens, in order
        window = max(valid) * (cfg.n_window_infer // cf)  # tokens per attention window
        windows, start = [], 0
        for n in per_audio:
            windows += [(a, min(a + window, start + n)) for a in range(start, start + n, window)]
            start += n
        for layer in self.layers:
            x = layer(x, windows)
        x = self.proj2(self.act(self.proj1(self.ln_post(x))))  # (N, output_dim)
        return list(x.split(per_audio, dim=0))

    def forward(self, features: Tensor) -> Tensor:
        return self.encode([features])[0]
