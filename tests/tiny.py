"""Tiny random Qwen2.5-Omni checkpoints made with the reference implementation (test-only).

`make_checkpoint(dir, variant)` writes what a real checkpoint directory holds: config.json, safetensors
(optionally sharded), spk_dict.pt, tokenizer files, chat template, preprocessor/processor configs and
generation_config.json. The tokenizer is a small byte-level BPE trained here, with the Qwen special tokens
appended, so every special id in the config is a small number read from the files, never a constant.
Lm heads are scaled so greedy choices are not decided by rounding noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The official Qwen2.5-Omni chat template (chat_template.json of the released checkpoints), kept in the runtime as
# its fallback; the tests render it with the reference processor as the oracle.
from omnivox.thinker.tokenizer import OMNI_CHAT_TEMPLATE  # noqa: E402

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>",
]
# Talker text-track ids live in the Thinker vocabulary (151859..151861 in the official files).
TTS_TOKENS = ["<tts_pad>", "<tts_text_bos>", "<tts_text_eod>"]

_CORPUS = [
    "Hello, world! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "omnivox answers in text and in speech that starts while the answer is still being thought.",
    "What do you hear in this audio? Describe the picture and the video, please.",
    "Grüße aus Köln — naïve café déjà vu. 你好，世界！こんにちは 😀🎉",
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech.",
    "You are a helpful assistant. system user assistant",
]
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab_size: int = 320):
    """Byte-level BPE with the Qwen2 pre-tokenizer; returns (tokenizers.Tokenizer, {special: id})."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(TTS_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + TTS_TOKENS}
    return tok, ids


@dataclass
class Variant:
    """Shape knobs of one tiny checkpoint."""
    name: str = "base"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    mrope_section: list = field(default_factory=lambda: [2, 3, 3])  # sums to head_dim // 2
    tie: bool = False
    rope_theta: float = 10000.0
    audio_d: int = 32
    audio_layers: int = 2
    audio_heads: int = 2
    audio_n_window: int = 100
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    talker_hidden: int = 32
    talker_layers: int = 2
    talker_heads: int = 2
    talker_kv: int = 1
    talker_head_dim: int = 16
    talker_rope_theta: float = 1000000.0
    dit_hidden: int = 32
    dit_layers: int = 4
    bigvgan_channels: int = 128  # halved per upsample (6x): 128 leaves 2 channels at the end
    lm_head_scale: float = 30.0
    seed: int = 0
    shard: bool = False           # write model-0000x-of-0000y.safetensors + index
    v4_config: bool = False       # rewrite config.json the way the official (transformers 4) files look
    enable_audio_output: bool = True
    strong_token2wav: bool = False  # re-draw DiT/BigVGAN weights fan-in scaled (`strengthen`): the reference init
                                    # (std 0.02) leaves the vocoder's output ~1e-7, too small to compare
    speech_codes_only: bool = False  # zero the codec_head rows of the control ids (pad/bos/eos/mask...) except the
                                     # two EOS ids, so a greedy Talker never emits a non-speech id mid-answer


VARIANTS = {
    "base": Variant(),
    "gqa4_tied": Variant(name="gqa4_tied", hidden=96, heads=8, kv_heads=2, intermediate=160,
                         mrope_section=[2, 2, 2], tie=True, layers=3, seed=1),
    "mha_wide": Variant(name="mha_wide", hidden=128, heads=4, kv_heads=4, intermediate=256,
                        mrope_section=[4, 6, 6], layers=2, rope_theta=1000000.0, seed=2),
}


def build_config(v: Variant, ids: dict[str, int], vocab: int):
    from transformers import Qwen2_5OmniConfig

    head_dim = v.hidden // v.heads
    assert sum(v.mrope_section) * 2 == head_dim, "mrope sections must cover head_dim // 2"
    text = dict(
        vocab_size=vocab, hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, num_key_value_heads=v.kv_heads, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta, "mrope_section": v.mrope_section},
        tie_word_embeddings=v.tie, max_position_embeddings=4096,
    )
    audio = dict(num_mel_bins=128, encoder_layers=v.audio_layers, encoder_attention_heads=v.audio_heads,
                 encoder_ffn_dim=v.audio_d * 2, d_model=v.audio_d, output_dim=v.hidden, n_window=v.audio_n_window,
                 max_source_positions=1500)
    vision = dict(depth=v.vision_depth, hidden_size=v.vision_hidden, intermediate_size=v.vision_hidden * 2,
                  num_heads=v.vision_heads, out_hidden_size=v.hidden, fullatt_block_indexes=[v.vision_depth - 1],
                  window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    thinker = dict(
        text_config=text, audio_config=audio, vision_config=vision,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=v.tie,
    )
    talker_half = v.talker_head_dim // 2
    t_sec = [talker_half // 4, (talker_half - talker_half // 4) // 2]
    t_sec.append(talker_half - sum(t_sec))
    talker = dict(
        vocab_size=8448, embedding_size=v.hidden, hidden_size=v.talker_hidden,
        intermediate_size=v.talker_hidden * 2, num_hidden_layers=v.talker_layers,
        num_attention_heads=v.talker_heads, num_key_value_heads=v.talker_kv, head_dim=v.talker_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": v.talker_rope_theta, "mrope_section": t_sec},
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        tts_text_start_token_id=ids["<tts_text_bos>"], tts_text_end_token_id=ids["<tts_text_eod>"],
        tts_text_pad_token_id=ids["<tts_pad>"], max_position_embeddings=4096,
    )
    dit = dict(hidden_size=v.dit_hidden, num_hidden_layers=v.dit_layers, num_attention_heads=2, head_dim=16,
               ff_mult=2, emb_dim=16, block_size=24, look_ahead_layers=[1], look_backward_layers=[0, v.dit_layers - 1],
               repeats=2, num_embeds=8193, mel_dim=80, enc_emb_dim=192, enc_dim=32,
               enc_channels=[32, 32, 32, 32, 96], enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1],
               enc_attention_channels=16, enc_res2net_scale=2, enc_se_channels=16)
    bigvgan = dict(mel_dim=80, upsample_initial_channel=v.bigvgan_channels, resblock_kernel_sizes=[3, 7, 11],
                   resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
                   upsample_kernel_sizes=[11, 7, 4, 4, 4, 4])
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                             token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan},
                             enable_audio_output=v.enable_audio_output)


