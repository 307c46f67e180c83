"""Qwen2.5-Omni audio encoder (`thinker.audio_tower.*`), one-shot and streaming.

Whisper-style: conv(3) + GELU, conv(3, stride 2) + GELU, sinusoidal positions, pre-LN transformer layers,
stride-2 average pooling, LayerNorm, projection to the LLM width: one token per 4 mel frames (40 ms).

What is notable (checked against the reference `Qwen2_5OmniAudioEncoder`):
- The mel frames are cut into windows of 2 * n_window frames (the last one shorter) and each window is encoded
  on its own: the convolutions see zeros past the window edges, positions restart at 0 in every window and
  attention never crosses a window. So windows can be batched, and a stream can encode each 2 s window as soon
  as it is complete -- chunked output equals the one-shot output.
- Pooling pairs are taken over the concatenated windows of one audio (a pair can straddle two windows when
  n_window is odd); an odd last hidden row is dropped. Pooling comes before ln_post.
- `audio_bos_eos_token` is stored in the checkpoint but not used by the encoder; `scale_embedding` is read but,
  as in the reference, never applied. The positional table is computed, not stored.

Features come from `audio_features` (log_mel / the mel stream); `AudioEncoderSession` joins the two for streaming:
`push` returns each window's tokens once n_fft/2 - hop samples (2.5 ms) past its end have arrived, `finish` the
rest. The features' dynamic-range
floor depends on the loudest frame of the whole clip, so windows emitted before a louder moment can differ from
one-shot (`state.clamp_error` says by how much in feature units); with keep_history=True, `revisions()` after
finish re-encodes just those windows, and applying them makes the stream equal to one-shot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnivox.encoders.audio_features import (FeatureConfig, MelStreamState, load_audio, log_mel, mel_finish,
                                             mel_push, mel_revisions, new_mel_stream, pcm16_to_float)

__all__ = [
    "AudioEncoderConfig", "AudioEncoder", "AudioStreamState", "AudioEncoderSession", "FeatureConfig",
    "new_stream", "stream_push", "stream_finish", "stream_revisions", "log_mel", "load_audio", "pcm16_to_float",
    "num_audio_tokens",
]

WINDOW_BATCH = 32   # windows encoded together in the one-shot path (64 s of audio)


@dataclass(frozen=True)
class AudioEncoderConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    n_window: int = 100                 # half a window in mel frames: windows are 2 * n_window frames (2 s)
    output_dim: int = 3584              # the Thinker's hidden size
    max_source_positions: int = 1500    # rows of the sinusoidal position table
    activation_function: str = "gelu"   # of the feed-forward block (the convolutions always use exact GELU)
    scale_embedding: bool = False       # read for completeness; the reference never applies it
    layer_norm_eps: float = 1e-5        # nn.LayerNorm default, the reference does not configure it

    @classmethod
    def from_dict(cls, d: dict) -> "AudioEncoderConfig":
        """From `thinker_config.audio_config` (defaults are the reference config class's)."""
        cfg = cls(
            num_mel_bins=int(d.get("num_mel_bins", 128)),
            encoder_layers=int(d.get("encoder_layers", 32)),
            encoder_attention_heads=int(d.get("encoder_attention_heads", 20)),
            encoder_ffn_dim=int(d.get("encoder_ffn_dim", 5120)),
            d_model=int(d.get("d_model", 1280)),
            n_window=int(d.get("n_window", 100)),
            output_dim=int(d.get("output_dim", 3584)),
            max_source_positions=int(d.get("max_source_positions", 1500)),
            activation_function=str(d.get("activation_function", "gelu")),
            scale_embedding=bool(d.get("scale_embedding", False)),
        )
        if cfg.d_model % cfg.encoder_attention_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by {cfg.encoder_attention_heads} heads")
        if (cfg.d_model // 2) < 2 or cfg.d_model % 2:
            raise ValueError(f"d_model must be even and >= 4 for the sinusoidal positions, got {cfg.d_model}")
        if cfg.n_window <= 0 or cfg.n_window > cfg.max_source_positions:
            raise ValueError(f"n_window {cfg.n_window} must be in 1..max_source_positions ({cfg.max_source_positions})")
        if cfg.activation_function not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {cfg.activation_function!r}")
        return cfg

    @property
    def window_frames(self) -> int:
        return 2 * self.n_window


def num_audio_tokens(n_frames: int) -> int:
    """Encoder tokens for n mel frames: conv stride 2, then pool 2."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table (length, channels): sin in the first half, cos in the second."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2).float())             # (C/2,)
    t = torch.arange(length)[:, None] * inv[None, :]                              # (length, C/2)
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)                         # (length, C)


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, T, D = x.shape                                                          # (windows, frames, d)
        q = self.q_proj(x).view(W, T, self.num_heads, self.head_dim).transpose(1, 2)   # (W, H, T, hd)
        k = self.k_proj(x).view(W, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(W, T, self.num_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)                                # (W, H, T, hd), no mask
        return self.out_proj(o.transpose(1, 2).reshape(W, T, D))                   # (W, T, d)


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))                       # (W, T, d)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))          # (W, T, d)


class AudioEncoder(nn.Module):
    """state_dict keys == the checkpoint's keys under `thinker.audio_tower.`."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, d), persistent=False)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)   # stored, unused by the encoder itself
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.avg_pooler = nn.AvgPool1d(2, stride=2)                  # no weights; pooling is done on pairs below
        self.proj = nn.Linear(d, cfg.output_dim)

    def reset_buffers(self) -> None:
        """Rebuild the computed position table (the loader builds modules on meta; see omnivox.loading)."""
        self.positional_embedding = sinusoids(self.cfg.max_source_positions, self.cfg.d_model)

    # -- pieces -----------------------------------------------------------------------------------------

    def encode_windows(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states of equal-length windows: (W, n_mels, T) -> (W, (T - 1) // 2 + 1, d)."""
        x = feats.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))                                                  # (W, d, T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)                                  # (W, T', d)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)                # positions restart per window
        for layer in self.layers:
            x = layer(x)
        return x                                                                   # (W, T', d)

    def pool_project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Average pairs of rows, ln_post, proj: (2N, d) -> (N, output_dim)."""
        pooled = (hidden[0::2] + hidden[1::2]) / 2                                 # (N, d)
        return self.proj(self.ln_post(pooled))                                     # (N, out)

    def _pool_with_carry(self, hidden: torch.Tensor, carry: torch.Tensor | None):
        """Pool the rows of `hidden` after a carried odd row; returns (tokens, new carry or None)."""
        if carry is not None:
            hidden = torch.cat([carry, hidden], dim=0)
        even = hidden.shape[0] - hidden.shape[0] % 2
        rest = hidden[even:] if even < hidden.shape[0] else None
        return self.pool_project(hidden[:even]), rest

    # -- one-shot -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, features: torch.Tensor, window_batch: int = WINDOW_BATCH) -> torch.Tensor:
        """One audio's log-mel features (n_mels, L) -> (num_audio_tokens(L), output_dim)."""
        if features.dim() != 2 or features.shape[0] != self.cfg.num_mel_bins:
            raise ValueError(f"features must be (n_mels={self.cfg.num_mel_bins}, frames), got {tuple(features.shape)}")
        L = features.shape[1]
        if L == 0:
            raise ValueError("features have zero frames")
        wf = self.cfg.window_frames
        full = L // wf
        out = torch.empty(num_audio_tokens(L), self.cfg.output_dim, dtype=self.proj.weight.dtype,
                          device=self.proj.weight.device)                           # (N, out), filled in place
        pos, carry = 0, None
        for w0 in range(0, full, window_batch):
            w1 = min(w0 + window_batch, full)
            chunk = features[:, w0 * wf: w1 * wf].reshape(-1, w1 - w0, wf).transpose(0, 1)   # (W, n_mels, wf)
            hidden = self.encode_windows(chunk).reshape(-1, self.cfg.d_model)                # (W * T', d)
            tokens, carry = self._pool_with_carry(hidden, carry)
            out[pos:pos + tokens.shape[0]] = tokens
            pos += tokens.shape[0]
        if L % wf:
            hidden = self.encode_windows(features[None, :, full * wf:])[0]                  # (T', d)
            tokens, carry = self._pool_with_carry(hidden, carry)
            out[pos:pos + tokens.shape[0]] = tokens
            pos += tokens.shape[0]
        assert pos == out.shape[0]
        return out                                                                 # (N, out)

    @torch.no_grad()
    def encode_audio(self, audio, feature_cfg: FeatureConfig) -> torch.Tensor:
        """16 kHz mono samples -> tokens (log_mel + encode; features stay on the CPU, windows move per batch)."""
        return self.encode(log_mel(audio, feature_cfg))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encode(features)


# ----------------------------------------------------------------------------------------------- streaming


@dataclass
class AudioStreamState:
    """One audio stream: the mel stream plus an odd hidden row waiting for its pooling partner."""
    mel: MelStreamState
    carry: torch.Tensor | None = None       # (1, d) when the windows so far gave an odd number of rows
    tokens_emitted: int = 0

    @property
    def clamp_error(self) -> float:
        """After finish: max |streamed - one-shot| over the features (0.0 = identical features)."""
        return self.mel.clamp_error


def new_stream(cfg: AudioEncoderConfig, feature_cfg: FeatureConfig, keep_history: bool = False) -> AudioStreamState:
    """`keep_history` keeps the emitted features (51 KB per second of audio at 128 bins) so that
    `stream_revisions` can make the stream exactly equal to one-shot after finish."""
    if feature_cfg.feature_size != cfg.num_mel_bins:
        raise ValueError(f"feature_size {feature_cfg.feature_size} != encoder num_mel_bins {cfg.num_mel_bins}")
    return AudioStreamState(mel=new_mel_stream(feature_cfg, cfg.window_frames, keep_history))


def _encode_stream_window(encoder: AudioEncoder, state: AudioStreamState, feats: torch.Tensor) -> torch.Tensor:
    dev = encoder.conv1.weight.device
    hidden = encoder.encode_windows(feats[None].to(dev))[0]                        # (T', d)
    tokens, state.carry = encoder._pool_with_carry(hidden, state.carry)
    state.tokens_emitted += tokens.shape[0]
    return tokens


@torch.no_grad()
def stream_push(encoder: AudioEncoder, state: AudioStreamState, pcm_16k) -> list[torch.Tensor]:
    """Feed 16 kHz mono float samples; returns the tokens of every 2 * n_window-frame window completed."""
    return [_encode_stream_window(encoder, state, w) for w in mel_push(state.mel, pcm_16k)]


@torch.no_grad()
def stream_finish(encoder: AudioEncoder, state: AudioStreamState) -> torch.Tensor:
    """End of audio: tokens of the last partial window ((0, output_dim) when there are none)."""
    tail = mel_finish(state.mel)                                                   # (n_mels, <= window)
    if tail.shape[1] == 0:
        state.carry = None
        return torch.zeros(0, encoder.cfg.output_dim, dtype=encoder.proj.weight.dtype,
                           device=encoder.proj.weight.device)
    tokens = _encode_stream_window(encoder, state, tail)
    state.carry = None                                                             # an odd last row is dropped
    return tokens


@torch.no_grad()
def stream_revisions(encoder: AudioEncoder, state: AudioStreamState) -> list[tuple[int, torch.Tensor]]:
    """After finish, on a stream made with keep_history: [(first token index, tokens)] replacing the streamed
    tokens of every window whose features the final dynamic-range floor changed. Applying them makes the
    stream equal to one-shot `encode(log_mel(all audio))`; an empty list means it already was.
    With an odd n_window pooling pairs straddle windows, so any change re-encodes everything: [(0, all)]."""
    revised = mel_revisions(state.mel)                                             # [(window, feats)]
    if not revised:
        return []
    dev, n = encoder.conv1.weight.device, encoder.cfg.n_window
    if n % 2:
        feats = {w: f for w, f in revised}
        allf = torch.cat([feats.get(w, f) for w, (f, _) in enumerate(state.mel.history)], dim=1)
        return [(0, encoder.encode(allf.to(dev)))]
    out = []
    full = [(w, f) for w, f in revised if f.shape[1] == encoder.cfg.window_frames]
    for i in range(0, len(full), WINDOW_BATCH):
        group = full[i:i + WINDOW_BATCH]
        hidden = encoder.encode_windows(torch.stack([f for _, f in group]).to(dev))     # (W, n, d)
        for (w, _), h in zip(group, hidden):
            out.append((w * n // 2, encoder.pool_project(h)))                            # (n / 2, out)
    return out


class AudioEncoderSession:
    """Owns one stream's state: `push(pcm)` -> tokens of completed windows, `finish()` -> the rest,
    `revisions()` -> exact corrections (keep_history=True)."""

    def __init__(self, encoder: AudioEncoder, feature_cfg: FeatureConfig, keep_history: bool = False):
        self.encoder = encoder
        self.state = new_stream(encoder.cfg, feature_cfg, keep_history)

    def push(self, pcm_16k) -> list[torch.Tensor]:
        return stream_push(self.encoder, self.state, pcm_16k)

    def finish(self) -> torch.Tensor:
        return stream_finish(self.encoder, self.state)

    def revisions(self) -> list[tuple[int, torch.Tensor]]:
        return stream_revisions(self.encoder, self.state)
