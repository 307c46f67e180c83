"""The Realtime API's wire format: client-event validation and server-event objects, with no session state.

`realtime.py` (the session) calls these; nothing here touches the engine, the conversation or the socket.
- Every check raises `ClientError(code, message, param)`, which the session turns into one `error` event and goes
  on. `param` names the offending field by its JSON path (`session.audio.input.turn_detection.threshold`,
  `item.content[2].audio`), and `get_field` refuses a bool where a number is expected (JSON true is not 1).
- GA and beta (`OpenAI-Beta: realtime=v1`) shapes are both accepted from every client: `session.update` reads
  the GA nested fields (`audio.input.turn_detection`, `audio.output.voice`, `output_modalities`,
  `max_output_tokens`) and the beta flat ones (`turn_detection`, `voice`, `modalities`, `input_audio_format`,
  `max_response_output_tokens`); where both are given the beta one wins. A whole update is validated into a new
  `SessionSettings` before anything is applied, so a bad update changes nothing.
- Media arrive inline only: PCM16 24 kHz mono base64 audio (resampled here to the encoder's 16 kHz for a
  `conversation.item.create`), JPEG/PNG data URIs up to `MAX_IMAGE_PIXELS`; remote URLs are never fetched.
- Server events are built in their GA shape; `BETA_NAMES` renames the six that differ for beta clients, and
  `session_object(beta=True)` adds the flat beta fields next to the GA ones.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import uuid
from dataclasses import dataclass

import numpy as np
import soxr

from omnivox.server.realtime_audio import ENCODER_RATE
from omnivox.streaming.conversation import ContextFull
from omnivox.streaming.pipeline import SAMPLE_RATE

MAX_EVENT_BYTES = 15 * 1024 * 1024
MIN_COMMIT_MS = 100                  # OpenAI refuses to commit less than 100 ms of audio
MAX_IMAGE_PIXELS = 40_000_000

BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_NAMES = {v: k for k, v in BETA_NAMES.items()}


class ClientError(Exception):
    """A client event the session refuses; becomes one `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# ----------------------------------------------------------------------------------------------------------------
# Field validation

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
               list: "an array"}


def get_field(obj: dict, key: str, kind, param: str, required: bool = False, default=None):
    """obj[key] checked against `kind` (a type or a tuple of types); absent or null -> `default`."""
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
# Client events

def decode_frame(message: dict, max_event_bytes: int) -> dict:
    """One websocket message (ASGI `websocket.receive`) -> the event object: a JSON object in a text frame, at
    most `max_event_bytes` long (the server's frame limit is larger, so an oversized event gets this error)."""
    data = message.get("text")
    if data is None:
        raw = message.get("bytes") or b""
        if len(raw) > max_event_bytes:
            raise ClientError("event_too_large", f"event of {len(raw)} bytes is over the {max_event_bytes} byte "
                              "limit")
        raise ClientError("invalid_event", "binary frames are not supported: send JSON text frames")
    if len(data) > max_event_bytes:
        raise ClientError("event_too_large", f"event of {len(data)} bytes is over the {max_event_bytes} byte limit")
    try:
        event = json.loads(data)
    except ValueError as e:
        raise ClientError("invalid_json", f"the event is not valid JSON: {e}") from None
    if not isinstance(event, dict):
        raise ClientError("invalid_event", "an event must be a JSON object")
    return event


def event_type(event: dict) -> str:
    """The event's `type` as sent (the optional `event_id` must be a string too)."""
    get_field(event, "event_id", str, "event_id")
    return get_field(event, "type", str, "type", required=True)


@dataclass
class SessionSettings:
    """What `session.update` can change (GA names; beta fields map onto these)."""
    output_modalities: list[str]
    instructions: str
    voice: str | None
    turn_detection: dict | None                 # None: manual commit (no server VAD)
    max_output_tokens: int | str = "inf"
    temperature: float | None = None
    transcription: dict | None = None           # input audio transcription ({model, language, prompt}); None: off
    truncation: str | dict = "auto"             # "auto" | "disabled" | {"type": "retention_ratio", ...}


def default_turn_detection() -> dict:
    return {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
            "create_response": True, "interrupt_response": True}


def parse_voice(value, param: str, speakers: list[str]) -> str:
    """A voice name (case-insensitive) -> the checkpoint's spelling of it."""
    if not isinstance(value, str):
        raise ClientError("invalid_type", f"'{param}' must be a string", param)
    for name in speakers:
        if name.lower() == value.lower():
            return name
    raise ClientError("invalid_value", f"unknown voice {value!r}; this checkpoint has: "
                      f"{', '.join(speakers) or 'none (text only)'}", param)


def parse_modalities(value, param: str, can_speak: bool) -> list[str]:
    """-> ['audio'] (spoken, with its transcript) or ['text']."""
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ClientError("invalid_type", f"'{param}' must be an array of strings", param)
    if not value or any(m not in ("text", "audio") for m in value):
        raise ClientError("invalid_value", f"'{param}' must be ['audio'] or ['text']", param)
    if "audio" in value:
        if not can_speak:
            raise ClientError("invalid_value", "this server was loaded without speech output: "
                              "use ['text']", param)
        return ["audio"]
    return ["text"]


def parse_max_tokens(value, param: str):
    if value == "inf":
        return "inf"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientError("invalid_type", f"'{param}' must be an integer or 'inf'", param)
    if not 1 <= value <= 4096:
        raise ClientError("invalid_value", f"'{param}' must be between 1 and 4096", param)
    return value


def parse_turn_detection(value, param: str, current: dict | None) -> dict | None:
    """A turn_detection object -> the full setting (fields not given keep `current`'s, or the defaults)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"'{param}' must be an object or null", param)
    kind = get_field(value, "type", str, f"{param}.type", default="server_vad")
    if kind != "server_vad":
        raise ClientError("invalid_value", f"'{param}.type' {kind!r} is not supported: use 'server_vad' "
                          "or null (manual commit)", f"{param}.type")
    td = dict(current or default_turn_detection())
    td["type"] = "server_vad"
    thr = get_field(value, "threshold", (int, float), f"{param}.threshold")
    if thr is not None:
        if not 0.0 <= thr <= 1.0:
            raise ClientError("invalid_value", f"'{param}.threshold' must be between 0 and 1",
                              f"{param}.threshold")
        td["threshold"] = float(thr)
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        v = get_field(value, key, int, f"{param}.{key}")
        if v is not None:
            if not 0 <= v <= 10000:
                raise ClientError("invalid_value", f"'{param}.{key}' must be between 0 and 10000",
                                  f"{param}.{key}")
            td[key] = v
    for key in ("create_response", "interrupt_response"):
        v = get_field(value, key, bool, f"{param}.{key}")
        if v is not None:
            td[key] = v
    return td


def check_audio_format(value, param: str) -> None:
    """Only PCM16 at 24 kHz: GA {'type': 'audio/pcm', 'rate': 24000} or beta 'pcm16'."""
    if isinstance(value, str):  # beta: "pcm16"
        if value != "pcm16":
            raise ClientError("invalid_value", f"'{param}' {value!r} is not supported: use 'pcm16'", param)
        return
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"'{param}' must be an object", param)
    kind = get_field(value, "type", str, f"{param}.type")
    rate = get_field(value, "rate", int, f"{param}.rate")
    if kind not in (None, "audio/pcm") or rate not in (None, SAMPLE_RATE):
        raise ClientError("invalid_value", f"'{param}' must be {{'type': 'audio/pcm', 'rate': 24000}}", param)


def parse_transcription(value, param: str) -> dict | None:
    """An input audio transcription setting (null turns it off). The loaded model itself transcribes: `model` is
    echoed and otherwise ignored; `language` (ISO-639-1) names the language in the ASR prompt; `prompt` is kept
    for the client and not used."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"'{param}' must be an object or null", param)
    out = {}
    for key in ("model", "language", "prompt"):
        v = get_field(value, key, str, f"{param}.{key}")
        if v is not None:
            out[key] = v
    return out


def parse_truncation(value, param: str):
    """'auto', 'disabled' or {'type': 'retention_ratio', 'retention_ratio': r} (0 < r <= 1)."""
    if value in ("auto", "disabled"):
        return value
    if isinstance(value, str):
        raise ClientError("invalid_value", f"'{param}' must be 'auto', 'disabled' or a retention_ratio object",
                          param)
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"'{param}' must be a string or an object", param)
    kind = get_field(value, "type", str, f"{param}.type", required=True)
    if kind != "retention_ratio":
        raise ClientError("invalid_value", f"'{param}.type' must be 'retention_ratio'", f"{param}.type")
    ratio = get_field(value, "retention_ratio", (int, float), f"{param}.retention_ratio", required=True)
    if not 0 < ratio <= 1:
        raise ClientError("invalid_value", f"'{param}.retention_ratio' must be in (0, 1]",
                          f"{param}.retention_ratio")
    if value.get("token_limits") is not None:
        raise ClientError("invalid_value", f"'{param}.token_limits' is not supported (the server's context "
                          "limit applies)", f"{param}.token_limits")
    return {"type": "retention_ratio", "retention_ratio": float(ratio)}


def parse_session_update(sess: dict, s: SessionSettings, speakers: list[str],
                         can_speak: bool) -> tuple[SessionSettings, bool]:
    """A `session.update`'s session object over the current settings -> (new settings, turn_detection given)."""
    new = SessionSettings(list(s.output_modalities), s.instructions, s.voice,
                          None if s.turn_detection is None else dict(s.turn_detection), s.max_output_tokens,
                          s.temperature, s.transcription, s.truncation)
    td_given = False
    kind = get_field(sess, "type", str, "session.type")
    if kind not in (None, "realtime"):
        raise ClientError("invalid_value", f"session.type {kind!r} is not supported: use 'realtime'",
                          "session.type")
    if "output_modalities" in sess:
        new.output_modalities = parse_modalities(sess["output_modalities"], "session.output_modalities", can_speak)
    if "modalities" in sess:  # beta
        new.output_modalities = parse_modalities(sess["modalities"], "session.modalities", can_speak)
    instructions = get_field(sess, "instructions", str, "session.instructions")
    if instructions is not None:
        new.instructions = instructions
    audio = get_field(sess, "audio", dict, "session.audio", default={})
    ain = get_field(audio, "input", dict, "session.audio.input", default={})
    aout = get_field(audio, "output", dict, "session.audio.output", default={})
    if "format" in ain:
        check_audio_format(ain["format"], "session.audio.input.format")
    if "format" in aout:
        check_audio_format(aout["format"], "session.audio.output.format")
    if "input_audio_format" in sess:
        check_audio_format(sess["input_audio_format"], "session.input_audio_format")
    if "output_audio_format" in sess:
        check_audio_format(sess["output_audio_format"], "session.output_audio_format")
    # both spellings build on the current setting (not on each other)
    if "turn_detection" in ain:
        new.turn_detection = parse_turn_detection(ain["turn_detection"], "session.audio.input.turn_detection",
                                                  s.turn_detection)
        td_given = True
    if "turn_detection" in sess:
        new.turn_detection = parse_turn_detection(sess["turn_detection"], "session.turn_detection",
                                                  s.turn_detection)
        td_given = True
    if "transcription" in ain:
        new.transcription = parse_transcription(ain["transcription"], "session.audio.input.transcription")
    if "input_audio_transcription" in sess:  # beta
        new.transcription = parse_transcription(sess["input_audio_transcription"],
                                                "session.input_audio_transcription")
    if sess.get("truncation") is not None:
        new.truncation = parse_truncation(sess["truncation"], "session.truncation")
    if aout.get("voice") is not None:
        new.voice = parse_voice(aout["voice"], "session.audio.output.voice", speakers)
    if sess.get("voice") is not None:
        new.voice = parse_voice(sess["voice"], "session.voice", speakers)
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if sess.get(key) is not None:
            new.max_output_tokens = parse_max_tokens(sess[key], f"session.{key}")
    tools = get_field(sess, "tools", list, "session.tools")
    if tools:
        raise ClientError("invalid_value", "tools (function calling) are not supported by this server",
                          "session.tools")
    temp = get_field(sess, "temperature", (int, float), "session.temperature")
    if temp is not None:
        if not 0 < temp <= 2:
            raise ClientError("invalid_value", "'session.temperature' must be in (0, 2]", "session.temperature")
        new.temperature = float(temp)
    return new, td_given


@dataclass
class ResponseParams:
    """A `response.create`'s overrides resolved against the session's settings."""
    instructions: str | None            # None: the session's
    modalities: list[str]
    voice: str | None
    max_tokens: int | str               # an int or "inf"


def parse_response_params(params: dict, s: SessionSettings, speakers: list[str],
                          can_speak: bool) -> ResponseParams:
    conversation = get_field(params, "conversation", str, "response.conversation")
    if conversation not in (None, "auto"):
        raise ClientError("invalid_value", "only conversation='auto' responses are supported",
                          "response.conversation")
    instructions = get_field(params, "instructions", str, "response.instructions")
    modalities = s.output_modalities
    for key in ("output_modalities", "modalities"):
        if key in params:
            modalities = parse_modalities(params[key], f"response.{key}", can_speak)
    voice = s.voice
    aout = get_field(get_field(params, "audio", dict, "response.audio", default={}), "output", dict,
                     "response.audio.output", default={})
    if aout.get("voice") is not None:
        voice = parse_voice(aout["voice"], "response.audio.output.voice", speakers)
    if params.get("voice") is not None:
        voice = parse_voice(params["voice"], "response.voice", speakers)
    max_tokens = s.max_output_tokens
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if params.get(key) is not None:
            max_tokens = parse_max_tokens(params[key], f"response.{key}")
    return ResponseParams(instructions, modalities, voice, max_tokens)


def parse_item(item: dict, max_input_audio_s: float) -> tuple[str, list[dict], list[dict], int]:
    """A `conversation.item.create`'s item -> role, pipeline parts (16 kHz audio, PIL images), content echoed to
    the client, audio ms."""
    kind = get_field(item, "type", str, "item.type", default="message")
    if kind != "message":
        raise ClientError("invalid_value", f"item type {kind!r} is not supported (no tools): use 'message'",
                          "item.type")
    role = get_field(item, "role", str, "item.role", required=True)
    if role not in ("user", "assistant", "system"):
        raise ClientError("invalid_value", "'item.role' must be 'user', 'assistant' or 'system'", "item.role")
    content = get_field(item, "content", list, "item.content", required=True)
    if not content:
        raise ClientError("invalid_value", "'item.content' is empty", "item.content")
    parts, echo, audio_ms = [], [], 0
    for k, c in enumerate(content):
        p = f"item.content[{k}]"
        if not isinstance(c, dict):
            raise ClientError("invalid_type", f"'{p}' must be an object", p)
        ctype = get_field(c, "type", str, f"{p}.type", required=True)
        allowed = {"user": ("input_text", "input_audio", "input_image"), "system": ("input_text",),
                   "assistant": ("output_text", "text", "output_audio", "audio")}[role]
        if ctype not in allowed:
            raise ClientError("invalid_value", f"'{p}.type' {ctype!r} is not allowed in a {role} item "
                              f"(use {', '.join(allowed)})", f"{p}.type")
        if ctype in ("input_text", "output_text", "text"):
            text = get_field(c, "text", str, f"{p}.text", required=True)
            parts.append({"type": "text", "text": text})
            echo.append({"type": ctype, "text": text})
        elif ctype in ("output_audio", "audio"):  # an assistant turn given by its transcript
            text = get_field(c, "transcript", str, f"{p}.transcript", required=True)
            parts.append({"type": "text", "text": text})
            echo.append({"type": ctype, "transcript": text})
        elif ctype == "input_audio":
            pcm = decode_pcm16(c.get("audio"), f"{p}.audio")
            if len(pcm) > max_input_audio_s * SAMPLE_RATE:
                raise ClientError("input_audio_too_long", f"'{p}.audio' is longer than "
                                  f"{max_input_audio_s:g} s", f"{p}.audio")
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


# ----------------------------------------------------------------------------------------------------------------
# Server events

def error_event(code: str, message: str, param: str | None = None, event_id: str | None = None,
                type_: str = "invalid_request_error") -> dict:
    return {"type": "error", "error": {"type": type_, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def session_object(s: SessionSettings, session_id: str, model_id: str, beta: bool, expires_at: int) -> dict:
    td = None if s.turn_detection is None else dict(s.turn_detection)
    fmt = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    obj = {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model_id,
           "output_modalities": list(s.output_modalities), "instructions": s.instructions,
           "audio": {"input": {"format": fmt, "turn_detection": td, "transcription": s.transcription},
                     "output": {"format": fmt, "voice": s.voice, "speed": 1.0}},
           "max_output_tokens": s.max_output_tokens, "tools": [], "tool_choice": "auto", "expires_at": expires_at,
           "truncation": s.truncation}
    if beta:  # beta clients read the flat fields
        obj.update(input_audio_transcription=s.transcription,
                   modalities=["text", "audio"] if "audio" in s.output_modalities else ["text"],
                   voice=s.voice, turn_detection=td, input_audio_format="pcm16", output_audio_format="pcm16",
                   max_response_output_tokens=s.max_output_tokens)
    return obj


def message_item(item_id: str, role: str, status: str, content: list) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": status, "role": role,
            "content": content}


def output_part(audio: bool, beta: bool, text: str) -> dict:
    """An assistant item's content part: spoken (its transcript) or text, named as the client's API version names it
    (GA items say output_audio/output_text)."""
    if audio:
        return {"type": "audio" if beta else "output_audio", "transcript": text}
    return {"type": "text" if beta else "output_text", "text": text}


def event_part(audio: bool, text: str) -> dict:
    """The part of response.content_part.added/.done: the schema allows only "audio" or "text" there, GA and beta."""
    return {"type": "audio", "transcript": text} if audio else {"type": "text", "text": text}


def response_object(response_id: str, session_id: str, status: str, modalities, voice, max_tokens, output=(),
                    usage=None, details=None) -> dict:
    return {"object": "realtime.response", "id": response_id, "status": status, "status_details": details,
            "output": list(output), "conversation_id": "conv_" + session_id[5:], "output_modalities": modalities,
            "max_output_tokens": max_tokens, "audio": {"output": {"format": {"type": "audio/pcm",
                                                                               "rate": SAMPLE_RATE},
                                                                    "voice": voice}},
            "usage": usage, "metadata": None}


def response_status(cancel_reason: str | None, failure: Exception | None, done) -> tuple[str, dict | None]:
    """-> (status, status_details) of a finished response: a cancel wins over a failure, a failure over the
    `Done` it may have reached; a `Done` that stopped at its token limit is incomplete."""
    if cancel_reason is not None:
        return "cancelled", {"type": "cancelled", "reason": cancel_reason}
    if isinstance(failure, ContextFull):
        return "failed", {"type": "failed", "error": {"type": "invalid_request_error",
                                                      "code": "context_length_exceeded", "message": str(failure)}}
    if failure is not None:
        return "failed", {"type": "failed", "error": {"type": "server_error", "code": "generation_failed",
                                                      "message": f"{type(failure).__name__}: {failure}"}}
    if done is not None and done.finish_reason == "length":
        return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    return "completed", None


def transcription_usage(done, audio_tokens: int) -> dict:
    """The `usage` of an input audio transcription (token-billed shape)."""
    out = len(done.token_ids)
    return {"type": "tokens", "input_tokens": done.prompt_tokens, "output_tokens": out,
            "total_tokens": done.prompt_tokens + out,
            "input_token_details": {"text_tokens": done.prompt_tokens - audio_tokens, "audio_tokens": audio_tokens}}


def usage_object(done) -> dict:
    """A pipeline `Done` -> the response's usage (audio tokens: the Talker's codec codes)."""
    out_audio = len(done.codec_ids)
    return {"total_tokens": done.prompt_tokens + len(done.token_ids) + out_audio,
            "input_tokens": done.prompt_tokens, "output_tokens": len(done.token_ids) + out_audio,
            "input_token_details": {"text_tokens": done.prompt_tokens, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": len(done.token_ids), "audio_tokens": out_audio}}
