"""One OpenAI-Realtime websocket session: the state machine, turn detection, barge-in, pacing and limits.

`RealtimeSession(ws, app_state, SessionLimits, model_id, beta)` speaks the Realtime API's GA event names (a client
that announces `OpenAI-Beta: realtime=v1` gets the beta names and flat session fields). Conversation state is
`streaming.conversation.Conversation` (KV cache kept across turns), turn detection `streaming.vad.TurnDetector`
(Silero). The wire format, validating client events and building session/item/response objects, is
`realtime_events.py`; the input audio timeline (24 kHz PCM16 -> streaming soxr -> 16 kHz) is `realtime_audio.py`.
Three coroutines per session:
- the receive loop validates each client event and runs its handler; a bad event gets an `error` event and the
  session goes on. With server VAD, the `TurnDetector` sees every appended sample; from `speech_started` on, the
  turn's audio is pushed into the `Conversation` (begin_audio / push_audio / end_audio, on the engine worker) while
  the person speaks, so at `speech_stopped` only the last fraction of a second is left to encode and end-of-turn
  latency does not grow with the length of the question.
- the response task runs one turn through `Engine.stream` and turns its events into the response lifecycle
  (created, output_item.added, conversation.item.added, content_part.added, deltas, *.done, response.done).
  Outgoing audio is paced: the client is assumed to play audio as it arrives (continuously while it has some), and
  a delta is sent only while it holds at most `audio_lead_s` (0.5 s) of unplayed audio, so a cancel leaves at most
  that much queued there (and a stall in generation does not let the server run ahead later).
- the sender task drains a bounded queue into the socket; a client that stops reading fills it, which stalls the
  response task, which stalls the engine stream (its buffer fills): memory stays bounded.
Barge-in: `speech_started` during a response (interrupt_response) sets the turn's cancel events: no more audio is
sent from that moment, the engine closes the generator at its next round, `response.done` says cancelled.
`conversation.item.truncate` then rewinds the assistant item to what the listener heard. The turn is also handed
the cancel flag as `GenerationOptions.stop`, so generation stops within the one step (a token, a Talker code or a
token2wav block) in flight, and no audio of a response is sent after its `response.done`.
Input audio transcription (`audio.input.transcription` / beta `input_audio_transcription`, off by default): each
committed user audio turn is transcribed by the loaded model (`Conversation.transcribe`, the ASR prompt over the
item's encoded audio, text only) as a background engine stream, submitted after the turn's response, so it runs
in the gaps the paced reply leaves and never takes a step from it; `...input_audio_transcription.delta` /
`.completed` (or `.failed`) follow, and the item's `input_audio` part then carries the transcript.
Context limit: the conversation's cache is at most `SessionLimits.max_context_tokens` (the model's context by
default); past it the session's `truncation` ("auto" by default) drops the oldest items (announced with
`conversation.item.deleted`), "disabled" fails the response with `context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, replace

from omnivox.server.engine import EngineBusy
from omnivox.server.realtime_audio import ENCODER_RATE, InputTimeline, audio_turn
from omnivox.server.realtime_events import (BETA_NAMES, GA_NAMES, MAX_EVENT_BYTES, MIN_COMMIT_MS, ClientError,
                                     SessionSettings, decode_frame, decode_pcm16, default_turn_detection, error_event,
                                     event_part, event_type, get_field, message_item, new_id, output_part, parse_item,
                                     parse_response_params, parse_session_update, pcm16_to_float, response_object,
                                     response_status, session_object, transcription_usage, usage_object)
from omnivox.streaming.conversation import ASR_INSTRUCTION, ContextFull, Conversation
from omnivox.streaming.decoding import checkpoint_sampling
from omnivox.streaming.pipeline import (SAMPLE_RATE, SPEECH_SYSTEM_PROMPT, AudioChunk, Done, GenerationOptions,
                                        TextDelta)
from omnivox.streaming.vad import SpeechStarted, SpeechStopped, TurnDetector, VadConfig, item_start_ms


DELTA_SECONDS = 0.1                  # outgoing audio deltas are cut to this length (pacing granularity)


@dataclass
class SessionLimits:
    """Per-session limits and defaults (the server's ServerOptions carries one)."""
    max_event_bytes: int = MAX_EVENT_BYTES
    max_input_audio_s: float = 15 * 60          # audio buffered for one user turn
    max_session_s: float = 60 * 60              # then `session_expired` and the socket closes
    max_output_tokens: int = 1024               # Thinker tokens per response (a session may ask for fewer)
    max_codec_tokens: int = 4096                # Talker codes per response (50 per second of speech)
    audio_lead_s: float | None = 0.5            # pacing: audio sent ahead of real time; None: no pacing
    outgoing_queue: int = 256                   # events waiting for the socket
    stream_buffer: int = 16                     # engine events buffered per response
    max_context_tokens: int | None = None       # the conversation's KV cache (None: the model's context)


# ----------------------------------------------------------------------------------------------------------------
# Engine-side jobs (run on the worker thread)

def _respond(conv, system: str | None, options: GenerationOptions, item_id: str):
    if conv.system != system:
        conv.set_system(system)
    return conv.respond(options, item_id)


LANGUAGES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
             "ja": "Japanese", "ko": "Korean", "ru": "Russian", "pt": "Portuguese", "ar": "Arabic", "nl": "Dutch"}


