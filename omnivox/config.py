"""The checkpoint's `config.json`, read into plain dataclasses (v4 and v5 dialects alike).

Only the Thinker's text decoder and the prompt token ids are typed here; the encoder, Talker and token2wav
sub-configs stay dicts and are typed by their own modules (`encoders.audio`, `talker.model`, ...), so every
model part owns the reading of its own numbers.

Two families: `qwen2_5_omni` (Thinker `thinker.model.DecoderConfig`, Talker + token2wav) and `qwen3_omni_moe`
(Thinker `thinker.moe.MoEThinkerConfig`, MoE Talker + code predictor + Code2Wav; its speakers are named in
`talker_config.speaker_id`). `family` says which; the model type in config.json picks it, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omnivox.errors import CheckpointError
from omnivox.thinker.config import DecoderConfig
from omnivox.thinker.config import MoEThinkerConfig

SUPPORTED_MODEL_TYPES = ("qwen2_5_omni", "qwen3_omni_moe")
FAMILIES = {"qwen2_5_omni": "qwen2_5", "qwen3_omni_moe": "qwen3"}


@dataclass(frozen=True)
class TokenIds:
    """Special ids the prompt builder and the position-id code need (all from the config)."""
    audio: int
    image: int
    video: int
    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int
    position_id_per_seconds: float = 25     # TMRoPE temporal ids per second of media
    seconds_per_chunk: float = 2            # audio-in-video interleaving chunk


@dataclass(frozen=True)
class OmniConfig:
    model_type: str
    text: DecoderConfig | MoEThinkerConfig  # the Thinker's language model (by family)
    tokens: TokenIds
    audio: dict                            # thinker_config.audio_config (typed by encoders.audio)
    vision: dict                           # thinker_config.vision_config (typed by encoders.vision)
    talker: dict | None                    # talker_config (typed by talker.model)
    token2wav: dict | None                 # token2wav_config {dit_config, bigvgan_config} (Qwen2.5)
    code2wav: dict | None = None           # code2wav_config (Qwen3)
    dtype: str = "float32"                 # dtype the weights were saved in (torch_dtype / dtype)
    enable_audio_output: bool = True
    eos_token_ids: tuple[int, ...] = ()    # from generation_config.json when present
    generation: dict = field(default_factory=dict, compare=False)  # generation_config.json (sampling defaults)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def speaks(self) -> bool:
        """The checkpoint has a speech side (Talker and vocoder configs, audio output enabled)."""
        vocoder = self.code2wav if self.family == "qwen3" else self.token2wav
        return bool(self.talker and vocoder and self.enable_audio_output)

    @property
    def max_positions(self) -> int:
        text = self.text.decoder if isinstance(self.text, MoEThinkerConfig) else self.text
        return text.max_position_embeddings

    @classmethod
    def from_dict(cls, cfg: dict, generation: dict | None = None) -> "OmniConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; omnivox reads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        thinker = cfg.get("thinker_config")
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config"), dict):
            raise CheckpointError("config.json has no thinker_config.text_config")
        text_d = thinker["text_config"]
        qwen3 = model_type == "qwen3_omni_moe"
        try:
            tie = bool(thinker.get("tie_word_embeddings", False))
            text = MoEThinkerConfig.from_dict(text_d, tie) if qwen3 else DecoderConfig.from_dict(text_d, tie)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"config.json: thinker_config.text_config lacks {e}") from None
        except ValueError as e:
            raise CheckpointError(f"config.json: {e}") from None

        def tid(key, default):
            if qwen3:   # Qwen3-Omni spells every id *_token_id
                key = key.replace("_token_index", "_token_id")
            return int(thinker.get(key, default))

        tokens = TokenIds(
            audio=tid("audio_token_index", 151646), image=tid("image_token_index", 151655),
            video=tid("video_token_index", 151656), audio_start=tid("audio_start_token_id", 151647),
            audio_end=tid("audio_end_token_id", 151648), vision_start=tid("vision_start_token_id", 151652),
            vision_end=tid("vision_end_token_id", 151653),
            position_id_per_seconds=thinker.get("position_id_per_seconds", 25),
            seconds_per_chunk=thinker.get("seconds_per_chunk", 2),
        )
        eos = (generation or {}).get("eos_token_id")
        if eos is None:
            eos = text_d.get("eos_token_id", thinker.get("eos_token_id"))
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text_d.get("dtype") or text_d.get("torch_dtype") \
            or "float32"
        return cls(
            model_type=model_type, text=text, tokens=tokens,
            audio=thinker.get("audio_config") or {}, vision=thinker.get("vision_config") or {},
            talker=cfg.get("talker_config"), token2wav=None if qwen3 else cfg.get("token2wav_config"),
            code2wav=cfg.get("code2wav_config") if qwen3 else None,
            dtype=str(dtype), enable_audio_output=bool(cfg.get("enable_audio_output", True)),
            eos_token_ids=eos, generation=dict(generation or {}), raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "OmniConfig":
        path = Path(path)
        cfg = _read_json(path / "config.json", required=True)
        gen = _read_json(path / "generation_config.json", required=False)
        return cls.from_dict(cfg, gen)


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} has no {path.name}: not a model checkpoint directory")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
