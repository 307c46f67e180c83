"""Decoder configuration shared by the Thinker and the Talker (both are Qwen2.5 decoders with multimodal RoPE).

`config.json` comes in two dialects: the official checkpoints were written by transformers 4
(`rope_theta` + `rope_scaling: {mrope_section, type}`, `torch_dtype`), transformers 5 writes
`rope_parameters: {rope_theta, mrope_section, rope_type}` and `dtype`. `rope_settings` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass


def rope_settings(d: dict) -> tuple[float, list[int] | None, str]:
    """(rope_theta, mrope_section, rope_type) from a v4- or v5-style sub-config dict."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    section = params.get("mrope_section", scaling.get("mrope_section"))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    return float(theta), (list(section) if section is not None else None), str(rope_type)


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]  # split of head_dim // 2 over the (t, h, w) position axes
    embedding_size: int             # width of embed_tokens; the Talker's lives in the Thinker's width
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict, tie_word_embeddings: bool | None = None) -> "DecoderConfig":
        theta, section, rope_type = rope_settings(d)
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported rope type {rope_type!r} (only the default multimodal RoPE is implemented)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (no Qwen2.5-Omni checkpoint uses it)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}")
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
        if section is None:
            # no mrope section: plain 1-D RoPE is the same as giving every frequency to the temporal axis
            section = [head_dim // 2, 0, 0]
        if sum(section) * 2 != head_dim:
            raise ValueError(f"mrope_section {section} does not cover head_dim {head_dim}")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            mrope_section=tuple(int(s) for s in section),
            embedding_size=int(d.get("embedding_size") or d["hidden_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)
                                     if tie_word_embeddings is None else tie_word_embeddings),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            hidden_act=str(d.get("hidden_act", "silu")),
        )
