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
- **Request parsing** (validation, message conversion, media decoding, the speech system prompt, assistant audio
  ids resolved to their transcripts, sampling options) is `chat_request.py`. A spoken reply's transcript is kept
  there (`TRANSCRIPTS`) until its audio's `expires_at`, so a client can send the reply back by audio id.

Metrics (app.state.metrics): first_audio_seconds from the request's arrival, realtime_factor = the turn's
compute seconds on the model worker / audio seconds (as the realtime sessions), responses_total by status (completed = stop, incomplete = length, cancelled, failed),
errors_total by error type.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import threading
import time
import uuid
from pathlib import Path

from omnivox.server.chat_request import DEFAULT_MAX_TOKENS, TRANSCRIPTS, ChatRequest, RequestError, parse_body
from omnivox.server.security import check_api_key, origin_allowed
from omnivox.streaming.pipeline import SAMPLE_RATE, AudioChunk, Done, TextDelta, generate

log = logging.getLogger("omnivox.chat")

MAX_REQUEST_BYTES = 32 * 1024 * 1024
AUDIO_TTL_S = 3600                      # how long a reply's audio id resolves to its transcript


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
        self.events = None                 # the engine stream (its busy_s is the turn's compute time)

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
            # compute seconds per second of audio, as the realtime sessions report it (metrics.py); the thread
            # fallback without an engine has no busy time and reports the pipeline's own wall time
            busy = getattr(self.events, "busy_s", None)
            seconds = busy if busy is not None else d.timings["total_ms"] / 1000.0
            self.metrics.realtime_factor.observe(seconds / d.audio_seconds)


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
        req = await run_in_threadpool(parse_body, raw, omni,
                                      getattr(options, "max_tokens", None) or DEFAULT_MAX_TOKENS)
    except RequestError as e:
        return _error(state, e.status, e.message, param=e.param, code=e.code)

    cancel = threading.Event()
    turn = _Turn(state, t0, req.audio_format is not None)
    try:
        events = _open_stream(state, omni, req, cancel)
        turn.events = events
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
