"""One OpenAI-Realtime websocket session: protocol, turn detection, barge-in, pacing and limits.

`RealtimeSession(ws, app_state, SessionLimits, model_id, beta)` speaks the Realtime API's GA event names (a client
that announces `OpenAI-Beta: realtime=v1` gets the beta names and flat session fields; beta session fields are
accepted from everyone). Conversation state is `streaming.conversation.Conversation` (KV cache kept across turns),
turn detection `streaming.vad.TurnDetector` (Silero). Three coroutines per session:
- the receive loop parses and validates each client event; a bad event gets an `error` event and the session
  goes on. It owns the input audio: 24 kHz PCM16 -> float -> a streaming soxr resampler -> a 16 kHz timeline.
  With server VAD, the `TurnDetector` sees every appended sample; from `speech_started` on, the turn's audio is
  pushed into the `Conversation` (begin_audio / push_audio / end_audio, on the engine worker) while the person
  speaks, so at `speech_stopped` only the last fraction of a second is left to encode and end-of-turn latency does
  not grow with the length of the question.
- the response task runs one turn through `Engine.stream` and turns its events into the response lifecycle
  (created, output_item.added, conversation.item.added, content_part.added, deltas, *.done, response.done).
  Outgoing audio is paced: the client is assumed to play audio as it arrives (continuously while it has some), and
  a delta is sent only while it holds at most `audio_lead_s` (0.5 s) of unplayed audio, so a cancel leaves at most
  that much queued there (and a stall in generation does not let the server run ahead later).
- the sender task drains a bounded queue into the socket; a client that stops reading fills it, which stalls the
  response task, which stalls the engine stream (its buffer fills): memory stays bounded.
Barge-in: `speech_started` during a response (interrupt_response) sets the turn's cancel events: no more audio is
sent from that moment, the engine closes the generator at its next round, `response.done` says cancelled.
`conversation.item.truncate` then rewinds the assistant item to what the listener heard.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import soxr

from omnivox.engine import EngineBusy
from omnivox.streaming.conversation import Conversation
from omnivox.streaming.pipeline import (SAMPLE_RATE, SPEECH_SYSTEM_PROMPT, AudioChunk, Done, GenerationOptions,
                                        TextDelta, default_sampling)
from omnivox.streaming.vad import SpeechStarted, SpeechStopped, TurnDetector, VadConfig, item_start_ms


ENCODER_RATE = 16000
MAX_EVENT_BYTES = 15 * 1024 * 1024
DELTA_SECONDS = 0.1                  # outgoing audio deltas are cut to this length (pacing granularity)
MIN_COMMIT_MS = 100                  # OpenAI refuses to commit less than 100 ms of audio
MAX_IMAGE_PIXELS = 40_000_000


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


class ClientError(Exception):
    """A client event the session refuses; becomes one `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# ----------------------------------------------------------------------------------------------------------------
# Field validation

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
               list: "an array"}


def _field(obj: dict, key: str, kind, param: str, required: bool = False, default=None):
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise ClientError("missing_required_parameter", f"missing required parameter '{param}'", param)
        return default
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (isinstance(value, bool) and k in (int, float)) for k in kinds)
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ClientError("invalid_type", f"'{param}' must be {names}, got {type(value).__name__}", param)
    return value


def decode_pcm16(data, param: str) -> np.ndarray:
    """base64 PCM16 little-endian mono -> int16 samples; raises ClientError for anything else."""
    if not isinstance(data, str):
        raise ClientError("invalid_type", f"'{param}' must be a base64 string", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("invalid_base64", f"'{param}' is not valid base64", param) from None
    if len(raw) % 2:
        raise ClientError("invalid_audio", f"'{param}' is not PCM16 audio: odd number of bytes ({len(raw)}); "
                          "send 16-bit little-endian mono samples at 24 kHz", param)
    return np.frombuffer(raw, dtype="<i2")


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def decode_image(url, param: str):
    """A JPEG/PNG data URI -> RGB PIL image."""
    from PIL import Image

    if not isinstance(url, str):
        raise ClientError("invalid_type", f"'{param}' must be a data URI string", param)
    head, sep, payload = url.partition(",")
    if not sep or head.lower() not in ("data:image/jpeg;base64", "data:image/jpg;base64", "data:image/png;base64"):
        raise ClientError("invalid_image", f"'{param}' must be a data:image/jpeg or data:image/png base64 URI "
                          "(remote URLs are not fetched)", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("invalid_base64", f"'{param}' is not valid base64", param) from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format not in ("JPEG", "PNG"):
            raise ClientError("invalid_image", f"'{param}' is {img.format}, expected JPEG or PNG", param)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ClientError("invalid_image", f"'{param}' is {img.width}x{img.height}: over "
                              f"{MAX_IMAGE_PIXELS} pixels", param)
        return img.convert("RGB")
    except ClientError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise ClientError("invalid_image", f"'{param}' could not be decoded: {e}", param) from None


# ----------------------------------------------------------------------------------------------------------------
# Input audio

class _Timeline:
    """The session's input audio resampled to 16 kHz, indexed by 16 kHz sample since the first append; only the
    part still needed (the current turn, some lead-in) is kept."""

    def __init__(self):
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, ENCODER_RATE, 1, dtype="float32")
        self.chunks: list[np.ndarray] = []
        self.base = 0          # 16 kHz index of the first kept sample
        self.kept = 0          # samples kept
        self.in_samples = 0    # 24 kHz samples appended in the whole session

    @property
    def end(self) -> int:
        return self.base + self.kept

    def append(self, x24: np.ndarray) -> None:
        self.in_samples += len(x24)
        self._add(self.resampler.resample_chunk(x24))

    def flush(self) -> None:
        """Drain the resampler's delay (a manual commit: the last samples belong to this turn)."""
        self._add(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, ENCODER_RATE, 1, dtype="float32")
        # keep the 16 kHz timeline aligned with the 24 kHz one after the flush
        want = self.in_samples * ENCODER_RATE // SAMPLE_RATE
        if self.end < want:
            self._add(np.zeros(want - self.end, np.float32))

    def _add(self, y: np.ndarray) -> None:
        if len(y):
            self.chunks.append(np.asarray(y, np.float32))
            self.kept += len(y)

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.base), min(b, self.end)
        if b <= a:
            return np.zeros(0, np.float32)
        whole = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks = [whole]
        return whole[a - self.base:b - self.base].copy()

    def trim_before(self, idx: int) -> None:
        idx = min(max(idx, self.base), self.end)
        if idx == self.base:
            return
        whole = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        whole = whole[idx - self.base:]
        self.chunks = [whole] if len(whole) else []
        self.base, self.kept = idx, len(whole)

    def clear(self) -> None:
        self.trim_before(self.end)


def _audio_turn(conv, item_id: str, samples: np.ndarray) -> None:
    conv.begin_audio(item_id)
    if len(samples):
        conv.push_audio(samples)
    conv.end_audio()


def _respond(conv, system: str | None, options: GenerationOptions, item_id: str):
    if conv.system != system:
        conv.set_system(system)
    return conv.respond(options, item_id)


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


@dataclass
class _Settings:
    output_modalities: list[str]
    instructions: str
    voice: str | None
    turn_detection: dict | None
    max_output_tokens: int | str = "inf"
    temperature: float | None = None


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_NAMES = {v: k for k, v in BETA_NAMES.items()}


def default_turn_detection() -> dict:
    return {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
            "create_response": True, "interrupt_response": True}


class RealtimeSession:
    """One websocket client. `state` carries omni, engine, metrics (the app's state); `run()` until it leaves."""

    def __init__(self, ws, state, limits: SessionLimits, model_id: str, beta: bool = False):
        self.ws, self.state, self.limits, self.model_id, self.beta = ws, state, limits, model_id, beta
        self.omni, self.engine = state.omni, state.engine
        self.metrics = getattr(state, "metrics", None)
        self.id = _new_id("sess")
        speakers = sorted(self.omni.speakers or {})
        self.speakers = speakers
        self.can_speak = bool(speakers) and self.omni.talker is not None
        default_voice = ("Chelsie" if "Chelsie" in speakers else speakers[0]) if speakers else None
        self.settings = _Settings(output_modalities=["audio"] if self.can_speak else ["text"], instructions="",
                                  voice=default_voice, turn_detection=default_turn_detection())
        self.sampling = default_sampling(self.omni.config.generation)
        self.conv = Conversation(self.omni, None)
        self.items: dict[str, dict] = {}        # item id -> its server-side description (in conversation order)
        self.out: asyncio.Queue = asyncio.Queue(maxsize=limits.outgoing_queue)
        self.response: _Response | None = None
        self.timeline = _Timeline()
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
        event = {"event_id": _new_id("event"), **event}
        await self.out.put(json.dumps(event, ensure_ascii=False))

    async def error(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                    type_: str = "invalid_request_error") -> None:
        if self.metrics is not None:
            self.metrics.errors_total.inc(type=code if code == "server_busy" else type_)
        await self.send({"type": "error", "error": {"type": type_, "code": code, "message": message,
                                                    "param": param, "event_id": event_id}})

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
            await self.shutdown(sender, receiver)

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
            data = message.get("text")
            if data is None:
                raw = message.get("bytes") or b""
                if len(raw) > self.limits.max_event_bytes:
                    await self.error("event_too_large", f"event of {len(raw)} bytes is over the "
                                     f"{self.limits.max_event_bytes} byte limit")
                    continue
                await self.error("invalid_event", "binary frames are not supported: send JSON text frames")
                continue
            if len(data) > self.limits.max_event_bytes:
                await self.error("event_too_large", f"event of {len(data)} bytes is over the "
                                 f"{self.limits.max_event_bytes} byte limit")
                continue
            event_id = None
            try:
                try:
                    event = json.loads(data)
                except ValueError as e:
                    raise ClientError("invalid_json", f"the event is not valid JSON: {e}") from None
                if not isinstance(event, dict):
                    raise ClientError("invalid_event", "an event must be a JSON object")
                eid = event.get("event_id")
                event_id = eid if isinstance(eid, str) else None
                _field(event, "event_id", str, "event_id")
                kind = _field(event, "type", str, "type", required=True)
                handler = self._handlers().get(GA_NAMES.get(kind, kind))
                if handler is None:
                    raise ClientError("invalid_event_type", f"unknown event type {kind!r}", "type")
                await handler(event)
            except ClientError as e:
                await self.error(e.code, e.message, e.param, event_id)
            except EngineBusy as e:
                await self.error("server_busy", str(e), None, event_id, type_="server_error")
            except ValueError as e:  # the conversation refused an edit (e.g. past the model's context)
                await self.error("invalid_request", str(e), None, event_id)
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
        s = self.settings
        td = None if s.turn_detection is None else dict(s.turn_detection)
        fmt = {"type": "audio/pcm", "rate": SAMPLE_RATE}
        obj = {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model_id,
               "output_modalities": list(s.output_modalities), "instructions": s.instructions,
               "audio": {"input": {"format": fmt, "turn_detection": td, "transcription": None},
                         "output": {"format": fmt, "voice": s.voice, "speed": 1.0}},
               "max_output_tokens": s.max_output_tokens, "tools": [], "tool_choice": "auto",
               "expires_at": int(time.time() + self.limits.max_session_s - (time.monotonic() - self.t_created))}
        if self.beta:  # beta clients read the flat fields
            obj.update(modalities=["text", "audio"] if "audio" in s.output_modalities else ["text"],
                       voice=s.voice, turn_detection=td, input_audio_format="pcm16", output_audio_format="pcm16",
                       max_response_output_tokens=s.max_output_tokens)
        return obj

    def _voice(self, value, param: str) -> str:
        if not isinstance(value, str):
            raise ClientError("invalid_type", f"'{param}' must be a string", param)
        for name in self.speakers:
            if name.lower() == value.lower():
                return name
        raise ClientError("invalid_value", f"unknown voice {value!r}; this checkpoint has: "
                          f"{', '.join(self.speakers) or 'none (text only)'}", param)

    def _modalities(self, value, param: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise ClientError("invalid_type", f"'{param}' must be an array of strings", param)
        if not value or any(m not in ("text", "audio") for m in value):
            raise ClientError("invalid_value", f"'{param}' must be ['audio'] or ['text']", param)
        if "audio" in value:
            if not self.can_speak:
                raise ClientError("invalid_value", "this server was loaded without speech output: "
                                  "use ['text']", param)
            return ["audio"]
        return ["text"]

    def _max_tokens(self, value, param: str):
        if value == "inf":
            return "inf"
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClientError("invalid_type", f"'{param}' must be an integer or 'inf'", param)
        if not 1 <= value <= 4096:
            raise ClientError("invalid_value", f"'{param}' must be between 1 and 4096", param)
        return value

    def _turn_detection(self, value, param: str) -> dict | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ClientError("invalid_type", f"'{param}' must be an object or null", param)
        kind = _field(value, "type", str, f"{param}.type", default="server_vad")
        if kind != "server_vad":
            raise ClientError("invalid_value", f"'{param}.type' {kind!r} is not supported: use 'server_vad' "
                              "or null (manual commit)", f"{param}.type")
        td = dict(self.settings.turn_detection or default_turn_detection())
        td["type"] = "server_vad"
        thr = _field(value, "threshold", (int, float), f"{param}.threshold")
        if thr is not None:
            if not 0.0 <= thr <= 1.0:
                raise ClientError("invalid_value", f"'{param}.threshold' must be between 0 and 1",
                                  f"{param}.threshold")
            td["threshold"] = float(thr)
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            v = _field(value, key, int, f"{param}.{key}")
            if v is not None:
                if not 0 <= v <= 10000:
                    raise ClientError("invalid_value", f"'{param}.{key}' must be between 0 and 10000",
                                      f"{param}.{key}")
                td[key] = v
        for key in ("create_response", "interrupt_response"):
            v = _field(value, key, bool, f"{param}.{key}")
            if v is not None:
                td[key] = v
        return td

    def _audio_format(self, value, param: str) -> None:
        if isinstance(value, str):  # beta: "pcm16"
            if value != "pcm16":
                raise ClientError("invalid_value", f"'{param}' {value!r} is not supported: use 'pcm16'", param)
            return
        if not isinstance(value, dict):
            raise ClientError("invalid_type", f"'{param}' must be an object", param)
        kind = _field(value, "type", str, f"{param}.type")
        rate = _field(value, "rate", int, f"{param}.rate")
        if kind not in (None, "audio/pcm") or rate not in (None, SAMPLE_RATE):
            raise ClientError("invalid_value", f"'{param}' must be {{'type': 'audio/pcm', 'rate': 24000}}", param)

    async def on_session_update(self, event: dict) -> None:
        sess = _field(event, "session", dict, "session", required=True)
        s = self.settings
        new = _Settings(list(s.output_modalities), s.instructions, s.voice,
                        None if s.turn_detection is None else dict(s.turn_detection), s.max_output_tokens,
                        s.temperature)
        td_given = False
        kind = _field(sess, "type", str, "session.type")
        if kind not in (None, "realtime"):
            raise ClientError("invalid_value", f"session.type {kind!r} is not supported: use 'realtime'",
                              "session.type")
        if "output_modalities" in sess:
            new.output_modalities = self._modalities(sess["output_modalities"], "session.output_modalities")
        if "modalities" in sess:  # beta
            new.output_modalities = self._modalities(sess["modalities"], "session.modalities")
        instructions = _field(sess, "instructions", str, "session.instructions")
        if instructions is not None:
            new.instructions = instructions
        audio = _field(sess, "audio", dict, "session.audio", default={})
        ain = _field(audio, "input", dict, "session.audio.input", default={})
        aout = _field(audio, "output", dict, "session.audio.output", default={})
        if "format" in ain:
            self._audio_format(ain["format"], "session.audio.input.format")
        if "format" in aout:
            self._audio_format(aout["format"], "session.audio.output.format")
        if "input_audio_format" in sess:
            self._audio_format(sess["input_audio_format"], "session.input_audio_format")
        if "output_audio_format" in sess:
            self._audio_format(sess["output_audio_format"], "session.output_audio_format")
        if "turn_detection" in ain:
            new.turn_detection = self._turn_detection(ain["turn_detection"], "session.audio.input.turn_detection")
            td_given = True
        if "turn_detection" in sess:
            new.turn_detection = self._turn_detection(sess["turn_detection"], "session.turn_detection")
            td_given = True
        if aout.get("voice") is not None:
            new.voice = self._voice(aout["voice"], "session.audio.output.voice")
        if sess.get("voice") is not None:
            new.voice = self._voice(sess["voice"], "session.voice")
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if sess.get(key) is not None:
                new.max_output_tokens = self._max_tokens(sess[key], f"session.{key}")
        tools = _field(sess, "tools", list, "session.tools")
        if tools:
            raise ClientError("invalid_value", "tools (function calling) are not supported by this server",
                              "session.tools")
        temp = _field(sess, "temperature", (int, float), "session.temperature")
        if temp is not None:
            if not 0 < temp <= 2:
                raise ClientError("invalid_value", "'session.temperature' must be in (0, 2]", "session.temperature")
            new.temperature = float(temp)
        # everything validated: apply at once (a bad update changes nothing)
        self.settings = new
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
        else:
            keep = (td["prefix_padding_ms"] + 1500) * ENCODER_RATE // 1000
            tl.trim_before(tl.end - keep)
            self.turn_start = tl.base

    async def _speech_started(self, audio_start_ms: int, td: dict) -> None:
        if self.response is not None and td.get("interrupt_response", True):
            self._cancel_response("turn_detected")
        item_id = _new_id("item")
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
        await self._finish_turn(end)
        old = self.response
        if old is not None and old.reason is not None and old.task is not None:
            await asyncio.wait({old.task})  # a barged-in response is still winding down
        self.timeline.trim_before(end)
        self.turn_start = self.timeline.base
        if td is None or td.get("create_response", True):
            await self.start_response({}, t_end_of_turn=t_end)

    async def _finish_turn(self, end: int) -> None:
        item_id, self.turn_item = self.turn_item, None
        samples = self.timeline.slice(self.pushed, end)
        nothing = self.pushed <= self.turn_start and not len(samples)
        self.pushed = end
        if nothing:  # no audio at all (a commit right at the start): drop the empty item
            await self.engine.call(self.conv.delete, item_id)
            return
        if len(samples):
            await self.engine.call(self.conv.push_audio, samples)
        await self.engine.call(self.conv.end_audio)
        await self._item_committed(item_id, [{"type": "input_audio", "transcript": None}],
                                   audio_ms=(end - self.turn_start) * 1000 // ENCODER_RATE)

    async def _item_committed(self, item_id: str, content: list, audio_ms: int) -> None:
        prev = self._last_item()
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
                "role": "user", "content": content}
        self.items[item_id] = {"item": item, "role": "user", "audio_ms": audio_ms}
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id})
        await self._announce_item(item, prev)

    def _last_item(self, before: str | None = None) -> str | None:
        ids = list(self.items)
        if before is not None:
            ids = ids[:ids.index(before)]
        return ids[-1] if ids else None

    async def _announce_item(self, item: dict, prev: str | None) -> None:
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

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
            await self._finish_turn(tl.end)
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
        item_id = _new_id("item")
        await self.engine.call(_audio_turn, self.conv, item_id, samples)
        audio_ms = len(samples) * 1000 // ENCODER_RATE
        tl.clear()
        self.turn_start = self.pushed = tl.end
        await self._item_committed(item_id, [{"type": "input_audio", "transcript": None}], audio_ms)

    async def on_clear(self, event: dict) -> None:
        await self._abandon_turn()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------------------------------------ items
    def _parse_item(self, item: dict) -> tuple[str, list[dict], list[dict], int]:
        """-> role, pipeline parts, content echoed to the client, audio ms."""
        kind = _field(item, "type", str, "item.type", default="message")
        if kind != "message":
            raise ClientError("invalid_value", f"item type {kind!r} is not supported (no tools): use 'message'",
                              "item.type")
        role = _field(item, "role", str, "item.role", required=True)
        if role not in ("user", "assistant", "system"):
            raise ClientError("invalid_value", "'item.role' must be 'user', 'assistant' or 'system'", "item.role")
        content = _field(item, "content", list, "item.content", required=True)
        if not content:
            raise ClientError("invalid_value", "'item.content' is empty", "item.content")
        parts, echo, audio_ms = [], [], 0
        for k, c in enumerate(content):
            p = f"item.content[{k}]"
            if not isinstance(c, dict):
                raise ClientError("invalid_type", f"'{p}' must be an object", p)
            ctype = _field(c, "type", str, f"{p}.type", required=True)
            allowed = {"user": ("input_text", "input_audio", "input_image"), "system": ("input_text",),
                       "assistant": ("output_text", "text", "output_audio", "audio")}[role]
            if ctype not in allowed:
                raise ClientError("invalid_value", f"'{p}.type' {ctype!r} is not allowed in a {role} item "
                                  f"(use {', '.join(allowed)})", f"{p}.type")
            if ctype in ("input_text", "output_text", "text"):
                text = _field(c, "text", str, f"{p}.text", required=True)
                parts.append({"type": "text", "text": text})
                echo.append({"type": ctype, "text": text})
            elif ctype in ("output_audio", "audio"):  # an assistant turn given by its transcript
                text = _field(c, "transcript", str, f"{p}.transcript", required=True)
                parts.append({"type": "text", "text": text})
                echo.append({"type": ctype, "transcript": text})
            elif ctype == "input_audio":
                pcm = decode_pcm16(c.get("audio"), f"{p}.audio")
                if len(pcm) > self.limits.max_input_audio_s * SAMPLE_RATE:
                    raise ClientError("input_audio_too_long", f"'{p}.audio' is longer than "
                                      f"{self.limits.max_input_audio_s:g} s", f"{p}.audio")
                if len(pcm) * 1000 // SAMPLE_RATE < MIN_COMMIT_MS:
                    raise ClientError("invalid_audio", f"'{p}.audio' holds less than {MIN_COMMIT_MS} ms", f"{p}.audio")
                x = soxr.resample(pcm16_to_float(pcm), SAMPLE_RATE, ENCODER_RATE).astype(np.float32)
                parts.append({"type": "audio", "audio": x})
                echo.append({"type": "input_audio", "transcript": c.get("transcript")
                             if isinstance(c.get("transcript"), str) else None})
                audio_ms += len(pcm) * 1000 // SAMPLE_RATE
            else:  # input_image
                img = decode_image(c.get("image_url"), f"{p}.image_url")
                parts.append({"type": "image", "image": img})
                echo.append({"type": "input_image", "detail": c.get("detail", "auto")})
        return role, parts, echo, audio_ms

    async def on_item_create(self, event: dict) -> None:
        item = _field(event, "item", dict, "item", required=True)
        prev = _field(event, "previous_item_id", str, "previous_item_id")
        item_id = _field(item, "id", str, "item.id") or _new_id("item")
        if item_id in self.items:
            raise ClientError("invalid_value", f"item {item_id!r} already exists", "item.id")
        if prev is not None and prev not in self.items and prev != "root":
            raise ClientError("item_not_found", f"previous_item_id {prev!r} does not exist", "previous_item_id")
        role, parts, echo, audio_ms = self._parse_item(item)
        if prev == "root":
            raise ClientError("invalid_value", "inserting before the first item is not supported",
                              "previous_item_id")
        after = prev if prev is not None and prev != self._last_item() else None
        await self.engine.call(self.conv.add, role, parts, item_id, after)
        desc = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": role,
                "content": echo}
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
        item_id = _field(event, "item_id", str, "item_id", required=True)
        index = _field(event, "content_index", int, "content_index", default=0)
        end_ms = _field(event, "audio_end_ms", int, "audio_end_ms", required=True)
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
        item_id = _field(event, "item_id", str, "item_id", required=True)
        if item_id not in self.items or item_id == self.turn_item:
            raise ClientError("item_not_found", f"no item {item_id!r}", "item_id")
        await self._settle(item_id)
        await self.engine.call(self.conv.delete, item_id)
        del self.items[item_id]
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def on_item_retrieve(self, event: dict) -> None:
        item_id = _field(event, "item_id", str, "item_id", required=True)
        if item_id not in self.items:
            raise ClientError("item_not_found", f"no item {item_id!r}", "item_id")
        await self.send({"type": "conversation.item.retrieved", "item": self.items[item_id]["item"]})

    # ------------------------------------------------------------------------------------------------ responses
    async def on_response_create(self, event: dict) -> None:
        params = _field(event, "response", dict, "response", default={})
        await self.start_response(params)

    async def on_response_cancel(self, event: dict) -> None:
        rid = _field(event, "response_id", str, "response_id")
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
        conversation = _field(params, "conversation", str, "response.conversation")
        if conversation not in (None, "auto"):
            raise ClientError("invalid_value", "only conversation='auto' responses are supported",
                              "response.conversation")
        instructions = _field(params, "instructions", str, "response.instructions")
        modalities = s.output_modalities
        for key in ("output_modalities", "modalities"):
            if key in params:
                modalities = self._modalities(params[key], f"response.{key}")
        voice = s.voice
        aout = _field(_field(params, "audio", dict, "response.audio", default={}), "output", dict,
                      "response.audio.output", default={})
        if aout.get("voice") is not None:
            voice = self._voice(aout["voice"], "response.audio.output.voice")
        if params.get("voice") is not None:
            voice = self._voice(params["voice"], "response.voice")
        max_tokens = s.max_output_tokens
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if params.get(key) is not None:
                max_tokens = self._max_tokens(params[key], f"response.{key}")
        audio = "audio" in modalities
        cap = self.limits.max_output_tokens
        max_new = cap if max_tokens == "inf" else min(cap, max_tokens)
        sampling = self.sampling
        if s.temperature is not None and not sampling.greedy:
            from dataclasses import replace
            sampling = replace(sampling, temperature=s.temperature)
        options = GenerationOptions(max_new_tokens=max_new, sampling=sampling, audio=audio, speaker=voice,
                                    max_codec_tokens=self.limits.max_codec_tokens)
        system = self.system_prompt(instructions if instructions is not None else s.instructions, audio)
        item_id = _new_id("item")
        resp = _Response(id=_new_id("resp"), item_id=item_id, cancel=threading.Event(),
                         cancelled=asyncio.Event(), t_request=time.monotonic(), t_end_of_turn=t_end_of_turn)
        conv = self.conv
        # raises EngineBusy at once (-> server_busy error, no response starts)
        stream = self.engine.stream(lambda: _respond(conv, system, options, item_id), resp.cancel,
                                    max_buffered=self.limits.stream_buffer)
        self.response = resp
        resp.task = asyncio.create_task(self._run_response(resp, stream, modalities, voice, max_tokens))

    def _response_object(self, resp: _Response, status: str, modalities, voice, max_tokens, output=(),
                         usage=None, details=None) -> dict:
        return {"object": "realtime.response", "id": resp.id, "status": status, "status_details": details,
                "output": list(output), "conversation_id": "conv_" + self.id[5:], "output_modalities": modalities,
                "max_output_tokens": max_tokens, "audio": {"output": {"format": {"type": "audio/pcm",
                                                                                   "rate": SAMPLE_RATE},
                                                                        "voice": voice}},
                "usage": usage, "metadata": None}

    async def _run_response(self, resp: _Response, stream, modalities, voice, max_tokens) -> None:
        audio = "audio" in modalities
        ptype = ("audio" if self.beta else "output_audio") if audio else ("text" if self.beta else "output_text")
        item = {"id": resp.item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        prev = self._last_item()
        self.items[resp.item_id] = {"item": item, "role": "assistant", "audio_ms": 0, "spoken": audio}
        ids = {"response_id": resp.id, "item_id": resp.item_id, "output_index": 0, "content_index": 0}
        text_parts: list[str] = []
        samples_sent = 0
        first_audio = True
        play_end = 0.0                       # when the client's playback of what was sent ends (estimated)
        done: Done | None = None
        status, details = "completed", None
        try:
            await self.send({"type": "response.created",
                             "response": self._response_object(resp, "in_progress", modalities, voice, max_tokens)})
            await self.send({"type": "response.output_item.added", "response_id": resp.id, "output_index": 0,
                             "item": item})
            await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
            await self.send({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
            part = {"type": ptype, "transcript": ""} if audio else {"type": ptype, "text": ""}
            await self.send({"type": "response.content_part.added", **ids, "part": part})
            try:
                async for ev in stream:
                    if resp.cancelled.is_set():
                        continue  # drain to the end: the engine closes the generator at its next round
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
                status = "failed"
                details = {"type": "failed", "error": {"type": "server_error", "code": "generation_failed",
                                                       "message": f"{type(e).__name__}: {e}"}}
            if resp.reason is not None:
                status = "cancelled"
                details = {"type": "cancelled", "reason": resp.reason}
            elif status == "completed" and done is not None and done.finish_reason == "length":
                status = "incomplete"
                details = {"type": "incomplete", "reason": "max_output_tokens"}
            text = "".join(text_parts)
            audio_ms = samples_sent * 1000 // SAMPLE_RATE
            self.items[resp.item_id]["audio_ms"] = audio_ms
            if audio:
                await self.send({"type": "response.output_audio.done", **ids})
                await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": text})
                part = {"type": ptype, "transcript": text}
            else:
                await self.send({"type": "response.output_text.done", **ids, "text": text})
                part = {"type": ptype, "text": text}
            await self.send({"type": "response.content_part.done", **ids, "part": part})
            final = dict(item, status="completed" if status == "completed" else "incomplete", content=[part])
            self.items[resp.item_id]["item"] = final
            await self.send({"type": "response.output_item.done", "response_id": resp.id, "output_index": 0,
                             "item": final})
            await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": final})
            usage = None
            if done is not None:
                out_audio = len(done.codec_ids)
                usage = {"total_tokens": done.prompt_tokens + len(done.token_ids) + out_audio,
                         "input_tokens": done.prompt_tokens, "output_tokens": len(done.token_ids) + out_audio,
                         "input_token_details": {"text_tokens": done.prompt_tokens, "audio_tokens": 0,
                                                 "cached_tokens": 0},
                         "output_token_details": {"text_tokens": len(done.token_ids), "audio_tokens": out_audio}}
            if self.metrics is not None:
                self.metrics.responses_total.inc(status=status)
                if audio and samples_sent:
                    # compute time on the worker per second of speech (wall time would include the pacing)
                    self.metrics.realtime_factor.observe(stream.busy_s / (samples_sent / SAMPLE_RATE))
            self.response = None  # a new response may start from the moment response.done is sent
            await self.send({"type": "response.done",
                             "response": self._response_object(resp, status, modalities, voice, max_tokens,
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
