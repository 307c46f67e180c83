"""Messages with audio, images and videos -> the Thinker's prompt (ids, embeddings, TMRoPE positions).

This is `Qwen2_5OmniProcessor.__call__` followed by the embedding merge and `get_rope_index` of the reference
Thinker, done in one pass:
1. Every media part is decoded and measured first (audio -> log-mel frames, image -> patch grid, video ->
   sampled resized frames + grid), so each placeholder's token count is known.
2. The chat template is rendered and tokenized; each `<|AUDIO|>` / `<|IMAGE|>` / `<|VIDEO|>` id is expanded in
   order. With `use_audio_in_video`, a video's placeholder becomes the processor's interleaved layout:
   audio_bos, then per `seconds_per_chunk` chunk the chunk's video tokens and the chunk's audio tokens, then
   audio_eos (the template's vision_bos/vision_eos stay around it). Chunk bounds use the processor's float64
   arithmetic (frame index · second_per_grid · position_id_per_seconds).
3. Ids are embedded and each item is encoded on its own (audio window batches inside the encoder; videos a few
   temporal patches at a time, see `encoders.video.patch_batches`) and written straight into its placeholder
   rows, so no concatenated feature tensor of all media is ever built.
4. Positions come from `thinker.positions.rope_index` with audio_seqlens = mel frame counts and
   second_per_grid = temporal_patch / sample fps per video.

Content parts: {"type": "text", "text"}, {"type": "audio", "audio": path | float array [, "sampling_rate"]},
{"type": "image", "image": path | PIL image | uint8 array [, "min_pixels", "max_pixels"]},
{"type": "video", "video": path | uint8 frames (T, H, W, 3) [, "fps", "min_frames", "max_frames", "nframes",
"min_pixels", "max_pixels", "total_pixels"]}. For a frames array, "fps" is the rate the frames were sampled at
(default 2, the reference processor's). Audio arrays are 16 kHz unless "sampling_rate" says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# load_audio and pcm16_to_float also decode the server's input audio: protocol code takes them from here
from omnivox.encoders.audio_features import FeatureConfig, load_audio, log_mel, pcm16_to_float  # noqa: F401
from omnivox.encoders.images import ImageProcessorConfig, VisionInput, preprocess_image
from omnivox.encoders.video import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, VideoSampling, extract_audio,
                                    frame_target, frames_tensor, patch_batches, read_video)
from omnivox.streaming.prompt import Prompt
from omnivox.thinker.model import embed
from omnivox.thinker.positions import audio_token_count, rope_index

MEDIA_TYPES = ("audio", "image", "video")
_OPTIONS = {
    "text": {"text"},
    "audio": {"audio", "sampling_rate"},
    "image": {"image", "min_pixels", "max_pixels"},
    "video": {"video", "fps", "min_frames", "max_frames", "nframes", "min_pixels", "max_pixels", "total_pixels"},
}


@dataclass
class _Audio:
    features: Tensor                       # (n_mels, L) log-mel

    @property
    def frames(self) -> int:
        return self.features.shape[1]

    @property
    def tokens(self) -> int:
        return audio_token_count(self.frames)


@dataclass
class _Image:
    vision: VisionInput


@dataclass
class _Video:
    frames: Tensor                         # (T, H, W, 3) uint8 (already at `target` for files)
    target: tuple[int, int]                # per-frame (h, w) fed to the encoder
    second_per_grid: float                 # temporal_patch / sampling fps
    grid: tuple[int, int, int]             # (t, h, w) patches
    audio: _Audio | None = None            # its audio track, with use_audio_in_video


# ----------------------------------------------------------------------------------------------------------------
# Parts -> measured items


def _media_parts(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': ...}")
    parts = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in _OPTIONS:
                raise ValueError(f"message content parts must be dicts with a type in {sorted(_OPTIONS)}, "
                                 f"got {p!r:.80}")
            kind = p["type"]
            if kind not in p:
                raise ValueError(f"a {kind!r} content part needs a {kind!r} key")
            unknown = set(p) - _OPTIONS[kind] - {"type"}
            if unknown:
                raise ValueError(f"{kind} part has unsupported options {sorted(unknown)}; "
                                 f"supported: {sorted(_OPTIONS[kind] - {kind})}")
            if kind in MEDIA_TYPES:
                parts.append(p)
    return parts


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _describe(source) -> str:
    return str(source) if _is_path(source) else type(source).__name__


def _audio_item(samples, fcfg: FeatureConfig) -> _Audio:
    return _Audio(log_mel(samples, fcfg))


def _load_audio_part(part: dict, fcfg: FeatureConfig) -> _Audio:
    source = part["audio"]
    sr = part.get("sampling_rate")
    try:
        if _is_path(source):
            samples = load_audio(source, target_sr=fcfg.sampling_rate)
        else:
            samples = load_audio(source, sr=int(sr) if sr is not None else fcfg.sampling_rate,
                                 target_sr=fcfg.sampling_rate)
        return _audio_item(samples, fcfg)
    except ValueError as e:
        raise ValueError(f"audio {_describe(source)}: {e}") from None


def _load_image_part(part: dict, icfg: ImageProcessorConfig) -> _Image:
    source = part["image"]
    try:
        return _Image(preprocess_image(source, icfg, min_pixels=part.get("min_pixels"),
                                       max_pixels=part.get("max_pixels")))
    except ValueError as e:
        raise ValueError(f"image {_describe(source)}: {e}") from None


def _grid(frames: int, target: tuple[int, int], icfg: ImageProcessorConfig) -> tuple[int, int, int]:
    tp, p = icfg.temporal_patch_size, icfg.patch_size
    return -(-frames // tp), target[0] // p, target[1] // p


def _load_video_part(part: dict, icfg: ImageProcessorConfig, fcfg: FeatureConfig, with_audio: bool) -> _Video:
    source = part["video"]
    pixels = dict(min_pixels=part.get("min_pixels"), max_pixels=part.get("max_pixels"),
                  total_pixels=part.get("total_pixels", "default"))
    if _is_path(source):
        nframes = part.get("nframes")
        sampling = VideoSampling(fps=float(part.get("fps", FPS)),
                                 min_frames=int(part.get("min_frames", FPS_MIN_FRAMES)),
                                 max_frames=int(part.get("max_frames", FPS_MAX_FRAMES)),
                                 nframes=None if nframes is None else int(nframes))
        video = read_video(source, icfg, sampling, **pixels)
        frames = torch.from_numpy(video.frames)
        item = _Video(frames, tuple(frames.shape[1:3]), video.second_per_grid(icfg),
                      _grid(frames.shape[0], tuple(frames.shape[1:3]), icfg))
        if with_audio:
            item.audio = _audio_item(extract_audio(source), fcfg)
        return item
    for key in ("min_frames", "max_frames", "nframes"):
        if key in part:
            raise ValueError(f"video option {key!r} applies to video files; a frames array is used as given")
    if with_audio:
        raise ValueError("use_audio_in_video needs video files: a video given as frames has no audio track")
    fps = float(part.get("fps", FPS))
    if not fps > 0:
        raise ValueError(f"video fps must be positive, got {fps}")
    try:
        frames = frames_tensor(source)
        target = frame_target(frames.shape[1], frames.shape[2], frames.shape[0], icfg, **pixels)
    except ValueError as e:
        raise ValueError(f"video frames: {e}") from None
    return _Video(frames, target, icfg.temporal_patch_size / fps, _grid(frames.shape[0], target, icfg))


# ----------------------------------------------------------------------------------------------------------------
# Placeholder expansion


def _chunk_runs(values: np.ndarray, per_chunk: int) -> list[int]:
    """Run lengths of `values` cut where a value reaches the next chunk bound (processor's get_chunked_index)."""
    runs, start, bound = [], 0, per_chunk
    for i, v in enumerate(values):
        if v >= bound:
            runs.append(i - start)
            start, bound = i, bound + per_chunk
    runs.append(len(values) - start)
    return runs


def interleaved_layout(grid: tuple[int, int, int], merge: int, second_per_grid: float, n_audio: int,
                       position_id_per_seconds: float, seconds_per_chunk: float) -> list[tuple[str, int]]:
    """[("video" | "audio", count), ...] between audio_bos and audio_eos of an audio-in-video placeholder."""
    t, h, w = grid
    per_step = (h // merge) * (w // merge)
    t_ids = np.repeat(np.arange(t), per_step) * second_per_grid * position_id_per_seconds  # float64, as the processor
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    v_runs = _chunk_runs(t_ids, per_chunk)
    a_runs = _chunk_runs(np.arange(n_audio), per_chunk)
    out = []
    for j in range(max(len(v_runs), len(a_runs))):
        if j < len(v_runs):
            out.append(("video", v_runs[j]))
        if j < len(a_runs):
            out.append(("audio", a_runs[j]))
    return out


def expand_placeholders(ids: list[int], items: list, tokens, merge: int, use_audio_in_video: bool) -> list[int]:
    """Replace each media placeholder id by its token run; ValueError when placeholders and items disagree."""
    by_kind = {"audio": [], "image": [], "video": []}
    for it in items:
        by_kind[{_Audio: "audio", _Image: "image", _Video: "video"}[type(it)]].append(it)
    token_of = {tokens.audio: "audio", tokens.image: "image", tokens.video: "video"}
    seen = {k: sum(1 for i in ids if token_of.get(i) == k) for k in by_kind}
    for kind, its in by_kind.items():
        if seen[kind] != len(its):
            raise ValueError(f"the rendered prompt has {seen[kind]} {kind} placeholders for {len(its)} {kind} "
                             "parts (does a text part contain a media token, or does the chat template drop media?)")
    ids_of = {"audio": tokens.audio, "image": tokens.image, "video": tokens.video}
    used = {k: 0 for k in by_kind}
    out: list[int] = []
    for i in ids:
        kind = token_of.get(i)
        if kind is None:
            out.append(i)
            continue
        it = by_kind[kind][used[kind]]
        used[kind] += 1
        if kind == "audio":
            out += [i] * it.tokens
        elif kind == "image":
            out += [i] * (int(it.vision.grid_thw[0].prod()) // merge ** 2)
        elif not use_audio_in_video:
            t, h, w = it.grid
            out += [i] * (t * h * w // merge ** 2)
        else:
            out.append(tokens.audio_start)
            for what, n in interleaved_layout(it.grid, merge, it.second_per_grid, it.audio.tokens,
                                              tokens.position_id_per_seconds, tokens.seconds_per_chunk):
                out += [ids_of[what]] * n
            out.append(tokens.audio_end)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Encode and scatter


class _Rows:
    """Placeholder row indices of one kind, handed out in prompt order."""

    def __init__(self, ids: Tensor, token: int):
        self.rows = (ids == token).nonzero().view(-1)
        self.pos = 0

    def take(self, n: int) -> Tensor:
        if self.pos + n > len(self.rows):
            raise ValueError("media encoders produced more tokens than the prompt has placeholders")
        r = self.rows[self.pos:self.pos + n]
        self.pos += n
        return r


@torch.no_grad()
def _encode_into(omni, embeds: Tensor, ids: Tensor, items: list, icfg: ImageProcessorConfig) -> None:
    thinker, t = omni.thinker, omni.config.tokens
    rows = {"audio": _Rows(ids, t.audio), "image": _Rows(ids, t.image), "video": _Rows(ids, t.video)}

    def put(kind: str, feats: Tensor) -> None:
        embeds[rows[kind].take(feats.shape[0])] = feats.to(device=embeds.device, dtype=embeds.dtype)

    for it in items:
        if isinstance(it, _Audio):
            put("audio", thinker.audio_tower.encode(it.features))
        elif isinstance(it, _Image):
            put("image", thinker.visual.encode(it.vision.pixel_values, it.vision.grid_thw))
        else:
            for pixels, grid in patch_batches(it.frames, it.target, icfg):
                put("video", thinker.visual.encode(pixels, grid))
            if it.audio is not None:
                put("audio", thinker.audio_tower.encode(it.audio.features))
    for kind, r in rows.items():
        if r.pos != len(r.rows):
            raise ValueError(f"{len(r.rows) - r.pos} {kind} placeholders were left without encoder output")


@torch.no_grad()
def build_media_prompt(omni, messages: list[dict], *, use_audio_in_video: bool = False) -> Prompt:
    """The Thinker's prompt for messages with media parts (see the module docstring for the part formats)."""
    parts = _media_parts(messages)
    fcfg = FeatureConfig.from_dir(omni.path)
    icfg = ImageProcessorConfig.from_dir(omni.path)
    merge = icfg.merge_size
    items = []
    for p in parts:
        if p["type"] == "audio":
            items.append(_load_audio_part(p, fcfg))
        elif p["type"] == "image":
            items.append(_load_image_part(p, icfg))
        else:
            items.append(_load_video_part(p, icfg, fcfg, use_audio_in_video))

    tok = omni.tokenizer
    ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
    ids = expand_placeholders(ids, items, omni.config.tokens, merge, use_audio_in_video)
    input_ids = torch.tensor([ids], dtype=torch.long, device=omni.device)              # (1, T)
    embeds = embed(omni.thinker, input_ids)[0]                                         # (T, H)
    _encode_into(omni, embeds, input_ids[0], items, icfg)

    audios = [it for it in items if isinstance(it, _Audio)
              or (isinstance(it, _Video) and it.audio is not None)]
    seqlens = [(it if isinstance(it, _Audio) else it.audio).frames for it in audios]
    images = [it.vision.grid_thw for it in items if isinstance(it, _Image)]
    videos = [it for it in items if isinstance(it, _Video)]
    position_ids, deltas = rope_index(
        input_ids,
        torch.cat(images) if images else None,
        torch.tensor([v.grid for v in videos], dtype=torch.long) if videos else None,
        None, use_audio_in_video,
        torch.tensor(seqlens, dtype=torch.long) if seqlens else None,
        torch.tensor([v.second_per_grid for v in videos], dtype=torch.float32) if videos else None,
        omni.config)
    return Prompt(input_ids, embeds[None], position_ids, int(deltas[0, 0]))
