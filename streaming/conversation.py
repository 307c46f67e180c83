"""Multi-turn conversation state over one Thinker KV cache that is kept across turns.

A `Conversation` holds the items of a chat (system prompt, user / assistant / system messages) and a KV cache
that holds exactly the tokens of `render_chat(history)`, so a new message prefills only its own tokens and a reply
starts right after it. The promise (tested): after any sequence of add / respond / delete / insert / truncate /
set_system / streamed audio, the cache holds the token ids of the fully rendered history and the next `respond`
gives the tokens of `pipeline.generate` on that history.

How it stays exact:
- Segments. Every message renders as its own piece of the chat template (the piece of message k is what it adds
  to the rendering of messages 0..k-1; the first one carries the template's default system prompt when the
  history does not start with a system message). Pieces are cut at `<|im_start|>`, a special token, so the token
  ids of the whole rendering are the concatenated ids of the pieces. The cache is a list of segments, each
  tagged with its item's serial (a new serial for every content change that could alter embeddings).
- Reconciling. Before a prefill the planned segments are compared with the cached ones; the cache is rewound to
  the first token that differs (inside a segment of the same item a common token prefix is kept) and the rest is
  prefilled. This one rule covers appends, edits (delete, insert, set_system, truncate: they rewind at once and
  re-prefill lazily at the next respond / audio push / append) and the end of an assistant reply: decode never
  feeds the sampled `<|im_end|>`, and the model may sample a non-canonical tokenization, so the reply segment is
  rewound to the first token that differs from the tokenized rendering and the rest (`<|im_end|>\n` at least)
  is prefilled with the next segment.
- Positions. TMRoPE ids of a segment are `rope_index` of the segment alone, offset by (max id so far + 1); a decoded
  token at cache index c gets c + delta with delta = max prompt id + 1 - prompt length, as in `pipeline.generate`.
  For text, audio, images and videos (no audio-in-video) each segment ends with text, so this equals
  `rope_index` of the whole history.
- The Talker's prompt for a turn is the whole history: per cached token its id (its Thinker embedding, zeroed at
  media placeholders, is recomputed from it by `talker_prefill`), its position ids and its last-layer hidden state
  are kept beside the KV cache and rewound with it (hidden states only when the checkpoint has a Talker).
- Memory. The cache starts at 256 positions and doubles (reallocate and copy) as the history grows, up to the
  model's `max_position_embeddings`; a history or reply past that raises ValueError. Media parts are encoded once
  when added and their encoder rows kept, so a re-prefill after an edit never re-encodes. `tokens` and `nbytes`
  let a server enforce per-session limits.
- Streaming audio. `begin_audio` prefills the user turn up to `<|audio_bos|>`, `push_audio` encodes each finished
  2 s encoder window and prefills its tokens (audio ids are sequential), `end_audio` encodes the tail, applies the
  encoder's revisions (the Whisper clamp floor depends on the loudest frame of the whole clip: windows emitted
  before a louder moment are re-encoded; the cache is rewound to the first revised row) and prefills
  `<|audio_eos|><|im_end|>\n`. The result equals adding the same audio as one part.
- Replies. `respond` registers the assistant item at once; the reply text becomes its content when the generator
  ends, also when it is closed early (a cancelled response keeps what was produced). With speech, the reply
  token count the Talker had consumed when each code was sampled is recorded, so `truncate(item, audio_end_ms)`
  keeps exactly the text behind the audio the listener heard (50 codes per second).
- While a reply is being generated the cache belongs to it: edits and audio pushes made meanwhile change the
  items at once but touch the cache only after the reply ends.

Not thread-safe: call it from one thread (the server's model worker).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from omnivox.encoders.audio import AudioEncoderSession
from omnivox.encoders.audio_features import FeatureConfig, num_frames
from omnivox.encoders.images import ImageProcessorConfig
from omnivox.encoders.video import patch_batches
from omnivox.streaming import media as media_parts
from omnivox.streaming.pipeline import (AudioChunk, Done, GenerationOptions, Speech, TextDelta, check_options,
                                        decode_reply)
from omnivox.thinker.model import KVCache, decode_step, embed, prefill, text_positions
from omnivox.thinker.positions import audio_token_count, rope_index

ROLES = ("user", "assistant", "system")
MIN_CAPACITY = 256                  # first KV cache allocation (positions); doubled as the history grows
CODES_PER_SECOND = 50               # Talker codes per second of speech (480 samples at 24 kHz each)
_GENERATION = -1                    # segment key of the assistant header a reply is generated after
_ANCHOR = {"role": "system", "content": "."}  # a first message, so a piece can be rendered as "not first"


@dataclass
class _Media:
    """One media part, encoded once: its encoder rows and what TMRoPE needs."""
    kind: str                       # "audio" | "image" | "video"
    rows: Tensor                    # (n, H) encoder output in the Thinker's dtype
    audio_frames: int = 0           # audio: mel frames (rope_index's audio_seqlens)
    grid: tuple | None = None       # image / video: (t, h, w) patches
    second_per_grid: float = 0.0    # video: seconds per temporal grid step


@dataclass
class _Stream:
    """A user audio item being spoken."""
    session: AudioEncoderSession
    rows: list = field(default_factory=list)       # (k, H) encoder rows in order
    samples: list = field(default_factory=list)    # 16 kHz float32 chunks as pushed
    count: int = 0                                  # encoder rows so far


@dataclass
class _Reply:
    """What `respond` produced for an assistant item (for truncate)."""
    fed_ids: list[int]                         # reply tokens the Thinker fed back (the Talker saw these)
    tokens_at: list[int] | None = None         # per speech code: reply tokens consumed when it was sampled
    pending_truncate_ms: int | None = None     # truncate() while the reply was still running


@dataclass
class _Item:
    id: str
    role: str
    parts: list[dict] | str                    # as given (a string for the system prompt)
    serial: int
    media: list[_Media] = field(default_factory=list)
    stream: _Stream | None = None
    reply: _Reply | None = None
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
class _Segment:
    key: int                                   # item serial, or _GENERATION
    ids: list[int]
    item: _Item | None = None


def _source_bytes(source) -> int:
    """Memory of a media part's source as given (arrays, tensors, PIL images; 0 for a path)."""
    if isinstance(source, np.ndarray):
        return source.nbytes
    if isinstance(source, Tensor):
        return source.numel() * source.element_size()
    if hasattr(source, "size") and hasattr(source, "getbands"):      # PIL image
        return source.size[0] * source.size[1] * len(source.getbands())
    return 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """Chat history + the Thinker state of its rendering. See the module docstring."""

    def __init__(self, omni, system: str | None = None):
        self.omni = omni
        self.cfg = omni.config.text
        self.tok = omni.tokenizer
        self.max_tokens = self.cfg.max_position_embeddings
        self._serial = 0
        self._items: list[_Item] = []
        self._system: _Item | None = None
        self._cached: list[_Segment] = []      # segments in the cache, in order (the last may be partial)
        self._stream_item: _Item | None = None
        self._responding: _Item | None = None
        self._dirty = True                      # the cache may differ from the history (cleared by a full sync)
        self._keep_hidden = omni.talker is not None
        self._pieces: dict = {}                 # generation-prompt pieces
        param = next(omni.thinker.parameters())
        self._dtype, self._device = param.dtype, omni.device
        self.cache: KVCache | None = None
        self._ids: Tensor | None = None         # (1, S) long: token ids in the cache
        self._pos: Tensor | None = None         # (3, 1, S) long: their TMRoPE ids
        self._hidden: Tensor | None = None      # (1, S, H): their last-layer hidden states (with a Talker)
        self._fcfg: FeatureConfig | None = None
        self._icfg: ImageProcessorConfig | None = None
        if system is not None:
            self.set_system(system)

    # ------------------------------------------------------------------------------------------------------------
    # Public state

    @property
    def system(self) -> str | None:
        return None if self._system is None else self._system.parts

    @system.setter
    def system(self, text: str | None) -> None:
        self.set_system(text)

    @property
    def tokens(self) -> int:
        """Positions held in the KV cache."""
        return 0 if self.cache is None else self.cache.length

    @property
    def nbytes(self) -> int:
        """Memory this conversation holds: KV cache, per-token ids / positions / hidden states, encoded media,
        kept audio samples and open encoder streams."""
        total = 0 if self.cache is None else self.cache.nbytes
        for t in (self._ids, self._pos, self._hidden):
            if t is not None:
                total += t.numel() * t.element_size()
        for item in self._items:
            total += sum(m.rows.numel() * m.rows.element_size() for m in item.media)
            if item.stream is not None:
                total += sum(r.numel() * r.element_size() for r in item.stream.rows)
                total += sum(s.nbytes for s in item.stream.samples)
                total += sum(f.numel() * f.element_size() for f, _ in item.stream.session.state.mel.history)
            if isinstance(item.parts, list):
                total += sum(_source_bytes(p.get(p["type"])) for p in item.parts if p["type"] != "text")
        return total

    def items(self) -> list[str]:
        return [it.id for it in self._items]

    def messages(self) -> list[dict]:
        """The history as pipeline messages (system prompt first), e.g. for `pipeline.generate`."""
        out = [{"role": "system", "content": self._system.parts}] if self._system is not None else []
        for it in self._items:
            if it.stream is not None:
                raise ValueError(f"item {it.id!r} is still receiving audio (end_audio first)")
            out.append({"role": it.role, "content": [dict(p) for p in it.parts]})
        return out

    def cached_ids(self) -> list[int]:
        """Token ids in the KV cache."""
        return self._ids[0, :self.tokens].tolist() if self.cache is not None else []

    # ------------------------------------------------------------------------------------------------------------
    # Editing

    @torch.inference_mode()
    def set_system(self, text: str | None) -> None:
        """Set (or with None remove) the system prompt; the history is re-prefilled from the top when it changes."""
        if text is not None and not isinstance(text, str):
            raise ValueError(f"the system prompt must be a string or None, got {type(text).__name__}")
        if text == self.system:
            return
        self._system = None if text is None else _Item("__system__", "system", text, self._next_serial())
        self._settle()

    @torch.inference_mode()
    def add(self, role: str, parts: list[dict], item_id: str, after: str | None = None) -> None:
        """Add a message. after=None appends (and prefills it now); else it goes after item `after` and the history
        from there is re-prefilled at the next respond."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self._check_new_id(item_id)
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        if not isinstance(parts, list) or not parts:
            raise ValueError("parts must be a non-empty list of content parts")
        for p in parts:
            if isinstance(p, dict) and p.get("type") == "text" and not isinstance(p.get("text"), str):
                raise ValueError("a text part needs a string 'text'")
        item = _Item(item_id, role, [dict(p) for p in parts], self._next_serial())
        item.media = self._encode_media(item.parts)
        index = len(self._items) if after is None else self._index(after) + 1
        self._items.insert(index, item)
        try:
            self._settle(prefill_now=after is None)
        except ValueError:
            self._items.remove(item)
            raise

    @torch.inference_mode()
    def delete(self, item_id: str) -> None:
        item = self._items[self._index(item_id)]
        if item is self._stream_item:
            self._stream_item = None
        self._items.remove(item)
        self._settle()

    @torch.inference_mode()
    def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Keep only the reply text behind the first `audio_end_ms` of an assistant item's speech."""
        item = self._items[self._index(item_id)]
        if item.role != "assistant" or item.reply is None or item.reply.tokens_at is None:
            raise ValueError(f"item {item_id!r} is not an assistant reply with audio: nothing to truncate")
        if not isinstance(audio_end_ms, (int, np.integer)) or isinstance(audio_end_ms, bool) or audio_end_ms < 0:
            raise ValueError(f"audio_end_ms must be a non-negative integer, got {audio_end_ms!r}")
        if item is self._responding:
            item.reply.pending_truncate_ms = int(audio_end_ms)  # applied when the reply ends
            return
        self._apply_truncate(item, int(audio_end_ms))
        self._settle()

    def _apply_truncate(self, item: _Item, audio_end_ms: int) -> None:
        reply = item.reply
        heard = math.ceil(audio_end_ms * CODES_PER_SECOND / 1000)
        if heard >= len(reply.tokens_at):
            return                              # all of it was heard
        keep = reply.tokens_at[heard - 1] if heard > 0 else 0
        reply.fed_ids = reply.fed_ids[:keep]
        reply.tokens_at = reply.tokens_at[:heard]
        # same serial: the segment keeps its cached token prefix (text only, so equal ids mean equal rows)
        item.parts = [{"type": "text", "text": self.tok.decode(reply.fed_ids)}]
        item.ids = None

    # ------------------------------------------------------------------------------------------------------------
    # Streaming user audio

    @torch.inference_mode()
    def begin_audio(self, item_id: str) -> None:
        """A new user item whose content is one audio part, prefilled window by window as it arrives."""
        if self._stream_item is not None:
            raise ValueError(f"audio item {self._stream_item.id!r} is still open (end_audio first)")
        self._check_new_id(item_id)
        encoder = self.omni.thinker.audio_tower
        item = _Item(item_id, "user", [{"type": "audio", "audio": None}], self._next_serial(),
                     stream=_Stream(AudioEncoderSession(encoder, self._feature_cfg(), keep_history=True)))
        self._items.append(item)
        self._stream_item = item
        self._settle(prefill_now=True)

    @torch.inference_mode()
    def push_audio(self, samples_16k: np.ndarray) -> None:
        """16 kHz mono float samples: encode the encoder windows they complete and prefill their tokens."""
        item = self._open_stream()
        x = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        item.stream.samples.append(x.copy())
        before = item.stream.count
        for rows in item.stream.session.push(x):
            self._add_stream_rows(item, rows)
        if item.stream.count > before or self._dirty:
            self._settle(prefill_now=True)

    @torch.inference_mode()
    def end_audio(self) -> None:
        """The person stopped: encode the rest, apply the encoder's revisions, complete the item."""
        item = self._open_stream()
        st = item.stream
        if not st.samples:
            raise ValueError("no audio was pushed")
        self._add_stream_rows(item, st.session.finish())
        rows = torch.cat(st.rows) if st.rows else torch.zeros(0, self.cfg.hidden_size, dtype=self._dtype)
        revisions = st.session.revisions()
        if revisions:
            rows = rows.clone()
            first = min(r for r, _ in revisions)
            for r, new in revisions:
                rows[r:r + new.shape[0]] = new.to(rows.dtype)
            self._rewind_segment_row(item, first)
        samples = np.concatenate(st.samples)
        frames = num_frames(samples.size, self._feature_cfg())
        if audio_token_count(frames) != rows.shape[0]:
            raise ValueError(f"streamed audio gave {rows.shape[0]} tokens, the clip needs {audio_token_count(frames)}")
        item.media = [_Media("audio", rows.to(device=self._device, dtype=self._dtype), audio_frames=frames)]
        item.parts = [{"type": "audio", "audio": samples}]
        item.stream = None
        item.ids = None
        self._stream_item = None
        self._settle(prefill_now=True)

    def _open_stream(self) -> _Item:
        if self._stream_item is None:
            raise ValueError("no audio item is open (begin_audio first)")
        return self._stream_item

    def _add_stream_rows(self, item: _Item, rows: Tensor) -> None:
        if rows.shape[0]:
            item.stream.rows.append(rows.to(device=self._device, dtype=self._dtype))
            item.stream.count += rows.shape[0]
            item.ids = None

    def _rewind_segment_row(self, item: _Item, row: int) -> None:
        """Drop the cache from encoder row `row` of a streamed item's audio on (its rows were revised)."""
        start = 0
        for seg in self._cached:
            if seg.item is item:
                head = seg.ids.index(self.omni.config.tokens.audio) if self.omni.config.tokens.audio in seg.ids \
                    else len(seg.ids)
                self._rewind_to(min(self.tokens, start + head + row))
                return
            start += len(seg.ids)

    # ------------------------------------------------------------------------------------------------------------
    # Responding

    def respond(self, options: GenerationOptions, item_id: str) -> Iterator[TextDelta | AudioChunk | Done]:
        """Prefill what is not cached yet, then generate one assistant turn (events as `pipeline.generate`). The
        reply becomes assistant item `item_id`, also when the generator is closed early."""
        check_options(self.omni, options)
        if options.use_audio_in_video:
            raise ValueError("use_audio_in_video is not supported in a conversation")
        if self._responding is not None:
            raise ValueError(f"a response ({self._responding.id!r}) is already in progress")
        if self._stream_item is not None:
            raise ValueError(f"audio item {self._stream_item.id!r} is still open (end_audio first)")
        self._check_new_id(item_id)
        return self._respond(options, item_id)

    @torch.inference_mode()  # torch re-enters the mode on each resumption and leaves it at each yield
    def _respond(self, options: GenerationOptions, item_id: str) -> Iterator[TextDelta | AudioChunk | Done]:
        t0 = time.perf_counter()
        self._check_new_id(item_id)
        if self._responding is not None or self._stream_item is not None:
            raise ValueError("a response is in progress or an audio item is open")
        logits = self._sync(generation=True, extra=options.max_new_tokens, need_logits=True)
        n = self.tokens
        thinker = self.omni.thinker
        delta = int(self._pos[:, :, :n].max()) + 1 - n
        speech = None
        if options.audio:
            hidden = self._hidden[:, :n]                                     # (1, T, H)
            speech = Speech(self.omni, options, self._ids[:, :n], self._pos[:, :, :n], hidden)
        item = _Item(item_id, "assistant", [{"type": "text", "text": ""}], self._next_serial(),
                     reply=_Reply([], tokens_at=speech.reply_tokens_at if speech is not None else None))
        self._items.append(item)
        self._responding = item
        header = self._cached[-1]                                             # the assistant header segment
        out_ids: list[int] = []

        def feed(next_id: Tensor, index: int):
            self._reserve(index + 1)
            pos = text_positions(index + delta, 1, 1, self._device)           # (3, 1, 1)
            logits, hidden = decode_step(thinker, self.cache, next_id, pos)  # (1, V), (1, H)
            self._record(index, next_id.view(1, 1), pos, hidden[:, None])
            header.ids.append(int(next_id[0]))
            item.reply.fed_ids.append(int(next_id[0]))
            return logits, hidden

        def finish() -> None:
            """The reply (whole, or as far as it got) becomes the item's content; the cache is released."""
            self._responding = None
            item.parts = [{"type": "text", "text": self.tok.decode(out_ids)}]
            if speech is not None:
                item.reply.tokens_at = list(speech.reply_tokens_at)
            header.key, header.item = item.serial, item
            self._dirty = True
            if item in self._items and item.reply.pending_truncate_ms is not None:
                self._apply_truncate(item, item.reply.pending_truncate_ms)
            self._settle()

        events = decode_reply(self.omni, options, logits, self._ids[:, :n], feed, speech, t0, out_ids)
        finished = False
        try:
            for event in events:
                if isinstance(event, Done):  # settle before the last event: a caller may stop reading at Done
                    finished = True
                    finish()
                yield event
        finally:
            if not finished:                 # closed early (cancel) or failed: keep what was produced
                events.close()
                finish()

    # ------------------------------------------------------------------------------------------------------------
    # Planning: the history as segments

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _check_new_id(self, item_id: str) -> None:
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"item_id must be a non-empty string, got {item_id!r}")
        if any(it.id == item_id for it in self._items):
            raise ValueError(f"an item with id {item_id!r} already exists")

    def _index(self, item_id: str) -> int:
        for i, it in enumerate(self._items):
            if it.id == item_id:
                return i
        raise ValueError(f"no item with id {item_id!r}")

    def _history(self) -> list[_Item]:
        """Items the cache should hold now: all of them, or up to an audio item still being spoken."""
        items = ([self._system] if self._system is not None else []) + self._items
        if self._stream_item is not None:
            items = items[:items.index(self._stream_item) + 1]
        return items

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.render_chat(messages, add_generation_prompt=generation)

    def _piece(self, item: _Item, first: bool) -> str:
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

    def _texts(self, items: list[_Item], generation: bool) -> list[str]:
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

    def _segment_ids(self, item: _Item, text: str) -> list[int]:
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

    def _plan(self, generation: bool) -> list[_Segment]:
        items = self._history()
        texts = self._texts(items, generation)
        plan = [_Segment(it.serial, self._segment_ids(it, text), it) for it, text in zip(items, texts)]
        if generation:
            plan.append(_Segment(_GENERATION, self.tok.encode(texts[-1])))
        return plan

    def _match(self, plan: list[_Segment]) -> tuple[int, int, int]:
        """(index of the first segment to (re)fill, tokens of it already cached, cache tokens that stay valid)."""
        start = 0
        for i, (c, s) in enumerate(zip(self._cached, plan)):
            if c.key == s.key and c.ids == s.ids:
                start += len(c.ids)
                continue
            p = _common_prefix(c.ids, s.ids) if c.key == s.key else 0
            return i, p, start + p
        i = min(len(self._cached), len(plan))
        return i, 0, start

    # ------------------------------------------------------------------------------------------------------------
    # Cache work

    def _settle(self, prefill_now: bool = False) -> None:
        """After an edit: rewind the cache to the first token the history no longer has; prefill the rest when
        asked (appends, audio). Nothing touches the cache while a reply is being generated."""
        self._dirty = True
        if self._responding is not None:
            return
        if prefill_now:
            self._sync(generation=False)
            return
        plan = self._plan(generation=False)
        _, _, valid = self._match(plan)
        self._rewind_to(valid)

    def _sync(self, generation: bool, extra: int = 0, need_logits: bool = False) -> Tensor | None:
        """Make the cache hold exactly the planned history (+ the assistant header); returns the logits of the
        last position when anything was prefilled (need_logits: always, re-running the last token if needed)."""
        plan = self._plan(generation)
        total = sum(len(s.ids) for s in plan)
        if total + extra > self.max_tokens:
            what = f"history ({total} tokens)" + (f" + max_new_tokens ({extra})" if extra else "")
            raise ValueError(f"{what} exceeds the model's context of {self.max_tokens} tokens")
        i, p, valid = self._match(plan)
        if need_logits and valid >= total:
            # everything is cached already: re-run the last token for its logits
            last = plan[-1]
            i, p, valid = len(plan) - 1, len(last.ids) - 1, total - 1
        self._rewind_to(valid)
        logits = None
        for k in range(i, len(plan)):
            seg = plan[k]
            from_row = p if k == i else 0
            if k == i and from_row:
                self._cached[-1] = _Segment(seg.key, list(seg.ids[:from_row]), seg.item)
            else:
                self._cached.append(_Segment(seg.key, [], seg.item))
            if from_row == len(seg.ids):
                continue
            seg_start = self.tokens - from_row
            offset = int(self._pos[:, :, :seg_start].max()) + 1 if seg_start else 0
            embeds, rel = self._segment_inputs(seg)                         # (T, H), (3, T)
            logits = self._prefill(embeds[from_row:], rel[:, from_row:] + offset, seg.ids[from_row:])
            self._cached[-1].ids = list(seg.ids)
        self._dirty = generation                 # the assistant header is not part of the history
        return logits

    def _segment_inputs(self, seg: _Segment) -> tuple[Tensor, Tensor]:
        """A segment's input embeddings (T, H) (media rows written over the placeholders) and its TMRoPE ids
        (3, T) counted from 0."""
        t = self.omni.config.tokens
        ids = torch.tensor(seg.ids, dtype=torch.long, device=self._device)   # (T,)
        embeds = embed(self.omni.thinker, ids[None])[0].clone()             # (T, H)
        item = seg.item
        media = [] if item is None else item.media
        if item is not None and item.stream is not None and item.stream.rows:
            media = [_Media("audio", torch.cat(item.stream.rows))]
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

    def _prefill(self, embeds: Tensor, positions: Tensor, ids: list[int]) -> Tensor:
        """Append rows: embeds (T, H), positions (3, T) -> logits (1, V) of the last one."""
        n, t = self.tokens, embeds.shape[0]
        self._reserve(n + t)
        pos = positions[:, None].to(self._device)                            # (3, 1, T)
        logits, hidden = prefill(self.omni.thinker, self.cache, embeds[None].to(self._dtype), pos)  # (1,V), (1,T,H)
        self._record(n, torch.tensor([ids], dtype=torch.long, device=self._device), pos, hidden)
        return logits

    def _record(self, start: int, ids: Tensor, pos: Tensor, hidden: Tensor) -> None:
        """Per-token state of rows start.. (the KV cache itself was written by the model)."""
        t = ids.shape[1]
        self._ids[:, start:start + t] = ids
        self._pos[:, :, start:start + t] = pos
        if self._hidden is not None:
            self._hidden[:, start:start + t] = hidden.to(self._hidden.dtype)

    def _reserve(self, n: int) -> None:
        """Capacity for n positions: allocate, or double (reallocate and copy) until it fits."""
        if n > self.max_tokens:
            raise ValueError(f"the conversation needs {n} positions; the model's context is {self.max_tokens}")
        cap = 0 if self.cache is None else self.cache.max_len
        if n <= cap:
            return
        new = max(MIN_CAPACITY, cap)
        while new < n:
            new *= 2
        new = min(new, self.max_tokens)
        length = self.tokens
        if self.cache is None:
            self.cache = KVCache.allocate(self.cfg, 1, new, device=self._device, dtype=self._dtype)
        else:
            self.cache = self.cache.resized(new)

        ids = torch.zeros(1, new, dtype=torch.long, device=self._device)
        pos = torch.zeros(3, 1, new, dtype=torch.long, device=self._device)
        if self._ids is not None:
            ids[:, :length] = self._ids[:, :length]
            pos[:, :, :length] = self._pos[:, :, :length]
        self._ids, self._pos = ids, pos
        if self._keep_hidden:
            hidden = torch.zeros(1, new, self.cfg.hidden_size, dtype=self._dtype, device=self._device)
            if self._hidden is not None:
                hidden[:, :length] = self._hidden[:, :length]
            self._hidden = hidden

    def _rewind_to(self, n: int) -> None:
        """Keep the first n cached tokens (segments after them dropped, the one they end in cut)."""
        if n >= self.tokens:
            return
        self.cache.truncate(n)
        start, kept = 0, []
        for seg in self._cached:
            if start >= n:
                break
            take = min(len(seg.ids), n - start)
            kept.append(seg if take == len(seg.ids) else _Segment(seg.key, seg.ids[:take], seg.item))
            start += take
        self._cached = kept

    # ------------------------------------------------------------------------------------------------------------
    # Media

    def _feature_cfg(self) -> FeatureConfig:
        if self._fcfg is None:
            self._fcfg = FeatureConfig.from_dir(self.omni.path)
        return self._fcfg

    def _image_cfg(self) -> ImageProcessorConfig:
        if self._icfg is None:
            self._icfg = ImageProcessorConfig.from_dir(self.omni.path)
        return self._icfg

    def _encode_media(self, parts: list[dict]) -> list[_Media]:
        """Validate the parts and encode each media part once (its rows are kept for re-prefills)."""
        found = media_parts._media_parts([{"role": "user", "content": parts}])
        thinker = self.omni.thinker
        out = []
        for p in found:
            if p["type"] == "audio":
                a = media_parts._load_audio_part(p, self._feature_cfg())
                rows = thinker.audio_tower.encode(a.features)
                out.append(_Media("audio", rows.to(self._dtype), audio_frames=a.frames))
            elif p["type"] == "image":
                im = media_parts._load_image_part(p, self._image_cfg())
                rows = thinker.visual.encode(im.vision.pixel_values, im.vision.grid_thw)
                out.append(_Media("image", rows.to(self._dtype), grid=tuple(int(v) for v in im.vision.grid_thw[0])))
            else:
                v = media_parts._load_video_part(p, self._image_cfg(), self._feature_cfg(), False)
                rows = torch.cat([thinker.visual.encode(px, grid)
                                  for px, grid in patch_batches(v.frames, v.target, self._image_cfg())])
                out.append(_Media("video", rows.to(self._dtype), grid=tuple(v.grid),
                                  second_per_grid=v.second_per_grid))
        return out