def build_model(v: Variant, config):
    from transformers import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(v.seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval().float()
    with torch.no_grad():
        if v.tie:
            model.thinker.get_input_embeddings().weight.mul_(v.lm_head_scale)
        else:
            model.thinker.lm_head.weight.mul_(v.lm_head_scale)
        if v.enable_audio_output:
            model.talker.codec_head.weight.mul_(v.lm_head_scale)
            if v.speech_codes_only:
                talker = model.talker
                speech = model.config.token2wav_config.dit_config.num_embeds  # ids below are speech codes
                keep = {talker.codec_eos_token, talker.codec_pad_token}       # the EOS ids of generate
                for i in range(speech, talker.codec_head.weight.shape[0]):
                    if i not in keep:
                        talker.codec_head.weight[i] = 0
            if v.strong_token2wav:
                strengthen(model.token2wav.code2wav_dit_model, seed=v.seed + 11)
                strengthen(model.token2wav.code2wav_bigvgan_model, seed=v.seed + 12, gain=0.6)
    return model


def strengthen(module, seed: int, gain: float = 1.0):
    """Re-draw every weight with fan-in scaling (seeded) so that every part of the model matters (token2wav:
    RoPE, block masks, gates and the vocoder's SnakeBeta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".alpha") or name.endswith(".beta"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "codec_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def make_processor(out: Path, tok, ids: dict[str, int]):
    from transformers import (Qwen2_5OmniProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor,
                              WhisperFeatureExtractor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        },
    )
    image = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                  merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711])
    video = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                  merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711])
    feat = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                   n_fft=400, padding_value=0.0, return_attention_mask=True)
    proc = Qwen2_5OmniProcessor(image_processor=image, video_processor=video, feature_extractor=feat,
                                tokenizer=fast, chat_template=OMNI_CHAT_TEMPLATE)
    proc.save_pretrained(str(out))
    return proc


def make_speakers(out: Path, config, ids: dict[str, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    cond_dim = config.token2wav_config.dit_config.enc_emb_dim
    mel_dim = config.token2wav_config.dit_config.mel_dim
    spk = {}
    for i, name in enumerate(["Chelsie", "Ethan"]):
        spk[name] = {
            # the Talker embeds this id with the Thinker's table (151870/151872 in the official spk_dict)
            "bos_token": 200 + i,
            "cond": torch.randn(1, cond_dim, generator=g),
            "ref_mel": torch.randn(1, 400, mel_dim, generator=g) * 0.5 - 4.0,
        }
    torch.save(spk, out / "spk_dict.pt")


def v4_style(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json into the official v4 layout (rope_scaling / rope_theta / torch_dtype)."""
    cfg = json.loads(config_path.read_text())

    def fix(d):
        if not isinstance(d, dict):
            return
        rp = d.pop("rope_parameters", None)
        if rp is not None:
            d["rope_theta"] = rp.get("rope_theta", 10000.0)
            if "mrope_section" in rp:
                d["rope_scaling"] = {"mrope_section": rp["mrope_section"], "type": "default",
                                     "rope_type": "default"}
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        for val in list(d.values()):
            fix(val)

    fix(cfg)
    config_path.write_text(json.dumps(cfg, indent=2))


def make_checkpoint(out: str | os.PathLike, variant: str | Variant = "base", with_model: bool = False):
    """Write a complete tiny checkpoint into `out`; returns the reference model when with_model."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = build_tokenizer()
    config = build_config(v, ids, vocab=tok.get_vocab_size())
    model = build_model(v, config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    max_shard = "200KB" if v.shard else "10GB"
    model.save_pretrained(str(out), max_shard_size=max_shard)
    make_processor(out, tok, ids)
    if v.enable_audio_output:
        make_speakers(out, config, ids, v.seed)
    if v.v4_config:
        v4_style(out / "config.json")
    return model if with_model else None
