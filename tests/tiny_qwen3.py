"""Tiny random Qwen3-Omni checkpoints made with the reference implementation (test-only).

`make_reference(variant)` builds `transformers.Qwen3OmniMoeForConditionalGeneration` from a tiny config (MoE
Thinker and Talker, code predictor, Code2Wav), in fp32 eval mode; `save(model, dir)` writes its safetensors the
way `save_pretrained` does (per-expert names, as the official checkpoint stores them). Special ids are small
numbers placed by the variant, never the official constants, so code that hard-codes one fails here.

Heads are scaled (`head_scale`) so greedy choices are not decided by rounding noise; logits are compared raw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch

# Thinker vocabulary layout of the tiny checkpoints: ordinary tokens 0..59, then the specials below.
THINKER_IDS = dict(im_start=60, im_end=61, system=62, user=63, assistant=64, tts_pad=65, tts_bos=66, tts_eos=67,
                   audio=68, image=69, video=70, audio_start=71, audio_end=72, vision_start=73, vision_end=74,
                   newline=75)
THINKER_VOCAB = 80


@dataclass
class Variant:
    """Shape knobs of one tiny Qwen3-Omni checkpoint."""
    name: str = "base"
    seed: int = 0
    thinker_hidden: int = 32
    thinker_layers: int = 3
    thinker_heads: int = 4
    thinker_kv: int = 2
    thinker_head_dim: int = 8
    thinker_mrope: list = field(default_factory=lambda: [2, 1, 1])  # sums to thinker_head_dim // 2
    thinker_experts: int = 4
    thinker_top_k: int = 2
    thinker_norm_topk_prob: bool = True
    thinker_sparse_step: int = 1
    thinker_mlp_only: list = field(default_factory=list)
    deepstack_indexes: list = field(default_factory=lambda: [0, 1])   # vision layers feeding DeepStack
    accept_hidden_layer: int = 2
    talker_hidden: int = 32
    talker_layers: int = 2
    talker_heads: int = 4
    talker_kv: int = 2
    talker_head_dim: int = 8
    talker_mrope: list = field(default_factory=lambda: [2, 1, 1])   # sums to talker_head_dim // 2
    experts: int = 4
    top_k: int = 2
    moe_intermediate: int = 16
    shared_intermediate: int = 24
    norm_topk_prob: bool = True
    projection_intermediate: int = 48   # talker text_config.intermediate_size (the projections' middle width)
    code_groups: int = 4                # num_code_groups = code2wav num_quantizers
    codebook: int = 64                  # code predictor vocab = code2wav codebook_size
    predictor_layers: int = 2
    predictor_heads: int = 4
    predictor_kv: int = 2
    predictor_head_dim: int = 8
    c2w_hidden: int = 32
    c2w_layers: int = 2
    c2w_heads: int = 4
    c2w_window: int = 5
    c2w_rates: list = field(default_factory=lambda: [4, 3])
    c2w_ratios: list = field(default_factory=lambda: [2, 2])
    c2w_decoder_dim: int = 32
    head_scale: float = 20.0


VARIANTS = {
    "base": Variant(),
    "wide": Variant(name="wide", seed=1, experts=8, top_k=3, talker_heads=8, talker_kv=2, talker_head_dim=8,
                    talker_hidden=48, code_groups=6, codebook=48, predictor_heads=2, predictor_kv=1,
                    predictor_head_dim=16, talker_mrope=[2, 1, 1], accept_hidden_layer=3, norm_topk_prob=False,
                    c2w_window=3, c2w_rates=[2, 5, 2], c2w_decoder_dim=48, c2w_heads=2,
                    thinker_layers=4, thinker_heads=8, thinker_kv=2, thinker_experts=8, thinker_top_k=3,
                    thinker_norm_topk_prob=False, thinker_mlp_only=[0], deepstack_indexes=[0, 1, 2]),
    "mha": Variant(name="mha", seed=2, experts=6, top_k=1, talker_heads=2, talker_kv=2, talker_head_dim=16,
                   talker_mrope=[4, 2, 2], code_groups=3, codebook=40, talker_layers=3, c2w_window=8,
                   thinker_heads=2, thinker_kv=2, thinker_head_dim=16, thinker_mrope=[4, 2, 2], thinker_experts=6,
                   thinker_top_k=1, thinker_sparse_step=2, deepstack_indexes=[1]),
}


def codec_ids(v: Variant) -> dict:
    """Talker control ids: in [codebook, codebook + 1024), the range the reference suppresses (except eos)."""
    c = v.codebook
    return dict(pad=c + 100, bos=c + 101, eos=c + 102, nothink=c + 107, think_bos=c + 108, think_eos=c + 109,
                speakers={"ethan": c + 250, "chelsie": c + 251, "aiden": c + 252})


def build_config(v: Variant, ids: dict | None = None, vocab: int | None = None):
    from transformers import Qwen3OmniMoeConfig

    ids = ids or THINKER_IDS
    cid = codec_ids(v)
    th_text = dict(vocab_size=vocab or THINKER_VOCAB, hidden_size=v.thinker_hidden, intermediate_size=64,
                   num_hidden_layers=v.thinker_layers, num_attention_heads=v.thinker_heads,
                   num_key_value_heads=v.thinker_kv, head_dim=v.thinker_head_dim, moe_intermediate_size=16,
                   num_experts=v.thinker_experts, num_experts_per_tok=v.thinker_top_k,
                   norm_topk_prob=v.thinker_norm_topk_prob, decoder_sparse_step=v.thinker_sparse_step,
                   mlp_only_layers=v.thinker_mlp_only,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": v.thinker_mrope,
                                    "interleaved": True}, max_position_embeddings=512)
    audio = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=v.thinker_hidden, downsample_hidden_size=8, n_window=50)
    vision = dict(depth=max(2, max(v.deepstack_indexes) + 1), hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=v.thinker_hidden, patch_size=16, num_position_embeddings=64,
                  deepstack_visual_indexes=v.deepstack_indexes)
    thinker = dict(text_config=th_text, audio_config=audio, vision_config=vision, audio_token_id=ids["audio"],
                   image_token_id=ids["image"], video_token_id=ids["video"],
                   audio_start_token_id=ids["audio_start"], vision_start_token_id=ids["vision_start"],
                   vision_end_token_id=ids["vision_end"], audio_end_token_id=ids["audio_end"],
                   user_token_id=ids["user"])
    talker_text = dict(vocab_size=1024 + v.codebook, hidden_size=v.talker_hidden,
                       intermediate_size=v.projection_intermediate, num_hidden_layers=v.talker_layers,
                       num_attention_heads=v.talker_heads, num_key_value_heads=v.talker_kv,
                       head_dim=v.talker_head_dim, moe_intermediate_size=v.moe_intermediate, num_experts=v.experts,
                       num_experts_per_tok=v.top_k, norm_topk_prob=v.norm_topk_prob,
                       shared_expert_intermediate_size=v.shared_intermediate, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": v.talker_mrope,
                                        "interleaved": True})
    predictor = dict(vocab_size=v.codebook, hidden_size=v.talker_hidden, intermediate_size=48,
                     num_hidden_layers=v.predictor_layers, num_attention_heads=v.predictor_heads,
                     num_key_value_heads=v.predictor_kv, head_dim=v.predictor_head_dim, num_code_groups=v.code_groups,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=64)
    talker = dict(text_config=talker_text, code_predictor_config=predictor, num_code_groups=v.code_groups,
                  thinker_hidden_size=v.thinker_hidden, accept_hidden_layer=v.accept_hidden_layer,
                  codec_eos_token_id=cid["eos"], codec_pad_id=cid["pad"], codec_bos_id=cid["bos"],
                  codec_nothink_id=cid["nothink"], codec_think_bos_id=cid["think_bos"],
                  codec_think_eos_id=cid["think_eos"], speaker_id=cid["speakers"], audio_token_id=ids["audio"],
                  image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                  audio_start_token_id=ids["audio_start"], spatial_merge_size=2, position_id_per_seconds=13)
    code2wav = dict(codebook_size=v.codebook, hidden_size=v.c2w_hidden, num_attention_heads=v.c2w_heads,
                    num_key_value_heads=v.c2w_heads, intermediate_size=48, num_hidden_layers=v.c2w_layers,
                    num_quantizers=v.code_groups, sliding_window=v.c2w_window, upsample_rates=v.c2w_rates,
                    upsampling_ratios=v.c2w_ratios, decoder_dim=v.c2w_decoder_dim,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
        im_start_token_id=ids["im_start"], im_end_token_id=ids["im_end"], system_token_id=ids["system"],
        user_token_id=ids["user"], assistant_token_id=ids["assistant"], tts_pad_token_id=ids["tts_pad"],
        tts_bos_token_id=ids["tts_bos"], tts_eos_token_id=ids["tts_eos"])


def strengthen_code2wav(code2wav, seed: int, gain: float = 0.5) -> None:
    """Re-draw the reference init (std 0.02, layer scales 0.01, ConvNeXt gamma 1e-6, Snake 0), under which the
    waveform is tiny and most layers barely matter, with fan-in scaled weights; in place, seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in code2wav.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(("scale", "gamma")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm.weight" in name or "layernorm" in name
                                                                  else 0.0))
            elif "code_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 3 and ("upsample" in name or ".block.1." in name):  # ConvTranspose1d (in, out, k)
                stride = 1 if "upsample" in name else p.shape[2] // 2
                fan_in = p.shape[0] * p.shape[2] // stride
                p.copy_(torch.randn(p.shape, generator=g) * gain * (1.0 / fan_in) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * gain * (1.0 / p[0].numel()) ** 0.5)


