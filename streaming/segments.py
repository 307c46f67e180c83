"""A conversation's history as segments: chat-template pieces, token ids with media expanded, prefill inputs.

What is notable:
- Pieces. Every item renders as its own piece of the chat template (the piece of message k is what it adds to the
  rendering of messages 0..k-1; the first one carries the template's default system prompt when the history does
  not start with a system message). Pieces are cut at `<|im_start|>`, a special token, so the token ids of the
  whole rendering are the concatenated ids of the pieces. An item's piece is rendered once (as first message, or
  after a one-message anchor) and kept; a template whose pieces depend on more than the message and whether it is
  first falls back to cutting prefixes of the whole rendering, and one that does not render a history as a prefix
  of its extension is refused with ValueError.
- Segments. A segment is one item's piece as token ids, each media placeholder expanded to one id per encoder row
  (an audio item still being spoken: the rows so far and nothing after them), tagged with the item's serial (a new
  serial for every content change that could alter embeddings). `match` finds where a planned history departs
  from the cached one: the first segment that differs, keeping a common token prefix inside a segment of the same
  item.
- Positions. The TMRoPE ids of a segment are `rope_index` of the segment alone, counted from 0 (the conversation
  offsets them by max id so far + 1); a text-only segment gets 0..T-1 on all three axes. For text, audio, images
  and videos (no audio-in-video) each segment ends with text, so this equals `rope_index` of the whole history.
- Media. Each media part is encoded once, when its item is added, and its encoder rows are kept in the Thinker's
  dtype, so a re-prefill after an edit never re-encodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from omnivox.encoders.audio import AudioEncoderSession
from omnivox.encoders.audio_features import FeatureConfig
from omnivox.encoders.images import ImageProcessorConfig
from omnivox.encoders.video import patch_batches
from omnivox.streaming import media as media_parts
from omnivox.thinker.model import embed
from omnivox.thinker.positions import rope_index

GENERATION = -1                     # segment key of the assistant header a reply is generated after
_ANCHOR = {"role": "system", "content": "."}  # a first message, so a piece can be rendered as "not first"


@dataclass
class Media:
    """One media part, encoded once: its encoder rows and what TMRoPE needs."""
    kind: str                       # "audio" | "image" | "video"
    rows: Tensor                    # (n, H) encoder output in the Thinker's dtype
    audio_frames: int = 0           # audio: mel frames (rope_index's audio_seqlens)
    grid: tuple | None = None       # image / video: (t, h, w) patches
    second_per_grid: float = 0.0    # video: seconds per temporal grid step


@dataclass
class Stream:
    """A user audio item being spoken."""
    session: AudioEncoderSession
    rows: list = field(default_factory=list)       # (k, H) encoder rows in order
    samples: list = field(default_factory=list)    # 16 kHz float32 chunks as pushed
    count: int = 0                                  # encoder rows so far


@dataclass
class Reply:
    """What `respond` produced for an assistant item (for truncate)."""
    fed_ids: list[int]                         # reply tokens the Thinker fed back (the Talker saw these)
    tokens_at: list[int] | None = None         # per speech code: reply tokens consumed when it was sampled
    pending_truncate_ms: int | None = None     # truncate() while the reply was still running


@dataclass
class Item:
    id: str
    role: str
    parts: list[dict] | str                    # as given (a string for the system prompt)
    serial: int
    media: list[Media] = field(default_factory=list)
    stream: Stream | None = None
    reply: Reply | None = None
    pieces: dict = field(default_factory=dict)  # first? -> rendered template piece
    ids: tuple | None = None                   # (piece text, media counts, token ids) cache

    def render_message(self) -> dict:
        """What the chat template sees (media parts as bare types; no arrays)."""
        if isinstance(self.parts, str):
            return {"role": self.role, "content": self.parts}
        content = [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"]}
                   for p in self.parts]
        return {"role": self.role, "content": content}


@dataclass
class Segment:
    key: int                                   # item serial, or GENERATION
    ids: list[int]
    item: Item | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def match(cached: list[Segment], plan: list[Segment]) -> tuple[int, int, int]:
    """(index of the first segment to (re)fill, tokens of it already cached, cache tokens that stay valid)."""
    start = 0
    for i, (c, s) in enumerate(zip(cached, plan)):
        if c.key == s.key and c.ids == s.ids:
            start += len(c.ids)
            continue
        p = common_prefix(c.ids, s.ids) if c.key == s.key else 0
        return i, p, start + p
    i = min(len(cached), len(plan))
    return i, 0, start


class SegmentPlanner:
    """Plans items as segments and builds their prefill inputs; encodes media parts (one per conversation)."""

    def __init__(self, omni, dtype: torch.dtype, device):
        self.omni = omni
        self.tok = omni.tokenizer
        self._dtype, self._device = dtype, device
        self._pieces: dict = {}                 # generation-prompt pieces
        self._fcfg: FeatureConfig | None = None
        self._icfg: ImageProcessorConfig | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Planning

    def plan(self, items: list[Item], generation: bool) -> list[Segment]:
        """The items as segments (+ the assistant header when generation)."""
        texts = self._texts(items, generation)
        plan = [Segment(it.serial, self._segment_ids(it, text), it) for it, text in zip(items, texts)]
        if generation:
            plan.append(Segment(GENERATION, self.tok.encode(texts[-1])))
        return plan

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.render_chat(messages, add_generation_prompt=generation)

    def _piece(self, item: Item, first: bool) -> str:
        if first not in item.pieces:
            m = item.render_message()
            if first:
                item.pieces[first] = self._render([m], False)
            else:
                before = self._render([_ANCHOR], False)
                text = self._render([_ANCHOR, m], False)
                item.pieces[first] = text[len(before):] if text.startswith(before) else None
        return item.pieces[first]

    def _generation_piece(self, first: bool) -> str:
        if first not in self._pieces:
            if first:
                self._pieces[first] = self._render([], True)
            else:
                before = self._render([_ANCHOR], False)
                text = self._render([_ANCHOR], True)
                self._pieces[first] = text[len(before):] if text.startswith(before) else None
        return self._pieces[first]

    def _texts(self, items: list[Item], generation: bool) -> list[str]:
        """Each item's piece of the rendered history (+ the assistant header); they concatenate to render_chat."""
        messages = [it.render_message() for it in items]
        full = self._render(messages, generation)
        pieces = [self._piece(it, k == 0) for k, it in enumerate(items)]
        if generation:
            pieces.append(self._generation_piece(not items))
        if None not in pieces and "".join(pieces) == full:
            return pieces
        # a template whose pieces depend on more than the message and whether it is first: cut the prefixes
        pieces, prev = [], ""
        for k in range(len(messages) + generation):
            text = full if k == len(messages) else self._render(messages[:k + 1], False)
            if not text.startswith(prev):
                raise ValueError("the chat template does not render a conversation as a prefix of its extension: "
                                 "a cached history cannot be extended")
            pieces.append(text[len(prev):])
            prev = text
        return pieces

    def _segment_ids(self, item: Item, text: str) -> list[int]:
        counts = (tuple(m.rows.shape[0] for m in item.media), item.stream.count if item.stream else None)
        if item.ids is not None and item.ids[0] == text and item.ids[1] == counts:
            return item.ids[2]
        t = self.omni.config.tokens
        kinds = {t.audio: "audio", t.image: "image", t.video: "video"}
        raw = self.tok.encode(text)
        media = {k: [m for m in item.media if m.kind == k] for k in ("audio", "image", "video")}
        if item.stream is not None:
            media["audio"] = [None]
        found = {k: sum(1 for i in raw if kinds.get(i) == k) for k in media}
        for kind, ms in media.items():
            if found[kind] != len(ms):
                raise ValueError(f"item {item.id!r} renders {found[kind]} {kind} placeholders for {len(ms)} {kind} "
                                 "parts (does a text part contain a media token?)")
        used = {k: 0 for k in media}
        ids: list[int] = []
        for i in raw:
            kind = kinds.get(i)
            if kind is None:
                ids.append(i)
                continue
            m = media[kind][used[kind]]
            used[kind] += 1
            if m is None:                                   # the audio of an open stream: rows so far, no tail
                ids += [i] * item.stream.count
                break
            ids += [i] * m.rows.shape[0]
        item.ids = (text, counts, ids)
        return ids

    # ------------------------------------------------------------------------------------------------------------
    # Prefill inputs

    def inputs(self, seg: Segment) -> tuple[Tensor, Tensor]:
        """A segment's input embeddings (T, H) (media rows written over the placeholders) and its TMRoPE ids
        (3, T) counted from 0."""
        t = self.omni.config.tokens
        ids = torch.tensor(seg.ids, dtype=torch.long, device=self._device)   # (T,)
        embeds = embed(self.omni.thinker, ids[None])[0].clone()             # (T, H)
        item = seg.item
        media = [] if item is None else item.media
        if item is not None and item.stream is not None and item.stream.rows:
            media = [Media("audio", torch.cat(item.stream.rows))]
        for kind, token in (("audio", t.audio), ("image", t.image), ("video", t.video)):
            rows = [m.rows for m in media if m.kind == kind]
            if rows:
                at = (ids == token).nonzero().view(-1)
                embeds[at] = torch.cat(rows)[:at.numel()].to(embeds.dtype)
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        if not images and not videos:
            pos = torch.arange(len(seg.ids), device=self._device).view(1, -1).expand(3, -1)   # (3, T)
            return embeds, pos
        audios = [m for m in media if m.kind == "audio"]
        position_ids, _ = rope_index(
            ids[None],
            torch.tensor([m.grid for m in images], dtype=torch.long) if images else None,
            torch.tensor([m.grid for m in videos], dtype=torch.long) if videos else None,
            None, False,
            torch.tensor([m.audio_frames for m in audios], dtype=torch.long) if audios else None,
            torch.tensor([m.second_per_grid for m in videos], dtype=torch.float32) if videos else None,
            self.omni.config)
        return embeds, position_ids[:, 0]                                   # (3, T)

    # ------------------------------------------------------------------------------------------------------------
    # Media

    def feature_cfg(self) -> FeatureConfig:
        if self._fcfg is None:
            self._fcfg = FeatureConfig.from_dir(self.omni.path)
        return self._fcfg

    def image_cfg(self) -> ImageProcessorConfig:
        if self._icfg is None:
            self._icfg = ImageProcessorConfig.from_dir(self.omni.path)
        return self._icfg

    def encode_media(self, parts: list[dict]) -> list[Media]:
        """Validate the parts and encode each media part once (its rows are kept for re-prefills)."""
        found = media_parts._media_parts([{"role": "user", "content": parts}])
        thinker = self.omni.thinker
        out = []
        for p in found:
            if p["type"] == "audio":
                a = media_parts._load_audio_part(p, self.feature_cfg())
                rows = thinker.audio_tower.encode(a.features)
                out.append(Media("audio", rows.to(self._dtype), audio_frames=a.frames))
            elif p["type"] == "image":
                im = media_parts._load_image_part(p, self.image_cfg())
                rows = thinker.visual.encode(im.vision.pixel_values, im.vision.grid_thw)
                out.append(Media("image", rows.to(self._dtype), grid=tuple(int(v) for v in im.vision.grid_thw[0])))
            else:
                v = media_parts._load_video_part(p, self.image_cfg(), self.feature_cfg(), False)
                rows = torch.cat([thinker.visual.encode(px, grid)
                                  for px, grid in patch_batches(v.frames, v.target, self.image_cfg())])
                out.append(Media("video", rows.to(self._dtype), grid=tuple(v.grid),
                                 second_per_grid=v.second_per_grid))
        return out
