"""`POST /v1/chat/completions`: the OpenAI Chat Completions API, with speech streamed while it is generated.

What is notable:
- **Streamed audio.** With `modalities: ["text", "audio"]` and `stream: true`, SSE chunks carry
  `delta.audio.data` (base64 PCM16 mono 24 kHz) and `delta.audio.transcript` (text pieces) interleaved in the
  order the turn pipeline produces them: the Talker runs in lock-step behind the Thinker, so audio starts after a
  few dozen tokens, long before the text is finished (vLLM-Omni returns audio only at the end). A streamed
  response always carries raw PCM16 chunks, also when `audio.format` is "wav" (a header with unknown length in
  the first chunk would turn every client's "decode each chunk as PCM16" into noise; OpenAI streams pcm16 only).
  Non-streamed responses carry the whole reply as a WAV file or raw PCM16, as asked.
- **One model worker.** The turn runs as `app.state.engine.stream(lambda: generate(omni, messages, options),
  cancel)`, so it interleaves with realtime sessions token by token and shares their limits: over them -> 503
  with an OpenAI-style error. A client that disconnects cancels the turn (Talker and token2wav stop too).
  Without an engine on app.state (tests, embedding) a thread runs the turn, one at a time.
- **Errors before the first byte.** The handler waits for the first event before answering, so a prompt the
  pipeline rejects (undecodable media, prompt longer than the context) is a 400, not a broken stream.
- **System prompt with speech.** Qwen2.5-Omni speaks only with its official system prompt (REFERENCE.md). When
  audio output is on, the system message is `SPEECH_SYSTEM_PROMPT`, and the request's own system/developer
  text, if any, follows it after a blank line (so instructions still apply and speech still works). Text-only
  requests use their system messages as given (several are joined into one at the top; none: the chat template's
  default "You are a helpful assistant.").
- **Multi-turn audio.** OpenAI clients send a previous spoken reply back as `{"role": "assistant", "audio":
  {"id": ...}}`. We keep the transcripts (not the audio) of recent replies until `expires_at` and resolve such
  ids to the reply text, which is what the Thinker needs.

Input: message content is a string or parts: `text`, `input_audio` {data: base64, format: "wav" | "mp3" |
"pcm16" (raw little-endian 24 kHz mono, as the Realtime API)}, decoded and resampled to the encoder's 16 kHz;
`image_url` {url: "data:image/png|jpeg;base64,..."} (http(s) URLs are not fetched). Sampling: `temperature` 0 =
greedy; `temperature`/`top_p` start from the checkpoint's generation_config; none given = its defaults; `seed`
seeds the Thinker and the Talker; `max_audio_tokens` (non-standard, extra_body) caps the speech in codec
tokens (50 per second; default: see MAX_AUDIO_TOKENS). Unsupported features (tools, n > 1, stop, logprobs,
penalties, json formats) are rejected with a 400 that names them rather than silently ignored.
Metrics (app.state.metrics): first_audio_seconds from the request's arrival, realtime_factor = the pipeline's
wall time / audio seconds, responses_total by status (completed = stop, incomplete = length, cancelled, failed),
errors_total by error type.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import json
import logging
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from omnivox.security import check_api_key, origin_allowed
from omnivox.streaming.pipeline import (SAMPLE_RATE, SPEECH_SYSTEM_PROMPT, AudioChunk, Done, GenerationOptions,
                                        TextDelta, default_sampling, generate)
from omnivox.thinker.sampling import SamplingParams

log = logging.getLogger("omnivox.chat")

DEFAULT_MAX_TOKENS = 1024
MAX_REQUEST_BYTES = 32 * 1024 * 1024
INPUT_PCM16_RATE = 24000
ENCODER_RATE = 16000
# Speech length limit (codec tokens, 50 per second). Non-standard body field `max_audio_tokens` sets it (the SDK's
# extra_body); by default it follows max_tokens: 25 codes (0.5 s of speech) per text token + 5 s, at most 4096
# (82 s). Natural speech needs about 12-20 codes per token, so only a Talker that fails to stop is cut.
MAX_AUDIO_TOKENS = 4096
AUDIO_TOKENS_PER_TEXT_TOKEN = 25
AUDIO_TOKENS_SLACK = 250
AUDIO_TTL_S = 3600                      # how long a reply's audio id resolves to its transcript
_ROLES = {"system", "developer", "user", "assistant"}
_OUTPUT_FORMATS = ("pcm16", "wav")
_UNSUPPORTED = {  # request field -> why; a 400 names it when it asks for something we would silently not do
    "tools": "tools / function calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tools / function calling is not supported",
    "stop": "stop sequences are not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


class RequestError(Exception):
    """A bad request: becomes a 400 `invalid_request_error` with `param` naming the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class ChatRequest:
    messages: list[dict]          # the pipeline's messages (content parts text / audio arrays / image bytes)
    options: GenerationOptions
    stream: bool
    include_usage: bool
    audio_format: str | None      # None: text only; else "pcm16" | "wav"
    voice: str | None