def make_reference(v: Variant | str = "base", ids: dict | None = None, vocab: int | None = None):
    """The reference model in fp32 eval mode, heads scaled, Code2Wav strengthened."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    v = VARIANTS[v] if isinstance(v, str) else v
    torch.manual_seed(v.seed)
    model = Qwen3OmniMoeForConditionalGeneration(build_config(v, ids, vocab)).float().eval()
    with torch.no_grad():
        model.talker.codec_head.weight.mul_(v.head_scale)
        for head in model.talker.code_predictor.lm_head:
            head.weight.mul_(v.head_scale)
        model.thinker.lm_head.weight.mul_(v.head_scale)
        # the reference's _init_weights skips the Talker's fused expert tensors (torch.empty: whatever memory
        # held, NaN at times), so every expert tensor is drawn here, seeded
        g = torch.Generator().manual_seed(v.seed + 7)
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        # the routers and the shared-expert gate get a real spread too
        for layer in model.thinker.model.language_model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 1.0)
        for layer in model.talker.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.shared_expert_gate.weight.normal_(0, 0.3)
    strengthen_code2wav(model.code2wav, seed=v.seed + 100)
    return model


def save(model, out) -> dict:
    """save_pretrained into `out`; returns {name: tensor} of the written safetensors (raw checkpoint names)."""
    from pathlib import Path

    from safetensors.torch import load_file

    model.save_pretrained(out)
    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny kernels per frame: with a second OpenMP thread on a busy 2-core machine each one waits
    milliseconds for it (50x slower); one thread keeps these files fast. Test modules import this fixture
    (autouse); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# A whole checkpoint on disk (what `omnivox.load` reads): weights, config, tokenizer, processor files

QWEN3_SPECIALS = ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<|image_pad|>", "<|video_pad|>",
                  "<|vision_start|>", "<|vision_end|>"]


def build_tokenizer():
    """tests/tiny.py's byte-level BPE plus Qwen3-Omni's media specials and the role words as whole tokens;
    returns (tokenizers.Tokenizer, THINKER_IDS-style {name: id})."""
    import tiny

    tok, _ = tiny.build_tokenizer()
    tok.add_special_tokens(QWEN3_SPECIALS)
    tok.add_tokens(["system", "user", "assistant"])
    tid = tok.token_to_id
    ids = dict(im_start=tid("<|im_start|>"), im_end=tid("<|im_end|>"), system=tid("system"), user=tid("user"),
               assistant=tid("assistant"), tts_pad=tid("<tts_pad>"), tts_bos=tid("<tts_text_bos>"),
               tts_eos=tid("<tts_text_eod>"), audio=tid("<|audio_pad|>"), image=tid("<|image_pad|>"),
               video=tid("<|video_pad|>"), audio_start=tid("<|audio_start|>"), audio_end=tid("<|audio_end|>"),
               vision_start=tid("<|vision_start|>"), vision_end=tid("<|vision_end|>"),
               newline=tok.encode("\n").ids[0])
    assert all(isinstance(i, int) for i in ids.values()), ids
    return tok, ids


def make_checkpoint(out, variant: Variant | str = "base"):
    """Write a tiny Qwen3-Omni checkpoint into `out` the way the official one is laid out; returns
    (reference model, {name: id})."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = build_tokenizer()
    model = make_reference(variant, ids, vocab=tok.get_vocab_size())
    model.generation_config.eos_token_id = [ids["im_end"], tok.token_to_id("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.token_to_id("<|endoftext|>")
    model.save_pretrained(str(out))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
                            padding_value=0.0, return_attention_mask=True).save_pretrained(str(out))
    return model, ids


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def stored_names(state: dict[str, tuple]) -> dict[str, tuple]:
    """Reference module names/shapes -> checkpoint names/shapes: the reference holds a layer's experts fused
    (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)), its files store them per expert."""
    out = {}
    for name, shape in state.items():
        m = _FUSED.match(name)
        if not m:
            out[name] = shape
            continue
        base, kind = m.groups()
        e, rows, cols = shape
        for i in range(e):
            if kind == "gate_up_proj":
                out[f"{base}.{i}.gate_proj.weight"] = (rows // 2, cols)
                out[f"{base}.{i}.up_proj.weight"] = (rows // 2, cols)
            else:
                out[f"{base}.{i}.down_proj.weight"] = (rows, cols)
    return out
