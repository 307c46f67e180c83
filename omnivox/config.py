"""The checkpoint's `config.json`, read into plain dataclasses (v4 and v5 dialects alike).

Only the Thinker's text decoder and the prompt token ids are typed here; the encoder, Talker and token2wav
sub-configs stay dicts and are typed by their own modules (`encoders.audio`, `talker.model`, ...), so every
model part owns the reading of its own numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omnivox.errors import CheckpointError
from omnivox.thinker.config import DecoderConfig

SUPPORTED_MODEL_TYPES = ("qwen2_5_omni",)


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
    text: DecoderConfig                    # the Thinker's language model
    tokens: TokenIds
    audio: dict                            # thinker_config.audio_config (typed by encoders.audio)
    vision: dict                           # thinker_config.vision_config (typed by encoders.vision)
    talker: dict | None                    # talker_config (typed by talker.model)
    token2wav: dict | None                 # token2wav_config {dit_config, bigvgan_config}
    dtype: str = "float32"                 # dtype the weights were saved in (torch_dtype / dtype)
    enable_audio_output: bool = True
    eos_token_ids: tuple[int, ...] = ()    # from generation_config.json when present
    generation: dict = field(default_factory=dict, compare=False)  # generation_config.json (sampling defaults)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict, generation: dict | None = None) -> "OmniConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; omnivox reads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        thinker = cfg.get("thinker_config")
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config"), dict):
            raise CheckpointError("config.json has no thinker_config.text_config")
        text_d = thinker["text_config"]
        try:
            text = DecoderConfig.from_dict(text_d, tie_word_embeddings=bool(thinker.get("tie_word_embeddings", False)))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"config.json: thinker_config.text_config lacks {e}") from None
        except ValueError as e:
            raise CheckpointError(f"config.json: {e}") from None

        def tid(key, default):
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
            talker=cfg.get("talker_config"), token2wav=cfg.get("token2wav_config"),
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