# ------------------------------------------------------------------------------------------------------------
# Transcripts of recent spoken replies, for `{"role": "assistant", "audio": {"id"}}` in later requests


class _Transcripts:
    def __init__(self, capacity: int = 4096):
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()
        self.capacity = capacity

    def put(self, audio_id: str, text: str, expires_at: float) -> None:
        with self._lock:
            self._items[audio_id] = (expires_at, text)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            got = self._items.get(audio_id)
        if got is None or got[0] < time.time():
            return None
        return got[1]


TRANSCRIPTS = _Transcripts()


# ------------------------------------------------------------------------------------------------------------
# Input decoding


def _b64(data, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError("expected a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("not valid base64", param) from None


def decode_input_audio(part: dict, param: str) -> np.ndarray:
    """An `input_audio` part -> mono float32 at 16 kHz (the audio encoder's rate)."""
    from omnivox.encoders.audio_features import load_audio, pcm16_to_float

    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise RequestError("input_audio must be an object {data, format}", param + ".input_audio")
    fmt = spec.get("format")
    if fmt not in ("wav", "mp3", "pcm16"):
        raise RequestError(f"input_audio.format must be 'wav', 'mp3' or 'pcm16' (24 kHz mono), got {fmt!r}",
                           param + ".input_audio.format")
    raw = _b64(spec.get("data"), param + ".input_audio.data")
    what = f"input_audio ({fmt})"
    try:
        if fmt == "pcm16":
            if len(raw) % 2:
                raise ValueError("PCM16 data must hold a whole number of 2-byte samples")
            return load_audio(pcm16_to_float(raw), sr=INPUT_PCM16_RATE, target_sr=ENCODER_RATE)
        if fmt == "wav" and (raw[:4] != b"RIFF" or raw[8:12] != b"WAVE"):
            raise ValueError("not a WAV file (no RIFF/WAVE header)")
        import soundfile as sf

        try:
            x, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)   # (n, ch)
        except Exception as e:  # noqa: BLE001 - libsndfile raises its own error types
            raise ValueError(f"cannot decode the audio: {e}") from None
        return load_audio(x, sr=rate, target_sr=ENCODER_RATE)
    except ValueError as e:
        raise RequestError(f"{what}: {e}", param + ".input_audio.data") from None


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.S)


def decode_image_url(part: dict, param: str) -> bytes:
    """An `image_url` part with a JPEG/PNG data: URI -> the image file's bytes (decoded by the pipeline)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    p = param + ".image_url.url"
    if not isinstance(url, str) or not url:
        raise RequestError("image_url must be an object {url: 'data:image/...;base64,...'}", p)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        raise RequestError("remote URLs are not fetched: send the image inline as a data: URI "
                           "(data:image/jpeg;base64,...)", p, code="remote_url_not_supported")
    m = _DATA_URI.match(url)
    if scheme != "data" or m is None:
        raise RequestError("image_url.url must be a data: URI (data:image/jpeg;base64,...)", p)
    if ";base64" not in m.group("params").lower():
        raise RequestError("the image data: URI must be base64-encoded (data:image/png;base64,...)", p)
    raw = _b64(m.group("data"), p)
    from PIL import Image, UnidentifiedImageError

    try:
        fmt = Image.open(io.BytesIO(raw)).format      # reads the header only
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise RequestError(f"cannot decode the image: {e}", p) from None
    if fmt not in ("JPEG", "PNG"):
        raise RequestError(f"images must be JPEG or PNG, got {fmt}", p)
    return raw


# ------------------------------------------------------------------------------------------------------------
# Request -> pipeline messages and options


def _text_of(content, param: str) -> str:
    """System / assistant content: a string or text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError("content must be a string or a list of text parts", param)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
            raise RequestError("only text parts are allowed here", f"{param}[{j}]")
        text = part.get(part["type"])
        if not isinstance(text, str):
            raise RequestError(f"a {part['type']} part needs a string {part['type']!r}", f"{param}[{j}]")
        out.append(text)
    return "".join(out)


