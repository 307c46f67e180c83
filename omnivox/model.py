"""The whole checkpoint as one module tree, and `load()`.

`OmniModel`'s parameter names are the raw checkpoint names (`thinker.model.*`, `thinker.audio_tower.*`,
`thinker.visual.*`, `talker.*`, and `token2wav.code2wav_dit_model.*` + `token2wav.code2wav_bigvgan_model.*` for
Qwen2.5-Omni or `code2wav.*` for Qwen3-Omni), so a checkpoint loads by strict name matching. Modules are built on the meta device and then filled tensor by tensor
from memory-mapped safetensors, so peak memory stays near the size of the weights.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omnivox.config import OmniConfig
from omnivox.errors import CheckpointError
from omnivox.checkpoint_files import resolve_model_path
from omnivox.loading import Checkpoint, checkpoint_dtype, load_module, load_speakers
from omnivox.streaming.prefix import PrefixCache


class Token2Wav(nn.Module):
    """Holder whose children carry the checkpoint's `token2wav.*` names."""

    def __init__(self, dit: nn.Module, bigvgan: nn.Module):
        super().__init__()
        self.code2wav_dit_model = dit
        self.code2wav_bigvgan_model = bigvgan


class OmniModel(nn.Module):
    """thinker (+ audio_tower, visual), and when audio output is on: talker and the vocoder (token2wav for
    Qwen2.5-Omni, code2wav for Qwen3-Omni)."""

    def __init__(self, cfg: OmniConfig, audio_output: bool = True):
        super().__init__()
        self.has_audio_output = audio_output
        if cfg.family == "qwen3":
            self._build_qwen3(cfg, audio_output)
            return
        from omnivox.encoders.audio import AudioEncoder, AudioEncoderConfig
        from omnivox.encoders.vision import VisionEncoder, VisionEncoderConfig
        from omnivox.thinker.model import Thinker

        self.thinker = Thinker(cfg.text,
                               audio_tower=AudioEncoder(AudioEncoderConfig.from_dict(cfg.audio)),
                               visual=VisionEncoder(VisionEncoderConfig.from_dict(cfg.vision)))
        if audio_output:
            from omnivox.talker.bigvgan import BigVGAN, BigVGANConfig
            from omnivox.talker.dit import DiT, DiTConfig
            from omnivox.talker.model import Talker, TalkerConfig

            self.talker = Talker(TalkerConfig.from_dict(cfg.talker))
            t2w = cfg.token2wav or {}
            self.token2wav = Token2Wav(DiT(DiTConfig.from_dict(t2w.get("dit_config") or {})),
                                       BigVGAN(BigVGANConfig.from_dict(t2w.get("bigvgan_config") or {})))

    def _build_qwen3(self, cfg: OmniConfig, audio_output: bool) -> None:
        from omnivox.encoders.aut import AuTConfig, AuTEncoder
        from omnivox.encoders.qwen3_vision import Qwen3VisionConfig, Qwen3VisionEncoder
        from omnivox.thinker.moe import MoEThinker

        self.thinker = MoEThinker(cfg.text, audio_tower=AuTEncoder(AuTConfig.from_dict(cfg.audio)),
                                  visual=Qwen3VisionEncoder(Qwen3VisionConfig.from_dict(cfg.vision)))
        if audio_output:
            from omnivox.talker.code2wav import Code2Wav, Code2WavConfig
            from omnivox.talker.qwen3_talker import Qwen3Talker, Qwen3TalkerConfig

            self.talker = Qwen3Talker(Qwen3TalkerConfig.from_config(cfg.raw))
            self.code2wav = Code2Wav(Code2WavConfig.from_dict(cfg.code2wav or {}))


@dataclass
class Omni:
    """A loaded checkpoint: config, tokenizer, modules and speakers. Model code receives its parts explicitly."""
    path: Path
    config: OmniConfig
    tokenizer: object            # omnivox.thinker.tokenizer.Tokenizer
    model: OmniModel
    speakers: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    load_s: float = 0.0
    # text-only prompt prefixes computed by earlier requests (the speech system prompt above all)
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)

    @property
    def thinker(self):
        return self.model.thinker

    @property
    def talker(self):
        return getattr(self.model, "talker", None)

    @property
    def token2wav(self):
        return getattr(self.model, "token2wav", None)

    @property
    def code2wav(self):
        return getattr(self.model, "code2wav", None)

    @property
    def family(self) -> str:
        return self.config.family


def build_meta(cfg: OmniConfig, audio_output: bool) -> OmniModel:
    with torch.device("meta"), warnings.catch_warnings():
        # small configs can give zero-width convolutions (e.g. the ECAPA Res2Net split); torch warns that
        # initialising them is a no-op, which is harmless here: weights come from the checkpoint
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return OmniModel(cfg, audio_output=audio_output)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         audio: bool = True) -> Omni:
    """Load a Qwen2.5-Omni or Qwen3-Omni checkpoint (local directory or hub id).

    dtype: None/"auto" keeps the checkpoint's dtype (bf16 for the official files: half the memory of fp32, and
    decoding is memory-bound, so bf16 is faster on CPUs too); token2wav always runs in float32. audio=False loads
    the Thinker only (talker/token2wav weights skipped).
    """
    from omnivox.thinker.tokenizer import Tokenizer

    t0 = time.perf_counter()
    root = resolve_model_path(str(path), speech=audio)
    cfg = OmniConfig.from_dir(root)
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = checkpoint_dtype(cfg.dtype)
    elif isinstance(dtype, str):
        dtype = checkpoint_dtype(dtype)
    if audio and not cfg.speaks:
        vocoder = "code2wav" if cfg.family == "qwen3" else "token2wav"
        raise CheckpointError(f"{root} has no talker/{vocoder} config: speech output is not available "
                              "(use --no-audio for text only)")
    ckpt = Checkpoint.open(root)
    if audio and not any(k.startswith("talker.") for k in ckpt.keys()):
        raise CheckpointError(f"{root} holds no talker weights: speech output is not available "
                              "(use --no-audio for text only)")
    model = build_meta(cfg, audio_output=audio)
    tied = {"thinker.lm_head.weight": "thinker.model.embed_tokens.weight"} if cfg.text.tie_word_embeddings else None
    ignore = () if audio else ("talker.", "token2wav.", "code2wav.")
    load_module(model, ckpt, "", dtype=dtype, device=device, tied=tied, ignore_prefixes=ignore)
    model.eval()
    if not audio:
        speakers = {}
    elif cfg.family == "qwen3":
        speakers = qwen3_speakers(cfg.talker)
    else:
        speakers = load_speakers(root / "spk_dict.pt")
    tokenizer = Tokenizer.from_dir(root)
    return Omni(path=root, config=cfg, tokenizer=tokenizer, model=model, speakers=speakers, device=device,
                dtype=dtype, load_s=time.perf_counter() - t0)


def qwen3_speakers(talker_config: dict) -> dict[str, dict]:
    """Qwen3-Omni's voices: `talker_config.speaker_id` {name: codec id} -> {Name: {"codec_id": id}}."""
    ids = talker_config.get("speaker_id") or {}
    if not isinstance(ids, dict) or not ids:
        raise CheckpointError("config.json: talker_config.speaker_id names no voices (needed for speech output)")
    return {str(name)[:1].upper() + str(name)[1:]: {"codec_id": int(code)} for name, code in ids.items()}
