"""Multi-turn conversation state over one Thinker KV cache that is kept across turns.

A `Conversation` holds the items of a chat (system prompt, user / assistant / system messages) and a KV cache
that holds exactly the tokens of `render_chat(history)`, so a new message prefills only its own tokens and a reply
starts right after it. The promise (tested): after any sequence of add / respond / delete / insert / truncate /
set_system / streamed audio, the cache holds the token ids of the fully rendered history and the next `respond`
gives the tokens of `pipeline.generate` on that history.

How it stays exact:
- Segments (`streaming/segments.py`). Every item renders as its own piece of the chat template, cut at
  `<|im_start|>`, so the token ids of the whole rendering are the concatenated ids of the pieces. The cache is a
  list of segments, each tagged with its item's serial (a new serial for every content change that could alter
  embeddings).
- Reconciling. Before a prefill the planned segments are compared with the cached ones; the cache is rewound to
  the first token that differs (inside a segment of the same item a common token prefix is kept) and the rest is
  prefilled. This one rule covers appends, edits (delete, insert, set_system, truncate: they rewind at once and
  re-prefill lazily at the next respond / audio push / append) and the end of an assistant reply: decode never
  feeds the sampled `<|im_end|>`, and the model may sample a non-canonical tokenization, so the reply segment is
  rewound to the first token that differs from the tokenized rendering and the rest (`<|im_end|>\n` at least)
  is prefilled with the next segment.
- Positions. A segment's TMRoPE ids (`rope_index` of the segment alone) are offset by (max id so far + 1); a
  decoded token at cache index c gets c + delta with delta = max prompt id + 1 - prompt length, as in
  `pipeline.generate`. This equals `rope_index` of the whole history (segments.py says why).
- The Talker's prompt for a turn is the whole history: per cached token its id (its Thinker embedding, zeroed at
  media placeholders, is recomputed from it by `talker_prefill`), its position ids and its last-layer hidden state
  are kept beside the KV cache and rewound with it (hidden states only when the checkpoint has a Talker).
- Memory. The cache starts at 256 positions and doubles (reallocate and copy) as the history grows, up to
  `max_tokens` (the model's `max_position_embeddings`, or less: a server's per-session context). Media parts are
  encoded once
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
- Context limit (the Realtime API's `truncation`). When the history (+ the reply's max_new_tokens) would not fit
  in `max_tokens`, `truncation="auto"` drops the oldest items (never the system prompt, never the latest item)
  until it fits — or, with a retention ratio r, until it fits in r * max_tokens, so the next turns do not truncate
  again at once — and the cache is rebuilt once from the first dropped row (the system prompt's rows stay; media
  rows are kept, nothing is re-encoded). `truncation="disabled"` raises `ContextFull` instead. Dropped ids are
  queued for the owner (`take_dropped`, safe from another thread).
- Transcription. `transcribe(item_id, options)` answers an ASR prompt (Qwen2.5-Omni's: system "You are a speech
  recognition model.", the user's audio then "Transcribe the audio into text.") over a user audio item's encoded
  rows in a separate, throw-away cache: text only, the history's cache is not touched, nothing is re-encoded.

Not thread-safe: call it from one thread (the server's model worker).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from omnivox.encoders.audio import AudioEncoderSession
from omnivox.encoders.audio_features import num_frames
from omnivox.streaming.pipeline import (AudioChunk, Done, GenerationOptions, Speech, TextDelta, check_options,
                                        decode_reply)
from omnivox.streaming.segments import Item, Media, Reply, Segment, SegmentPlanner, Stream, match
from omnivox.thinker.model import KVCache, decode_step, prefill, text_positions
from omnivox.thinker.positions import audio_token_count

ROLES = ("user", "assistant", "system")
MIN_CAPACITY = 256                  # first KV cache allocation (positions); doubled as the history grows
CODES_PER_SECOND = 50               # Talker codes per second of speech (480 samples at 24 kHz each)
TRUNCATION = ("auto", "disabled")   # or a retention ratio in (0, 1]
# Qwen2.5-Omni's speech-recognition prompt (the model card's audio cookbook; it names the language when known:
# "Transcribe the English audio into text without any punctuation marks.")
ASR_SYSTEM_PROMPT = "You are a speech recognition model."
ASR_INSTRUCTION = "Transcribe the audio into text."


class ContextFull(ValueError):
    """The history (+ the reply's max_new_tokens) does not fit in the context and truncation is off."""


def _source_bytes(source) -> int:
    """Memory of a media part's source as given (arrays, tensors, PIL images; 0 for a path)."""
    if isinstance(source, np.ndarray):
        return source.nbytes
    if isinstance(source, Tensor):
        return source.numel() * source.element_size()
    if hasattr(source, "size") and hasattr(source, "getbands"):      # PIL image
        return source.size[0] * source.size[1] * len(source.getbands())
    return 0



class Conversation:
    """Chat history + the Thinker state of its rendering. See the module docstring."""

    def __init__(self, omni, system: str | None = None, max_tokens: int | None = None,
                 truncation: str | float = "auto", keep_hidden: bool | None = None):
        self.omni = omni
        self.cfg = omni.config.text
        self.tok = omni.tokenizer
        limit = self.cfg.max_position_embeddings
        if max_tokens is not None and not 0 < max_tokens <= limit:
            raise ValueError(f"max_tokens must be in 1..{limit} (the model's context), got {max_tokens}")
        self.max_tokens = max_tokens or limit
        self.truncation = truncation            # "auto" | "disabled" | a retention ratio (see the module docstring)
        self._dropped: collections.deque[str] = collections.deque()
        self.rebuilds = 0                       # truncations that dropped items (each rebuilds the cache once)
        self._serial = 0
        self._items: list[Item] = []
        self._system: Item | None = None
        self._cached: list[Segment] = []      # segments in the cache, in order (the last may be partial)
        self._stream_item: Item | None = None
        self._responding: Item | None = None
        self._dirty = True                      # the cache may differ from the history (cleared by a full sync)
        self._keep_hidden = omni.talker is not None if keep_hidden is None else keep_hidden
        param = next(omni.thinker.parameters())
        self._dtype, self._device = param.dtype, omni.device
        self._planner = SegmentPlanner(omni, self._dtype, self._device)   # pieces, segment ids, encoded media
        self.cache: KVCache | None = None
        self._ids: Tensor | None = None         # (1, S) long: token ids in the cache
        self._pos: Tensor | None = None         # (3, 1, S) long: their TMRoPE ids
        self._hidden: Tensor | None = None      # (1, S, H): their last-layer hidden states (with a Talker)
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

    def take_dropped(self) -> list[str]:
        """Ids of the items truncation dropped since the last call (callable from any thread)."""
        out = []
        while self._dropped:
            out.append(self._dropped.popleft())
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Editing

    @torch.inference_mode()
    def set_system(self, text: str | None) -> None:
        """Set (or with None remove) the system prompt; the history is re-prefilled from the top when it changes."""
        if text is not None and not isinstance(text, str):
            raise ValueError(f"the system prompt must be a string or None, got {type(text).__name__}")
        if text == self.system:
            return
        self._system = None if text is None else Item("__system__", "system", text, self._next_serial())
        self._settle()

    @torch.inference_mode()
    def add(self, role: str, parts: list[dict], item_id: str, after: str | None = None,
            media: list[Media] | None = None) -> None:
        """Add a message. after=None appends (and prefills it now); else it goes after item `after` and the history
        from there is re-prefilled at the next respond. `media`: the parts' encoder rows, already computed (by
        another conversation) instead of encoding them here."""
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
        item = Item(item_id, role, [dict(p) for p in parts], self._next_serial())
        item.media = self._planner.encode_media(item.parts) if media is None else list(media)
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

    def _apply_truncate(self, item: Item, audio_end_ms: int) -> None:
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
        item = Item(item_id, "user", [{"type": "audio", "audio": None}], self._next_serial(),
                    stream=Stream(AudioEncoderSession(encoder, self._planner.feature_cfg(), keep_history=True)))
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
        frames = num_frames(samples.size, self._planner.feature_cfg())
        if audio_token_count(frames) != rows.shape[0]:
            raise ValueError(f"streamed audio gave {rows.shape[0]} tokens, the clip needs {audio_token_count(frames)}")
        item.media = [Media("audio", rows.to(device=self._device, dtype=self._dtype), audio_frames=frames)]
        item.parts = [{"type": "audio", "audio": samples}]
        item.stream = None
        item.ids = None
        self._stream_item = None
        self._settle(prefill_now=True)

    def _open_stream(self) -> Item:
        if self._stream_item is None:
            raise ValueError("no audio item is open (begin_audio first)")
        return self._stream_item

    def _add_stream_rows(self, item: Item, rows: Tensor) -> None:
        if rows.shape[0]:
            item.stream.rows.append(rows.to(device=self._device, dtype=self._dtype))
            item.stream.count += rows.shape[0]
            item.ids = None

    def _rewind_segment_row(self, item: Item, row: int) -> None:
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
        item = Item(item_id, "assistant", [{"type": "text", "text": ""}], self._next_serial(),
                    reply=Reply([], tokens_at=speech.reply_tokens_at if speech is not None else None))
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
    # Transcription

    def audio_tokens(self, item_id: str) -> int:
        """Audio placeholder tokens (encoder rows) of an item."""
        item = self._items[self._index(item_id)]
        rows = sum(m.rows.shape[0] for m in item.media if m.kind == "audio")
        return rows + (item.stream.count if item.stream is not None else 0)

    def transcribe(self, item_id: str, options: GenerationOptions,
                   instruction: str = ASR_INSTRUCTION) -> Iterator[TextDelta | Done]:
        """The words of user item `item_id`'s audio: the ASR prompt over its encoded audio rows, answered in a
        separate cache (events as `respond`, text only). The item is read now; the work runs as the generator is
        advanced, so a scheduler can run it at low priority."""
        item = self._items[self._index(item_id)]
        if item.stream is not None:
            raise ValueError(f"item {item_id!r} is still receiving audio (end_audio first)")
        audio = [(p, m) for p, m in zip([p for p in item.parts if p["type"] in ("audio", "image", "video")],
                                         item.media) if m.kind == "audio"]
        if not audio:
            raise ValueError(f"item {item_id!r} has no audio to transcribe")
        parts = [dict(p) for p, _ in audio] + [{"type": "text", "text": instruction}]
        media = [m for _, m in audio]
        options = replace(options, audio=False)
        check_options(self.omni, options)

        def run():
            asr = Conversation(self.omni, ASR_SYSTEM_PROMPT, truncation="disabled", keep_hidden=False)
            asr.add("user", parts, "asr_audio", media=media)
            yield from asr.respond(options, "asr_text")
        return run()

    # ------------------------------------------------------------------------------------------------------------
    # Items and the planned history (segments.py renders and tokenizes it)

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

    def _history(self) -> list[Item]:
        """Items the cache should hold now: all of them, or up to an audio item still being spoken."""
        items = ([self._system] if self._system is not None else []) + self._items
        if self._stream_item is not None:
            items = items[:items.index(self._stream_item) + 1]
        return items

    def _plan(self, generation: bool) -> list[Segment]:
        return self._planner.plan(self._history(), generation)

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
        _, _, valid = match(self._cached, plan)
        self._rewind_to(valid)

    def _sync(self, generation: bool, extra: int = 0, need_logits: bool = False) -> Tensor | None:
        """Make the cache hold exactly the planned history (+ the assistant header); returns the logits of the
        last position when anything was prefilled (need_logits: always, re-running the last token if needed)."""
        plan = self._plan(generation)
        total = sum(len(s.ids) for s in plan)
        if total + extra > self.max_tokens:
            plan = self._make_room(total, extra, generation)
        i, p, valid = match(self._cached, plan)
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
                self._cached[-1] = Segment(seg.key, list(seg.ids[:from_row]), seg.item)
            else:
                self._cached.append(Segment(seg.key, [], seg.item))
            if from_row == len(seg.ids):
                continue
            seg_start = self.tokens - from_row
            offset = int(self._pos[:, :, :seg_start].max()) + 1 if seg_start else 0
            embeds, rel = self._planner.inputs(seg)                            # (T, H), (3, T)
            logits = self._prefill(embeds[from_row:], rel[:, from_row:] + offset, seg.ids[from_row:])
            self._cached[-1].ids = list(seg.ids)
        self._dirty = generation                 # the assistant header is not part of the history
        return logits

    def _make_room(self, total: int, extra: int, generation: bool) -> list[Segment]:
        """Drop the oldest items so that the history + `extra` fits (module docstring); -> the new plan."""
        what = f"the conversation ({total} tokens)" + (f" + max_new_tokens ({extra})" if extra else "")
        if self.truncation == "disabled":
            raise ContextFull(f"{what} exceeds the context of {self.max_tokens} tokens and truncation is disabled: "
                              "delete items or enable truncation")
        history = self._history()
        head = history[:1] if self._system is not None else []
        body = history[len(head):]                  # the latest item is never dropped
        limit = self.max_tokens - extra
        target = limit
        if not isinstance(self.truncation, str):   # keep a fraction of the post-instruction budget
            fixed = sum(len(s.ids) for s in self._planner.plan(head, False)) if head else 0
            target = fixed + int(float(self.truncation) * (limit - fixed))
        best = None
        for k in range(1, len(body)):
            plan = self._planner.plan(head + body[k:], generation)
            size = sum(len(s.ids) for s in plan)
            if size <= limit:
                best = (k, plan)
                if size <= target:
                    break
        if best is None:
            raise ContextFull(f"{what} exceeds the context of {self.max_tokens} tokens even with only the system "
                              "prompt and the latest item kept")
        k, plan = best
        for item in body[:k]:
            self._items.remove(item)
            self._dropped.append(item.id)
        self.rebuilds += 1
        return plan

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
            kept.append(seg if take == len(seg.ids) else Segment(seg.key, seg.ids[:take], seg.item))
            start += take
        self._cached = kept
