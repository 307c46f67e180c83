"""A turn's messages -> the Thinker's input: token ids, input embeddings, 3-axis positions, rope delta.

`build_prompt` renders the chat template, expands media placeholders to their token counts, embeds the ids and
writes the encoder outputs over the placeholder rows, and computes TMRoPE position ids. During decoding the
position of a token at cache index n is `n + rope_delta` on all three axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omnivox.thinker.model import embed
from omnivox.thinker.positions import rope_index


@dataclass
class Prompt:
    input_ids: Tensor       # (1, T) long, placeholders expanded
    inputs_embeds: Tensor   # (1, T, H) in the Thinker's dtype
    position_ids: Tensor    # (3, 1, T) long
    rope_delta: int         # decode positions: cache index + rope_delta

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def has_media(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") in ("audio", "image", "video")
                                                           for p in m["content"]) for m in messages)


def build_prompt(omni, messages: list[dict], *, use_audio_in_video: bool = False) -> Prompt:
    if has_media(messages):
        from omnivox.streaming.media import build_media_prompt

        if omni.config.family == "qwen3":
            raise ValueError("audio, image and video input are not wired for Qwen3-Omni checkpoints yet (its "
                             "encoders are: encoders/aut.py, encoders/qwen3_vision.py); ask with text only")

        return build_media_prompt(omni, messages, use_audio_in_video=use_audio_in_video)
    ids = omni.tokenizer.encode(omni.tokenizer.render_chat(messages, add_generation_prompt=True))
    if not ids:
        raise ValueError("the prompt is empty")
    input_ids = torch.tensor([ids], dtype=torch.long, device=omni.device)      # (1, T)
    position_ids, deltas = rope_index(input_ids, None, None, None, False, None, None, omni.config)
    return Prompt(input_ids, embed(omni.thinker, input_ids), position_ids, int(deltas[0, 0]))
