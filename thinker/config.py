"""Decoder configurations: the Qwen2.5 one shared by its Thinker and Talker (both Qwen2.5 decoders with
multimodal RoPE), and Qwen3-Omni's (Qwen3 attention numbers, the MoE block, the MoE Thinker). No torch here:
the CLI and `omnivox doctor` read configs before torch is imported.

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


# --------------------------------------------------------------------------------------------------------------
# Qwen3-Omni (thinker/qwen3_layers.py, thinker/moe.py, talker/qwen3_talker.py)


@dataclass(frozen=True)
class Qwen3DecoderConfig:
    """The attention/embedding numbers of one Qwen3 decoder (the Talker's text_config, the code predictor)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None  # None: plain RoPE
    attention_bias: bool = False
    max_position_embeddings: int = 32768

    @classmethod
    def from_dict(cls, d: dict, what: str) -> "Qwen3DecoderConfig":
        theta, section, rope_type = rope_settings(d)
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{what}: unsupported rope type {rope_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{what}: unsupported hidden_act {d.get('hidden_act')!r}")
        if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError(f"{what}: sliding-window layers are not supported (no Qwen3-Omni checkpoint has them)")
        try:
            heads = int(d["num_attention_heads"])
            cfg = cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                mrope_section=tuple(int(s) for s in section) if section is not None else None,
                attention_bias=bool(d.get("attention_bias", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            )
        except KeyError as e:
            raise ValueError(f"{what} lacks {e}") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{what}: num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads "
                             f"{cfg.num_kv_heads}")
        if cfg.head_dim % 2:
            raise ValueError(f"{what}: head_dim {cfg.head_dim} must be even (RoPE)")
        if cfg.mrope_section is not None and sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ValueError(f"{what}: mrope_section {list(cfg.mrope_section)} does not cover head_dim {cfg.head_dim}")
        return cfg


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int                      # num_experts_per_tok
    intermediate_size: int          # moe_intermediate_size, per expert
    shared_intermediate_size: int   # shared_expert_intermediate_size (0: no shared expert)
    norm_topk_prob: bool            # renormalise the top-k router weights to sum to 1

    @classmethod
    def from_dict(cls, d: dict, what: str) -> MoEConfig:
        try:
            moe = cls(num_experts=int(d.get("num_local_experts", d.get("num_experts", 0))),
                      top_k=int(d["num_experts_per_tok"]), intermediate_size=int(d["moe_intermediate_size"]),
                      shared_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                      norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        except KeyError as e:
            raise ValueError(f"{what} lacks {e}") from None
        if moe.num_experts and not 1 <= moe.top_k <= moe.num_experts:
            raise ValueError(f"{what}: num_experts_per_tok {moe.top_k} must be in 1..num_experts {moe.num_experts}")
        return moe


@dataclass(frozen=True)
class MoEThinkerConfig:
    decoder: Qwen3DecoderConfig       # intermediate_size: the dense layers' MLP width
    moe: MoEConfig
    sparse_layers: tuple[bool, ...]   # per layer: routed experts (True) or the dense MLP
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, text: dict, tie_word_embeddings: bool | None = None) -> MoEThinkerConfig:
        """From thinker_config.text_config (v4 or v5 spelling)."""
        what = "thinker_config.text_config"
        dec = Qwen3DecoderConfig.from_dict(text, what)
        if dec.mrope_section is None:
            raise ValueError(f"{what}: the Qwen3-Omni Thinker needs multimodal RoPE (rope mrope_section)")
        if text.get("use_qk_norm") is False:
            raise ValueError(f"{what}: use_qk_norm false is not a Qwen3-Omni Thinker")
        moe = MoEConfig.from_dict(text, what)
        if moe.shared_intermediate_size:
            raise ValueError(f"{what}: the Qwen3-Omni Thinker has no shared expert "
                             f"(shared_expert_intermediate_size {moe.shared_intermediate_size})")
        step = int(text.get("decoder_sparse_step", 1) or 1)
        dense = {int(i) for i in text.get("mlp_only_layers") or []}
        sparse = tuple(moe.num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(dec.num_layers))
        tie = text.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
        return cls(decoder=dec, moe=moe, sparse_layers=sparse, tie_word_embeddings=bool(tie))
