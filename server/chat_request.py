"""Chat Completions request bodies -> the pipeline's messages and options, validated field by field.

What is notable:
- **Every bad field is named.** Validation raises `RequestError` with `param` set to the offending field (as
  OpenAI's errors do), before any model work; the HTTP handler (`openai_chat.py`) answers it with a 400 (413 for
  an oversized body). Unsupported features (tools, n > 1, stop, logprobs, penalties, json formats) are rejected
  by name rather than silently ignored.
- **System prompt with speech.** Qwen2.5-Omni speaks only with its official system prompt (REFERENCE.md). When
  audio output is on, the system message is `SPEECH_SYSTEM_PROMPT`, and the request's own system/developer
  text, if any, follows it after a blank line (so instructions still apply and speech still works). Text-only
  requests use their system messages as given (several are joined into one at the top; none: the chat template's
  default "You are a helpful assistant.").
- **Multi-turn audio.** OpenAI clients send a previous spoken reply back as `{"role": "assistant", "audio":
  {"id": ...}}`. `TRANSCRIPTS` keeps the transcripts (not the audio) of recent replies until `expires_at` (the
  handler puts them) and such ids resolve to the reply text, which is what the Thinker needs.

Input: message content is a string or parts: `text`, `input_audio` {data: base64, format: "wav" | "mp3" |
"pcm16" (raw little-endian 24 kHz mono, as the Realtime API)}, decoded and resampled to the encoder's 16 kHz;
`image_url` {url: "data:image/png|jpeg;base64,..."} (http(s) URLs are not fetched). Sampling: `temperature` 0 =
greedy in the Thinker and the Talker (the reference's do_sample=False: repetition penalties kept); `temperature`/`top_p` start from the checkpoint's generation_config; none given = its defaults; `seed`
seeds the Thinker and the Talker; `max_audio_tokens` (non-standard, extra_body) caps the speech in codec
tokens (50 per second; default: see MAX_AUDIO_TOKENS).
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import json
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from omnivox.streaming.decoding import talker_sampling, thinker_sampling
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, GenerationOptions, SamplingParams

DEFAULT_MAX_TOKENS = 1024
INPUT_PCM16_RATE = 24000
ENCODER_RATE = 16000
# Speech length limit (codec tokens, 50 per second). Non-standard body field `max_audio_tokens` sets it (the SDK's
# extra_body); by default it follows max_tokens: 25 codes (0.5 s of speech) per text token + 5 s, at most 4096
# (82 s). Natural speech needs about 12-20 codes per token, so only a Talker that fails to stop is cut.
MAX_AUDIO_TOKENS = 4096
AUDIO_TOKENS_PER_TEXT_TOKEN = 25
AUDIO_TOKENS_SLACK = 250
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
    from omnivox.streaming.media import load_audio, pcm16_to_float

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


def _sampling(body: dict, generation: dict) -> tuple[SamplingParams, SamplingParams]:
    """(Thinker, Talker) sampling; temperature 0 is greedy in both, as the reference's do_sample=False (the
    repetition penalties stay: streaming/decoding.py)."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", 0)
    greedy = temperature == 0
    thinker = thinker_sampling(generation, greedy=greedy, temperature=None if greedy else temperature,
                               top_p=None if greedy else top_p, seed=seed)
    return thinker, talker_sampling(greedy=greedy, seed=seed)


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
    thinker, talker = _sampling(body, omni.config.generation)
    options = GenerationOptions(max_new_tokens=max_tokens, sampling=thinker, talker_sampling=talker,
                                audio=audio_out, speaker=voice, max_codec_tokens=min(max_audio, MAX_AUDIO_TOKENS))
    messages = convert_messages(body.get("messages"), audio_out)
    return ChatRequest(messages, options, stream, include_usage, audio_format, voice)


def parse_body(raw: bytes, omni, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ChatRequest:
    """The raw request body (JSON bytes) -> a validated ChatRequest."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    return parse_request(body, omni, default_max_tokens)