def _user_content(content, param: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RequestError("user content must be a string or a non-empty list of parts", param)
    parts = []
    for j, part in enumerate(content):
        pp = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise RequestError("a content part must be an object with a type", pp)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("a text part needs a string 'text'", pp + ".text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_audio":
            parts.append({"type": "audio", "audio": decode_input_audio(part, pp)})
        elif kind == "image_url":
            parts.append({"type": "image", "image": decode_image_url(part, pp)})
        else:
            raise RequestError(f"unsupported content part type {kind!r}; supported: text, input_audio, image_url",
                               pp + ".type")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def convert_messages(messages, audio_out: bool) -> list[dict]:
    """OpenAI messages -> the pipeline's; system/developer texts become one system message at the top."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError("a message must be an object {role, content}", p)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(f"unsupported role {role!r}; supported: {', '.join(sorted(_ROLES))}", p + ".role")
        content = m.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, p + ".content"))
        elif role == "assistant":
            if content is None and isinstance(m.get("audio"), dict):
                text = TRANSCRIPTS.get(str(m["audio"].get("id")))
                if text is None:
                    raise RequestError("unknown or expired assistant audio id: send the reply's transcript as "
                                       "the message content instead", p + ".audio.id")
            elif m.get("tool_calls"):
                raise RequestError("tool calls are not supported", p + ".tool_calls")
            else:
                text = _text_of(content if content is not None else "", p + ".content")
            turns.append({"role": "assistant", "content": text})
        else:
            if content is None:
                raise RequestError("a user message needs content", p + ".content")
            turns.append({"role": "user", "content": _user_content(content, p + ".content")})
    if not any(t["role"] == "user" for t in turns):
        raise RequestError("messages must contain at least one user message", "messages")
    own = "\n\n".join(s for s in system if s.strip())
    if audio_out:
        # speech needs the official prompt; the request's instructions follow it
        own = SPEECH_SYSTEM_PROMPT if own in ("", SPEECH_SYSTEM_PROMPT) else SPEECH_SYSTEM_PROMPT + "\n\n" + own
    return ([{"role": "system", "content": own}] if own or system else []) + turns


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise RequestError(f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RequestError(f"{key} must be an integer >= {lo}, got {v!r}", key)
    return v


def _sampling(body: dict, generation: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", 0)
    if temperature == 0:
        return SamplingParams(greedy=True, seed=seed)
    base = default_sampling(generation)
    if temperature is None and top_p is None:
        return replace(base, seed=seed)
    if base.greedy:  # the checkpoint decodes greedily: sampling asked for starts from neutral values
        base = SamplingParams(greedy=False)
    return replace(base, greedy=False, temperature=temperature if temperature is not None else base.temperature,
                   top_p=top_p if top_p is not None else base.top_p, seed=seed)


def _voice(omni, voice) -> str:
    speakers = sorted(omni.speakers or {})
    if voice is None:
        return "Chelsie" if "Chelsie" in speakers else speakers[0]
    if isinstance(voice, str):
        for name in speakers:
            if name.lower() == voice.lower():
                return name
    raise RequestError(f"unknown voice {voice!r}; this model's voices: {', '.join(speakers)}", "audio.voice",
                       code="unsupported_voice")


def parse_request(body, omni, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ChatRequest:
    """Validate a Chat Completions request body; RequestError names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, why in _UNSUPPORTED.items():
        v = body.get(key)
        if v not in (None, False, 0, [], {}, "", "none"):
            raise RequestError(why, key, code="unsupported_parameter")
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", "n", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("only response_format {\"type\": \"text\"} is supported", "response_format",
                           code="unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is None:
        modalities = ["text"]
    if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio"}:
        raise RequestError(f"modalities must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}",
                           "modalities")
    audio_out = "audio" in modalities
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise RequestError("stream must be a boolean", "stream")
    stream = bool(stream)
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(so, dict) or so.get("include_usage") not in (None, True, False):
            raise RequestError("stream_options must be {\"include_usage\": bool}", "stream_options")
        include_usage = bool(so.get("include_usage"))

    audio_format = voice = None
    if audio_out:
        if not omni.speakers or omni.talker is None:
            raise RequestError("this server has no speech output (the model was loaded without the Talker or "
                               "has no speakers); use modalities [\"text\"]", "modalities")
        spec = body.get("audio") or {}
        if not isinstance(spec, dict):
            raise RequestError("audio must be an object {voice, format}", "audio")
        audio_format = spec.get("format") or ("pcm16" if stream else "wav")
        if audio_format not in _OUTPUT_FORMATS:
            raise RequestError(f"audio.format must be 'pcm16' or 'wav', got {audio_format!r}", "audio.format",
                               code="unsupported_format")
        voice = _voice(omni, spec.get("voice"))

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    max_tokens = max_tokens or default_max_tokens
    max_audio = _int(body, "max_audio_tokens", 1)
    if max_audio is None:
        max_audio = min(MAX_AUDIO_TOKENS, AUDIO_TOKENS_PER_TEXT_TOKEN * max_tokens + AUDIO_TOKENS_SLACK)
    options = GenerationOptions(max_new_tokens=max_tokens, sampling=_sampling(body, omni.config.generation),
                                audio=audio_out, speaker=voice, max_codec_tokens=min(max_audio, MAX_AUDIO_TOKENS))
    messages = convert_messages(body.get("messages"), audio_out)
    return ChatRequest(messages, options, stream, include_usage, audio_format, voice)


# ------------------------------------------------------------------------------------------------------------
# Output helpers


def wav_bytes(pcm16: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit PCM WAV file."""
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm16), b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                         sample_rate * 2, 2, 16, b"data", len(pcm16))
    return header + pcm16


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(state, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None):
    from starlette.responses import JSONResponse

    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.errors_total.inc(type=type_ if status != 503 else "server_busy")
    return JSONResponse(_error_body(message, type_, param, code), status_code=status)


def _usage(done: Done, audio: bool) -> dict:
    text_tokens = len(done.token_ids)
    audio_tokens = len(done.codec_ids) if audio else 0
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": text_tokens + audio_tokens,
            "total_tokens": done.prompt_tokens + text_tokens + audio_tokens,
            "completion_tokens_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens,
                                          "reasoning_tokens": 0}}


def _model_id(state, omni) -> str:
    options = getattr(state, "options", None)
    name = getattr(options, "model_id", None)
    return name if isinstance(name, str) and name else Path(str(omni.path)).name


def _status(done: Done | None, cancelled: bool) -> str:
    if cancelled:
        return "cancelled"
    if done is None:
        return "failed"
    return "completed" if done.finish_reason == "stop" else "incomplete"


# ------------------------------------------------------------------------------------------------------------
# Running the turn


_FALLBACK_LOCK = threading.Lock()
_END = object()


async def _thread_stream(make_gen, cancel: threading.Event, max_buffered: int = 64):
    """Without an Engine: run the generator on a thread (one turn at a time), bounded buffer, cancel-aware."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(max_buffered)

    def deliver(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed
            pass

    def work() -> None:
        error = None
        try:
            with _FALLBACK_LOCK:
                if cancel.is_set():
                    return
                gen = make_gen()
                try:
                    for event in gen:
                        while not room.acquire(timeout=0.05):
                            if cancel.is_set():
                                return
                        if cancel.is_set():
                            return
                        deliver(event)
                finally:
                    gen.close()
        except Exception as e:  # noqa: BLE001 - raised on the asyncio side
            error = e
        finally:
            deliver(error if error is not None else _END)

    threading.Thread(target=work, name="omnivox-chat", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            room.release()
            yield item
    finally:
        cancel.set()


def _open_stream(state, omni, req: ChatRequest, cancel: threading.Event):
    def make_gen():
        return generate(omni, req.messages, req.options)

    engine = getattr(state, "engine", None)
    if engine is not None:
        return engine.stream(make_gen, cancel)
    return _thread_stream(make_gen, cancel)


async def _close(events) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing a finished stream
            pass


def _is_busy(e: BaseException) -> bool:
    return type(e).__name__ == "EngineBusy"


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is larger than {limit} bytes", status=413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413,
                               code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class _Turn:
    """Bookkeeping of one response: timing, metrics, the Done event."""

    def __init__(self, state, t0: float, audio: bool):
        self.metrics = getattr(state, "metrics", None)
        self.t0, self.audio = t0, audio
        self.first_audio: float | None = None
        self.done: Done | None = None
        self.recorded = False

    def saw(self, event) -> None:
        if isinstance(event, AudioChunk) and self.first_audio is None:
            self.first_audio = time.perf_counter() - self.t0
            if self.metrics is not None:
                self.metrics.first_audio_seconds.observe(self.first_audio)
        elif isinstance(event, Done):
            self.done = event

    def finish(self, cancelled: bool = False, error: str | None = None) -> None:
        if self.recorded or self.metrics is None:
            return
        self.recorded = True
        status = _status(self.done, cancelled)
        self.metrics.responses_total.inc(status=status)
        if error is not None:
            self.metrics.errors_total.inc(type=error)
        d = self.done
        if d is not None and self.audio and d.audio_seconds > 0:
            self.metrics.realtime_factor.observe(d.timings["total_ms"] / 1000.0 / d.audio_seconds)


def _parse_raw(raw: bytes, omni, default_max_tokens: int) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    return parse_request(body, omni, default_max_tokens)


async def chat_completions(request, app_state=None):
    """The Starlette endpoint; `app_state` defaults to request.app.state (omni, engine, metrics, options)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    t0 = time.perf_counter()
    state = app_state if app_state is not None else request.app.state
    omni = state.omni
    options = getattr(state, "options", None)

    key = getattr(options, "api_key", None)
    if not check_api_key(request.headers, None, key):
        return _error(state, 401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                      code="invalid_api_key")
    if not origin_allowed(request.headers.get("origin"), getattr(options, "allow_origins", None) or (),
                          getattr(options, "host", "127.0.0.1"), request_host=request.headers.get("host")):
        return _error(state, 403, "this page's origin is not allowed (start the server with --allow-origin)",
                      code="origin_not_allowed")
    try:
        raw = await _read_body(request, getattr(options, "max_request_bytes", None) or MAX_REQUEST_BYTES)
        # JSON and media decoding (mp3, resampling) off the event loop, which realtime sessions share
        req = await run_in_threadpool(_parse_raw, raw, omni,
                                      getattr(options, "max_tokens", None) or DEFAULT_MAX_TOKENS)
    except RequestError as e:
        return _error(state, e.status, e.message, param=e.param, code=e.code)

    cancel = threading.Event()
    turn = _Turn(state, t0, req.audio_format is not None)
    try:
        events = _open_stream(state, omni, req, cancel)
    except Exception as e:  # noqa: BLE001 - EngineBusy, or an engine that is shutting down
        if _is_busy(e):
            return _error(state, 503, str(e), type_="server_busy", code="server_busy")
        log.exception("chat completion could not start")
        return _error(state, 503, f"the model worker is not available: {e}", type_="server_error")
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        turn.finish(cancelled=cancel.is_set())
        return _error(state, 500, "the turn ended without output", type_="server_error")
    except (ValueError, RequestError) as e:   # the pipeline's bad-input errors (media, context length, speaker)
        turn.finish()
        return _error(state, 400, str(e))
    except Exception as e:  # noqa: BLE001
        if _is_busy(e):
            return _error(state, 503, str(e), type_="server_busy", code="server_busy")
        log.exception("chat completion failed")
        turn.finish(error="server_error")
        return _error(state, 500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
    except asyncio.CancelledError:
        cancel.set()
        turn.finish(cancelled=True)
        raise

    meta = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": _model_id(state, omni)}
    audio_id = "audio_" + uuid.uuid4().hex[:24]
    expires_at = int(time.time()) + AUDIO_TTL_S
    if req.stream:
        return StreamingResponse(_sse(req, events, first, turn, cancel, meta, audio_id, expires_at),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(request, state, req, events, first, turn, cancel, meta, audio_id, expires_at)


async def _whole(request, state, req, events, first, turn, cancel, meta, audio_id, expires_at):
    from starlette.responses import JSONResponse, Response

    async def watch_disconnect():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    watcher = asyncio.ensure_future(watch_disconnect())
    text, pcm = [], []
    try:
        event = first
        while True:
            turn.saw(event)
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, AudioChunk):
                pcm.append(event.pcm16())
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
    except Exception as e:  # noqa: BLE001
        log.exception("chat completion failed")
        turn.finish(error="server_error")
        return _error(state, 500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
    except asyncio.CancelledError:
        cancel.set()
        turn.finish(cancelled=True)
        raise
    finally:
        watcher.cancel()
    done = turn.done
    if done is None:  # cancelled: the client is gone
        turn.finish(cancelled=True)
        return Response(status_code=499)
    turn.finish()
    content = "".join(text)
    message = {"role": "assistant", "content": content, "refusal": None}
    if req.audio_format is not None:
        audio = b"".join(pcm)
        data = wav_bytes(audio) if req.audio_format == "wav" else audio
        message["content"] = None
        message["audio"] = {"id": audio_id, "data": base64.b64encode(data).decode("ascii"),
                            "expires_at": expires_at, "transcript": content}
        TRANSCRIPTS.put(audio_id, content, expires_at)
    return JSONResponse({**meta, "object": "chat.completion", "system_fingerprint": None,
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": done.finish_reason}],
                         "usage": _usage(done, req.audio_format is not None)})


def _chunk(meta: dict, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None,
           with_usage_field: bool = False) -> str:
    obj = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]}
    if with_usage_field:
        obj["usage"] = usage
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


async def _sse(req: ChatRequest, events, first, turn: _Turn, cancel: threading.Event, meta: dict, audio_id: str,
               expires_at: int):
    audio = req.audio_format is not None
    u = req.include_usage
    transcript = []
    finished = False
    try:
        if audio:
            yield _chunk(meta, {"role": "assistant", "content": None, "audio": {"id": audio_id, "transcript": ""}},
                         with_usage_field=u)
        else:
            yield _chunk(meta, {"role": "assistant", "content": ""}, with_usage_field=u)
        event = first
        while True:
            turn.saw(event)
            if isinstance(event, TextDelta):
                if audio:
                    transcript.append(event.text)
                    yield _chunk(meta, {"audio": {"id": audio_id, "transcript": event.text}}, with_usage_field=u)
                else:
                    yield _chunk(meta, {"content": event.text}, with_usage_field=u)
            elif isinstance(event, AudioChunk):
                data = base64.b64encode(event.pcm16()).decode("ascii")
                yield _chunk(meta, {"audio": {"id": audio_id, "data": data}}, with_usage_field=u)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
        done = turn.done
        if done is None:  # the turn was cancelled under us (engine closing)
            turn.finish(cancelled=True)
            return
        if audio:  # the last audio update carries the expiry (as OpenAI's)
            TRANSCRIPTS.put(audio_id, "".join(transcript), expires_at)
            yield _chunk(meta, {"audio": {"id": audio_id, "expires_at": expires_at}}, with_usage_field=u)
        yield _chunk(meta, {}, done.finish_reason, with_usage_field=u)
        if u:
            yield _chunk(meta, None, usage=_usage(done, audio), with_usage_field=True)
        yield "data: [DONE]\n\n"
        finished = True
        turn.finish()
    except Exception as e:  # noqa: BLE001 - mid-stream failure: an error object, then the end (as OpenAI does)
        log.exception("chat completion stream failed")
        turn.finish(error="server_error")
        yield "data: " + json.dumps(_error_body(f"generation failed: {type(e).__name__}: {e}", "server_error")) \
              + "\n\n"
        finished = True
    finally:
        if not finished:  # the client went away (task cancelled or generator closed)
            cancel.set()
            turn.finish(cancelled=True)
            await _close(events)