def asr_instruction(language: str | None) -> str:
    """The ASR prompt's text, naming the language when the client gave one (as the model card's prompt does)."""
    if not language:
        return ASR_INSTRUCTION
    return f"Transcribe the {LANGUAGES.get(language.lower(), language)} audio into text."


def conv_truncation(setting) -> str | float:
    """The session's `truncation` as the conversation's policy."""
    return setting if isinstance(setting, str) else setting["retention_ratio"]


# ----------------------------------------------------------------------------------------------------------------
# The session

@dataclass
class _Response:
    id: str
    item_id: str
    cancel: threading.Event                     # read by the engine worker
    cancelled: asyncio.Event                    # wakes the pacing sleep
    task: asyncio.Task | None = None
    reason: str | None = None
    t_request: float = 0.0
    t_end_of_turn: float | None = None


class RealtimeSession:
    """One websocket client. `state` carries omni, engine, metrics (the app's state); `run()` until it leaves."""

    def __init__(self, ws, state, limits: SessionLimits, model_id: str, beta: bool = False):
        self.ws, self.state, self.limits, self.model_id, self.beta = ws, state, limits, model_id, beta
        self.omni, self.engine = state.omni, state.engine
        self.metrics = getattr(state, "metrics", None)
        self.id = new_id("sess")
        speakers = sorted(self.omni.speakers or {})
        self.speakers = speakers
        self.can_speak = bool(speakers) and self.omni.talker is not None
        default_voice = ("Chelsie" if "Chelsie" in speakers else speakers[0]) if speakers else None
        self.settings = SessionSettings(output_modalities=["audio"] if self.can_speak else ["text"],
                                        instructions="", voice=default_voice,
                                        turn_detection=default_turn_detection())
        self.sampling = checkpoint_sampling(self.omni.config.generation)
        self.conv = Conversation(self.omni, None, max_tokens=limits.max_context_tokens)
        self.asr_queue: asyncio.Queue = asyncio.Queue()   # committed user audio items to transcribe
        self.asr_task: asyncio.Task | None = None
        self.items: dict[str, dict] = {}        # item id -> its server-side description (in conversation order)
        self.out: asyncio.Queue = asyncio.Queue(maxsize=limits.outgoing_queue)
        self.response: _Response | None = None
        self.timeline = InputTimeline()
        self.vad = None
        self.vad_origin_ms = 0
        self._new_vad()
        self.turn_item: str | None = None       # user audio item being spoken (server VAD)
        self.turn_start = 0                     # 16 kHz index where the buffered / spoken turn starts
        self.pushed = 0                         # 16 kHz index pushed into the conversation so far
        self.t_created = time.monotonic()
        self.closed = False

    # ------------------------------------------------------------------------------------------------ plumbing
    async def send(self, event: dict) -> None:
        if self.closed:
            return
        if self.beta:
            event["type"] = BETA_NAMES.get(event["type"], event["type"])
        event = {"event_id": new_id("event"), **event}
        await self.out.put(json.dumps(event, ensure_ascii=False))

    async def error(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                    type_: str = "invalid_request_error") -> None:
        if self.metrics is not None:
            self.metrics.errors_total.inc(type=code if code == "server_busy" else type_)
        await self.send(error_event(code, message, param, event_id, type_))

    async def _sender(self) -> None:
        while True:
            text = await self.out.get()
            await self.ws.send_text(text)

    def _new_vad(self) -> None:
        td = self.settings.turn_detection
        if td is None:
            self.vad = None
            return
        self.vad = TurnDetector(VadConfig(threshold=td["threshold"], prefix_padding_ms=td["prefix_padding_ms"],
                                          silence_duration_ms=td["silence_duration_ms"]), sample_rate=SAMPLE_RATE)
        # the detector's clock starts at its first sample; event times are session times
        self.vad_origin_ms = self.timeline.in_samples * 1000 // SAMPLE_RATE if self.timeline else 0

    # ------------------------------------------------------------------------------------------------ main loop
    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        receiver = asyncio.create_task(self._receive_loop())
        self.asr_task = asyncio.create_task(self._transcriber())
        try:
            await self.send({"type": "session.created", "session": self.session_object()})
            remaining = self.limits.max_session_s - (time.monotonic() - self.t_created)
            done, _ = await asyncio.wait({sender, receiver}, timeout=max(0.0, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the session hit its maximum length
                await self.error("session_expired", f"the session reached its maximum duration of "
                                 f"{self.limits.max_session_s:g} s", type_="invalid_request_error")
                await asyncio.wait_for(self._drain(), timeout=1.0)
                await self.ws.close(code=1000)
        except Exception:  # noqa: BLE001 - socket gone while sending
            pass
        finally:
            await self.shutdown(sender, receiver, self.asr_task)

    async def _drain(self) -> None:
        while not self.out.empty():
            await asyncio.sleep(0.01)

    async def shutdown(self, *tasks: asyncio.Task) -> None:
        """Free everything: the response is cancelled (the engine closes its generator), tasks end."""
        self.closed = True
        resp = self.response
        if resp is not None:
            resp.cancel.set()
            resp.cancelled.set()
            if resp.task is not None:
                resp.task.cancel()
                tasks = (*tasks, resp.task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - teardown
                pass
        self.response = None
        self.conv = None
        self.vad = None
        self.timeline = None

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            event_id = None
            try:
                event = decode_frame(message, self.limits.max_event_bytes)
                eid = event.get("event_id")
                event_id = eid if isinstance(eid, str) else None
                kind = event_type(event)
                handler = self._handlers().get(GA_NAMES.get(kind, kind))
                if handler is None:
                    raise ClientError("invalid_event_type", f"unknown event type {kind!r}", "type")
                await handler(event)
            except ClientError as e:
                await self.error(e.code, e.message, e.param, event_id)
            except EngineBusy as e:
                await self.error("server_busy", str(e), None, event_id, type_="server_error")
            except ValueError as e:  # the conversation refused an edit (e.g. past the model's context)
                code = "context_length_exceeded" if isinstance(e, ContextFull) else "invalid_request"
                await self.error(code, str(e), None, event_id)
            except Exception as e:  # noqa: BLE001 - one failed event must not end the session
                await self.error("internal_error", f"{type(e).__name__}: {e}", None, event_id, type_="server_error")

    def _handlers(self) -> dict:
        return {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "conversation.item.truncate": self.on_item_truncate,
            "conversation.item.delete": self.on_item_delete,
            "conversation.item.retrieve": self.on_item_retrieve,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }

    # ------------------------------------------------------------------------------------------------ session
    def session_object(self) -> dict:
        expires_at = int(time.time() + self.limits.max_session_s - (time.monotonic() - self.t_created))
        return session_object(self.settings, self.id, self.model_id, self.beta, expires_at)

    async def on_session_update(self, event: dict) -> None:
        sess = get_field(event, "session", dict, "session", required=True)
        new, td_given = parse_session_update(sess, self.settings, self.speakers, self.can_speak)
        # everything validated: apply at once (a bad update changes nothing)
        self.settings = new
        conv, policy = self.conv, conv_truncation(new.truncation)
        if conv.truncation != policy:
            await self.engine.call(setattr, conv, "truncation", policy)
        if td_given:
            await self._abandon_turn()
            self._new_vad()
        await self.send({"type": "session.updated", "session": self.session_object()})

    def system_prompt(self, instructions: str, audio: bool) -> str | None:
        # Decision: with audio output on, the Talker only speaks well under the official speech system prompt
        # (REFERENCE.md), so it always comes first and the client's instructions are appended after it; a
        # text-only session uses the instructions as the whole system prompt (None: the template's default).
        if audio:
            return SPEECH_SYSTEM_PROMPT + ("\n\n" + instructions if instructions else "")
        return instructions or None

    # ------------------------------------------------------------------------------------------------ input audio
    def _max_turn_samples(self) -> int:
        return int(self.limits.max_input_audio_s * ENCODER_RATE)

    async def on_append(self, event: dict) -> None:
        pcm = decode_pcm16(event.get("audio"), "audio")
        if not len(pcm):
            return
        tl = self.timeline
        if tl.end + len(pcm) * 2 // 3 - self.turn_start > self._max_turn_samples():
            raise ClientError("input_audio_buffer_full", f"the input audio buffer is over its limit of "
                              f"{self.limits.max_input_audio_s:g} s; commit or clear it")
        x = pcm16_to_float(pcm)
        tl.append(x)
        if self.vad is None:
            return
        td = self.settings.turn_detection
        for ev in self.vad.push(x):
            if isinstance(ev, SpeechStarted) and self.turn_item is None:
                # OpenAI's audio_start_ms is where the item's audio begins: prefix_padding_ms before the speech
                start = self.vad_origin_ms + item_start_ms(ev, self.vad.config)
                await self._speech_started(start, td)
            elif isinstance(ev, SpeechStopped) and self.turn_item is not None:
                await self._speech_stopped(self.vad_origin_ms + ev.audio_end_ms, td)
        if self.turn_item is not None:
            # push what cannot be trailing silence yet; batches of >= 0.2 s keep the job count low
            limit = tl.end - td["silence_duration_ms"] * ENCODER_RATE // 1000
            if limit - self.pushed >= ENCODER_RATE // 5:
                samples = tl.slice(self.pushed, limit)
                self.pushed = limit
                await self.engine.call(self.conv.push_audio, samples)
                await self._announce_dropped()
        else:
            keep = (td["prefix_padding_ms"] + 1500) * ENCODER_RATE // 1000
            tl.trim_before(tl.end - keep)
            self.turn_start = tl.base

    async def _speech_started(self, audio_start_ms: int, td: dict) -> None:
        if self.response is not None and td.get("interrupt_response", True):
            self._cancel_response("turn_detected")
        item_id = new_id("item")
        self.turn_item = item_id
        start = max(audio_start_ms * ENCODER_RATE // 1000, self.timeline.base)
        self.turn_start = self.pushed = start
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": audio_start_ms,
                         "item_id": item_id})
        await self.engine.call(self.conv.begin_audio, item_id)

    async def _speech_stopped(self, audio_end_ms: int, td: dict | None) -> None:
        end = min(audio_end_ms * ENCODER_RATE // 1000, self.timeline.end)
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": audio_end_ms,
                         "item_id": self.turn_item})
        t_end = time.monotonic()
        item_id = await self._finish_turn(end)
        old = self.response
        if old is not None and old.reason is not None and old.task is not None:
            await asyncio.wait({old.task})  # a barged-in response is still winding down
        self.timeline.trim_before(end)
        self.turn_start = self.timeline.base
        if td is None or td.get("create_response", True):
            await self.start_response({}, t_end_of_turn=t_end)
        self._queue_transcription(item_id)      # after the response: it must not take a step from it

    async def _finish_turn(self, end: int) -> str | None:
        item_id, self.turn_item = self.turn_item, None
        samples = self.timeline.slice(self.pushed, end)
        nothing = self.pushed <= self.turn_start and not len(samples)
        self.pushed = end
        if nothing:  # no audio at all (a commit right at the start): drop the empty item
            await self.engine.call(self.conv.delete, item_id)
            return None
        if len(samples):
            await self.engine.call(self.conv.push_audio, samples)
        await self.engine.call(self.conv.end_audio)
        await self._item_committed(item_id, [{"type": "input_audio", "transcript": None}],
                                   audio_ms=(end - self.turn_start) * 1000 // ENCODER_RATE)
        return item_id

    async def _item_committed(self, item_id: str, content: list, audio_ms: int) -> None:
        prev = self._last_item()
        item = message_item(item_id, "user", "completed", content)
        self.items[item_id] = {"item": item, "role": "user", "audio_ms": audio_ms}
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id})
        await self._announce_item(item, prev)

    def _last_item(self, before: str | None = None) -> str | None:
        ids = list(self.items)
        if before is not None:
            ids = ids[:ids.index(before)]
        return ids[-1] if ids else None

    async def _announce_item(self, item: dict, prev: str | None) -> None:
        await self._announce_dropped()
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    async def _announce_dropped(self) -> None:
        """Items the conversation dropped to stay within its context (truncation) leave the session too."""
        for item_id in self.conv.take_dropped() if self.conv is not None else ():
            if self.items.pop(item_id, None) is not None:
                await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    # ------------------------------------------------------------------------------------------------ transcription
    def _queue_transcription(self, item_id: str | None) -> None:
        if item_id is not None and self.settings.transcription is not None:
            self.asr_queue.put_nowait(item_id)

    async def _transcriber(self) -> None:
        """Transcribe committed user audio items one at a time, in commit order."""
        while True:
            item_id = await self.asr_queue.get()
            if self.response is None:
                # a manual commit is usually followed by response.create: let it reach the engine first
                await asyncio.sleep(0.2)
            try:
                await self._transcribe(item_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported on the item, the session goes on
                await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                                 "content_index": 0, "error": {"type": "server_error", "code": "transcription_failed",
                                                               "message": f"{type(e).__name__}: {e}",
                                                               "param": None}})

    async def _transcribe(self, item_id: str) -> None:
        entry = self.items.get(item_id)
        if entry is None:  # deleted (or truncated away) before its turn came
            return
        conv, setting = self.conv, self.settings.transcription or {}
        # greedy (the checkpoint's penalty kept); ~3 words per second of speech leaves room in 16 + 8 tokens/s
        seconds = entry["audio_ms"] / 1000
        options = GenerationOptions(max_new_tokens=min(self.limits.max_output_tokens, 16 + int(8 * seconds)),
                                    sampling=replace(self.sampling, greedy=True))
        instruction = asr_instruction(setting.get("language"))
        info = {}

        def make():
            info["audio_tokens"] = conv.audio_tokens(item_id)
            return conv.transcribe(item_id, options, instruction)

        stream = self.engine.stream(make, threading.Event(), background=True)
        text, done = "", None
        try:
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    delta = ev.text if text else ev.text.lstrip()
                    if delta:
                        text += delta
                        await self.send({"type": "conversation.item.input_audio_transcription.delta",
                                         "item_id": item_id, "content_index": 0, "delta": delta})
                elif isinstance(ev, Done):
                    done = ev
        finally:
            await stream.aclose()
        if done is None:
            return
        entry = self.items.get(item_id)
        if entry is not None:  # the item now carries the user's words
            part = entry["item"]["content"][0]
            entry["item"]["content"][0] = dict(part, transcript=text)
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                         "content_index": 0, "transcript": text,
                         "usage": transcription_usage(done, info.get("audio_tokens", 0))})

    async def _abandon_turn(self) -> None:
        """Drop a half-spoken turn (clear, or turn detection changed)."""
        if self.turn_item is not None:
            item_id, self.turn_item = self.turn_item, None
            await self.engine.call(self.conv.delete, item_id)  # deleting the open audio item closes it
        if self.vad is not None:
            self.vad.reset()
        self.timeline.clear()
        self.turn_start = self.pushed = self.timeline.end

    async def on_commit(self, event: dict) -> None:
        tl = self.timeline
        if self.turn_item is not None:  # server VAD mid-turn: the client ends the turn now
            tl.flush()
            self._queue_transcription(await self._finish_turn(tl.end))
            tl.clear()
            self.turn_start = tl.base
            if self.vad is not None:
                self.vad.reset()
            return
        if self.vad is not None:
            raise ClientError("input_audio_buffer_commit_empty", "no speech in the input audio buffer "
                              "(server VAD commits turns itself)")
        tl.flush()
        if (tl.end - self.turn_start) * 1000 // ENCODER_RATE < MIN_COMMIT_MS:
            raise ClientError("input_audio_buffer_commit_empty", f"the input audio buffer holds less than "
                              f"{MIN_COMMIT_MS} ms of audio")
        samples = tl.slice(self.turn_start, tl.end)
        item_id = new_id("item")
        await self.engine.call(audio_turn, self.conv, item_id, samples)
        audio_ms = len(samples) * 1000 // ENCODER_RATE
        tl.clear()
        self.turn_start = self.pushed = tl.end
        await self._item_committed(item_id, [{"type": "input_audio", "transcript": None}], audio_ms)
        self._queue_transcription(item_id)

    async def on_clear(self, event: dict) -> None:
        await self._abandon_turn()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------------------------------------ items
    async def on_item_create(self, event: dict) -> None:
        item = get_field(event, "item", dict, "item", required=True)
        prev = get_field(event, "previous_item_id", str, "previous_item_id")
        item_id = get_field(item, "id", str, "item.id") or new_id("item")
        if item_id in self.items:
            raise ClientError("invalid_value", f"item {item_id!r} already exists", "item.id")
        if prev is not None and prev not in self.items and prev != "root":
            raise ClientError("item_not_found", f"previous_item_id {prev!r} does not exist", "previous_item_id")
        role, parts, echo, audio_ms = parse_item(item, self.limits.max_input_audio_s)
        if prev == "root":
            raise ClientError("invalid_value", "inserting before the first item is not supported",
                              "previous_item_id")
        after = prev if prev is not None and prev != self._last_item() else None
        await self.engine.call(self.conv.add, role, parts, item_id, after)
        desc = message_item(item_id, role, "completed", echo)
        entry = {"item": desc, "role": role, "audio_ms": audio_ms}
        if after is None:
            prev = self._last_item()
            self.items[item_id] = entry
        else:
            ids = list(self.items)
            ids.insert(ids.index(after) + 1, item_id)
            self.items[item_id] = entry
            self.items = {i: self.items[i] for i in ids}
        await self._announce_item(desc, prev)

    async def _settle(self, item_id: str) -> None:
        """An edit touching the item being generated: cancel that response and wait for it to end first."""
        resp = self.response
        if resp is not None and resp.item_id == item_id:
            self._cancel_response("client_cancelled")
            if resp.task is not None:
                await asyncio.wait({resp.task})

    async def on_item_truncate(self, event: dict) -> None:
        item_id = get_field(event, "item_id", str, "item_id", required=True)
        index = get_field(event, "content_index", int, "content_index", default=0)
        end_ms = get_field(event, "audio_end_ms", int, "audio_end_ms", required=True)
        entry = self.items.get(item_id)
        if entry is None:
            raise ClientError("item_not_found", f"no item {item_id!r}", "item_id")
        if entry["role"] != "assistant" or not entry.get("spoken"):
            raise ClientError("invalid_value", "only an assistant item with audio can be truncated", "item_id")
        if index != 0:
            raise ClientError("invalid_value", "'content_index' must be 0", "content_index")
        await self._settle(item_id)
        if not 0 <= end_ms <= entry["audio_ms"]:
            raise ClientError("invalid_value", f"'audio_end_ms' must be between 0 and the item's audio length "
                              f"({entry['audio_ms']} ms)", "audio_end_ms")
        await self.engine.call(self.conv.truncate, item_id, end_ms)
        entry["audio_ms"] = end_ms
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": index,
                         "audio_end_ms": end_ms})

    async def on_item_delete(self, event: dict) -> None:
        item_id = get_field(event, "item_id", str, "item_id", required=True)
        if item_id not in self.items or item_id == self.turn_item:
            raise ClientError("item_not_found", f"no item {item_id!r}", "item_id")
        await self._settle(item_id)
        await self.engine.call(self.conv.delete, item_id)
        del self.items[item_id]
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def on_item_retrieve(self, event: dict) -> None:
        item_id = get_field(event, "item_id", str, "item_id", required=True)
        if item_id not in self.items:
            raise ClientError("item_not_found", f"no item {item_id!r}", "item_id")
        await self.send({"type": "conversation.item.retrieved", "item": self.items[item_id]["item"]})

    # ------------------------------------------------------------------------------------------------ responses
    async def on_response_create(self, event: dict) -> None:
        params = get_field(event, "response", dict, "response", default={})
        await self.start_response(params)

    async def on_response_cancel(self, event: dict) -> None:
        rid = get_field(event, "response_id", str, "response_id")
        if self.response is None or (rid is not None and rid != self.response.id):
            raise ClientError("response_cancel_not_active", "there is no active response to cancel")
        self._cancel_response("client_cancelled")

    def _cancel_response(self, reason: str) -> None:
        resp = self.response
        if resp is not None and resp.reason is None:
            resp.reason = reason
            resp.cancel.set()
            resp.cancelled.set()

    async def start_response(self, params: dict, t_end_of_turn: float | None = None) -> None:
        if self.response is not None:
            raise ClientError("conversation_already_has_active_response",
                              f"response {self.response.id} is still in progress; cancel it first")
        s = self.settings
        rp = parse_response_params(params, s, self.speakers, self.can_speak)
        instructions, modalities, voice, max_tokens = rp.instructions, rp.modalities, rp.voice, rp.max_tokens
        audio = "audio" in modalities
        cap = self.limits.max_output_tokens
        max_new = cap if max_tokens == "inf" else min(cap, max_tokens)
        sampling = self.sampling
        if s.temperature is not None and not sampling.greedy:
            sampling = replace(sampling, temperature=s.temperature)
        cancel = threading.Event()
        options = GenerationOptions(max_new_tokens=max_new, sampling=sampling, audio=audio, speaker=voice,
                                    max_codec_tokens=self.limits.max_codec_tokens, stop=cancel.is_set)
        system = self.system_prompt(instructions if instructions is not None else s.instructions, audio)
        item_id = new_id("item")
        resp = _Response(id=new_id("resp"), item_id=item_id, cancel=cancel,
                         cancelled=asyncio.Event(), t_request=time.monotonic(), t_end_of_turn=t_end_of_turn)
        conv = self.conv
        # raises EngineBusy at once (-> server_busy error, no response starts)
        stream = self.engine.stream(lambda: _respond(conv, system, options, item_id), resp.cancel,
                                    max_buffered=self.limits.stream_buffer)
        self.response = resp
        resp.task = asyncio.create_task(self._run_response(resp, stream, modalities, voice, max_tokens))

    async def _run_response(self, resp: _Response, stream, modalities, voice, max_tokens) -> None:
        audio = "audio" in modalities
        item = message_item(resp.item_id, "assistant", "in_progress", [])
        prev = self._last_item()
        self.items[resp.item_id] = {"item": item, "role": "assistant", "audio_ms": 0, "spoken": audio}
        ids = {"response_id": resp.id, "item_id": resp.item_id, "output_index": 0, "content_index": 0}
        text_parts: list[str] = []
        samples_sent = 0
        first_audio = True
        play_end = 0.0                       # when the client's playback of what was sent ends (estimated)
        done: Done | None = None
        failure: Exception | None = None
        try:
            await self.send({"type": "response.created", "response": response_object(
                resp.id, self.id, "in_progress", modalities, voice, max_tokens)})
            await self.send({"type": "response.output_item.added", "response_id": resp.id, "output_index": 0,
                             "item": item})
            await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
            await self.send({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
            await self.send({"type": "response.content_part.added", **ids, "part": event_part(audio, "")})
            try:
                async for ev in stream:
                    await self._announce_dropped()
                    if resp.cancelled.is_set():
                        continue  # drain to the end: the generator stops at its next step
                    if isinstance(ev, TextDelta):
                        text_parts.append(ev.text)
                        kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                        await self.send({"type": kind, **ids, "delta": ev.text})
                    elif isinstance(ev, AudioChunk):
                        pcm = ev.pcm16()
                        step = int(DELTA_SECONDS * SAMPLE_RATE) * 2
                        for k in range(0, len(pcm), step):
                            piece = pcm[k:k + step]
                            if first_audio:
                                first_audio = False
                                self._observe_first_audio(resp, time.monotonic())
                            await self._pace(resp, play_end)
                            if resp.cancelled.is_set():
                                break
                            await self.send({"type": "response.output_audio.delta", **ids,
                                             "delta": base64.b64encode(piece).decode("ascii")})
                            samples_sent += len(piece) // 2
                            # the client plays audio as it arrives, continuously while it has some buffered
                            play_end = max(play_end, time.monotonic()) + len(piece) / 2 / SAMPLE_RATE
                    elif isinstance(ev, Done):
                        done = ev
            except Exception as e:  # noqa: BLE001 - a failed turn is reported, the session goes on
                failure = e
            await self._announce_dropped()
            status, details = response_status(resp.reason, failure, done)
            text = "".join(text_parts)
            audio_ms = samples_sent * 1000 // SAMPLE_RATE
            self.items[resp.item_id]["audio_ms"] = audio_ms
            if audio:
                await self.send({"type": "response.output_audio.done", **ids})
                await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": text})
            else:
                await self.send({"type": "response.output_text.done", **ids, "text": text})
            part = output_part(audio, self.beta, text)
            await self.send({"type": "response.content_part.done", **ids, "part": event_part(audio, text)})
            final = dict(item, status="completed" if status == "completed" else "incomplete", content=[part])
            self.items[resp.item_id]["item"] = final
            await self.send({"type": "response.output_item.done", "response_id": resp.id, "output_index": 0,
                             "item": final})
            await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": final})
            usage = None if done is None else usage_object(done)
            if self.metrics is not None:
                self.metrics.responses_total.inc(status=status)
                if audio and samples_sent:
                    # compute time on the worker per second of speech (wall time would include the pacing)
                    self.metrics.realtime_factor.observe(stream.busy_s / (samples_sent / SAMPLE_RATE))
            self.response = None  # a new response may start from the moment response.done is sent
            await self.send({"type": "response.done",
                             "response": response_object(resp.id, self.id, status, modalities, voice, max_tokens,
                                                         [final], usage, details)})
            if status in ("cancelled", "failed"):
                # a turn cancelled before the worker started it (or failing in its prefill) never created its
                # assistant item in the conversation: drop it here too and tell the client
                conv = self.conv
                if not await self.engine.call(lambda: resp.item_id in conv.items()):
                    self.items.pop(resp.item_id, None)
                    await self.send({"type": "conversation.item.deleted", "item_id": resp.item_id})
        finally:
            await stream.aclose()
            if self.response is resp:
                self.response = None

    async def _pace(self, resp: _Response, play_end: float) -> None:
        """Wait until the client holds at most `audio_lead_s` of unplayed audio (or the response is cancelled)."""
        lead = self.limits.audio_lead_s
        ahead = play_end - time.monotonic()
        if lead is not None and ahead > lead:
            try:
                await asyncio.wait_for(resp.cancelled.wait(), timeout=ahead - lead)
            except asyncio.TimeoutError:
                pass

    def _observe_first_audio(self, resp: _Response, now: float) -> None:
        if self.metrics is None:
            return
        self.metrics.first_audio_seconds.observe(now - resp.t_request)
        if resp.t_end_of_turn is not None:
            self.metrics.end_of_turn_to_first_audio_seconds.observe(now - resp.t_end_of_turn)
