"""POST /v1/chat/completions against a real uvicorn server on loopback with a tiny random checkpoint: text and
speech, streamed and not. Streamed speech arrives as PCM16 chunks interleaved with the transcript while the
Thinker is still writing, equals the non-streamed reply (same text, same audio bytes), the official `openai` SDK
parses it, media parts are accepted, bad input is a 400 naming the field, a busy engine is a 503 and a client that
disconnects cancels the turn."""

import base64
import io
import json
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from omnivox.model import load
from omnivox.server.app import ServerOptions
from omnivox.server.engine import EngineBusy
from omnivox.server.metrics import Metrics
from omnivox.server.openai_chat import chat_completions
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, GenerationOptions, TextDelta, generate
from omnivox.thinker.sampling import SamplingParams
from server_support import LiveServer, free_port, parse, value

STORY = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def omni(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    omni = load(path, audio=True)
    # the tiny random vocoder speaks at ~1e-6 full scale, which PCM16 rounds to silence: make it audible
    with torch.no_grad():
        omni.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(1e5)
    return omni


@pytest.fixture(scope="module")
def server(omni):
    with LiveServer(omni, ServerOptions(model_id="omni-tiny", port=free_port()), start_timeout=30) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=120) as c:
        yield c


def post(http, **body):
    return http.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list:
    """SSE body -> parsed `data:` payloads ("[DONE]" kept as a string); every event is one data line."""
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(http, **body) -> list:
    r = post(http, stream=True, **body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r.text)


def deltas(events):
    return [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]


def metric(http, name, **labels) -> float:
    families = parse(http.get("/metrics").text)
    family = next(f for f in families if name == f or name.startswith(f + "_"))
    return value(families, family, name, **labels)


# ------------------------------------------------------------------------------------------------ text


def test_text_reply_streamed_equals_non_streamed_and_pipeline(omni, http):
    body = dict(model="omni-tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0)
    r = post(http, **body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "chat.completion" and whole["model"] == "omni-tiny"
    choice = whole["choices"][0]
    assert choice["message"]["role"] == "assistant" and "audio" not in choice["message"]
    events = list(generate(omni, [{"role": "user", "content": "Hello"}],
                           GenerationOptions(max_new_tokens=12, sampling=SamplingParams(greedy=True))))
    done = events[-1]
    assert choice["message"]["content"] == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert choice["finish_reason"] == done.finish_reason
    assert whole["usage"]["prompt_tokens"] == done.prompt_tokens
    assert whole["usage"]["completion_tokens"] == len(done.token_ids)

    events = stream(http, stream_options={"include_usage": True}, **body)
    assert events[-1] == "[DONE]"
    ds = deltas(events)
    assert ds[0]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events[:-1])
    assert "".join(d.get("content") or "" for d in ds) == choice["message"]["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finals[-1] == choice["finish_reason"] and not any(finals[:-1])
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


# ------------------------------------------------------------------------------------------------ speech


AUDIO_BODY = dict(model="omni-tiny", messages=STORY, modalities=["text", "audio"], temperature=0, seed=7,
                  max_tokens=90, max_audio_tokens=110)


@pytest.fixture(scope="module")
def spoken(http):
    """The same greedy spoken reply, streamed (pcm16) and whole (wav)."""
    t0 = time.perf_counter()
    events = stream(http, audio={"voice": "Ethan", "format": "pcm16"}, stream_options={"include_usage": True},
                    **AUDIO_BODY)
    r = post(http, audio={"voice": "Ethan", "format": "wav"}, **AUDIO_BODY)
    assert r.status_code == 200, r.text
    print(f"two spoken replies in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return events, r.json()


def test_streamed_speech_is_pcm16_interleaved_with_the_transcript(spoken):
    events, _ = spoken
    ds = deltas(events)
    assert ds[0]["role"] == "assistant" and ds[0]["content"] is None
    audio_id = ds[0]["audio"]["id"]
    kinds = []
    pcm = b""
    for d in ds[1:]:
        a = d.get("audio")
        if a is None:
            continue
        assert a["id"] == audio_id
        assert "content" not in d or d["content"] is None
        if "data" in a:
            chunk = base64.b64decode(a["data"], validate=True)
            assert len(chunk) % 2 == 0 and len(chunk) > 0
            pcm += chunk
            kinds.append("A")
        elif "transcript" in a:
            kinds.append("T")
        else:
            kinds.append("E")
            assert a["expires_at"] > time.time()
    samples = np.frombuffer(pcm, dtype="<i2")
    assert samples.size > 24000                                     # > 1 s of speech
    last_text = len(kinds) - 1 - kinds[::-1].index("T")
    assert kinds[:last_text].count("A") >= 2, "speech must stream while the Thinker is still writing"
    assert kinds[-1] == "E" and kinds.count("E") == 1
    assert events[-2]["usage"]["completion_tokens_details"]["audio_tokens"] == 110
    assert samples.size % 480 == 0 and samples.size <= 110 * 480    # 20 ms per speech code, at most 110
    assert np.abs(samples.astype(np.float64)).mean() > 100          # decodes as PCM16 speech, not noise bytes


def test_streamed_speech_equals_the_whole_reply(spoken):
    events, whole = spoken
    msg = whole["choices"][0]["message"]
    assert msg["content"] is None and msg["role"] == "assistant"
    transcript = "".join(d["audio"].get("transcript", "") for d in deltas(events) if "audio" in d)
    assert transcript == msg["audio"]["transcript"] and len(transcript) > 0
    wav = base64.b64decode(msg["audio"]["data"])
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    x, sr = sf.read(io.BytesIO(wav), dtype="int16")
    assert sr == 24000 and x.ndim == 1
    streamed = b"".join(base64.b64decode(d["audio"]["data"]) for d in deltas(events)
                        if "audio" in d and "data" in d["audio"])
    assert x.tobytes() == streamed
    assert msg["audio"]["expires_at"] > time.time()
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens_details"] == {"text_tokens": 90, "audio_tokens": 110,
                                                           "reasoning_tokens": 0}


def test_speech_updates_metrics(spoken, http):
    assert metric(http, "omnivox_first_audio_seconds_count") >= 2
    assert metric(http, "omnivox_realtime_factor_count") >= 2
    assert metric(http, "omnivox_realtime_factor_sum") > 0
    assert metric(http, "omnivox_responses_total", status="incomplete") >= 2


def test_assistant_audio_id_resolves_to_its_transcript(spoken, http, omni):
    _, whole = spoken
    audio = whole["choices"][0]["message"]["audio"]
    follow = STORY + [{"role": "assistant", "audio": {"id": audio["id"]}}, {"role": "user", "content": "More."}]
    r = post(http, messages=follow, max_tokens=1, temperature=0)
    assert r.status_code == 200, r.text
    same = STORY + [{"role": "assistant", "content": audio["transcript"]}, {"role": "user", "content": "More."}]
    assert r.json()["usage"]["prompt_tokens"] == post(http, messages=same, max_tokens=1).json()["usage"][
        "prompt_tokens"]


def test_speech_keeps_the_official_system_prompt(spoken, http, omni):
    from omnivox.server.chat_request import convert_messages

    msgs = convert_messages([{"role": "system", "content": "Be brief."}] + STORY, audio_out=True)
    assert msgs[0] == {"role": "system", "content": SPEECH_SYSTEM_PROMPT + "\n\nBe brief."}
    assert convert_messages(STORY, audio_out=True)[0] == {"role": "system", "content": SPEECH_SYSTEM_PROMPT}
    assert convert_messages(STORY, audio_out=False) == STORY


# ------------------------------------------------------------------------------------------------ the openai SDK


def test_openai_sdk_parses_streamed_and_whole_speech(server):
    from openai import OpenAI

    client = OpenAI(api_key="unused", base_url=server.base + "/v1")
    chunks = list(client.chat.completions.create(
        model="omni-tiny", messages=[{"role": "user", "content": "Hi there"}], stream=True, temperature=0,
        modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}, max_tokens=40, seed=3,
        stream_options={"include_usage": True}, extra_body={"max_audio_tokens": 60}))
    assert chunks[0].choices[0].delta.role == "assistant"
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    pcm = b"".join(base64.b64decode(a.data) for a in audio if a.data)
    transcript = "".join(a.transcript or "" for a in audio)
    assert {a.id for a in audio} == {audio[0].id} and audio[-1].expires_at > time.time()
    assert 0 < len(pcm) <= 60 * 480 * 2 and len(pcm) % 960 == 0
    assert chunks[-1].usage.completion_tokens_details.audio_tokens == 60
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    whole = client.chat.completions.create(
        model="omni-tiny", messages=[{"role": "user", "content": "Hi there"}], temperature=0,
        modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}, max_tokens=40, seed=3,
        extra_body={"max_audio_tokens": 60})
    assert whole.choices[0].message.audio.transcript == transcript
    assert base64.b64decode(whole.choices[0].message.audio.data) == pcm

    text = list(client.chat.completions.create(model="omni-tiny", messages=[{"role": "user", "content": "Hi"}],
                                               stream=True, max_tokens=5))
    assert text[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in text)


def test_openai_sdk_sees_bad_requests_as_bad_request_errors(server):
    import openai

    client = openai.OpenAI(api_key="unused", base_url=server.base + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="omni-tiny", messages=[{"role": "user", "content": "Hi"}],
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"})
    assert "Chelsie, Ethan" in e.value.message and e.value.param == "audio.voice"


# ------------------------------------------------------------------------------------------------ media input


def _wav_b64(samples, sr, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _image_uri(fmt):
    buf = io.BytesIO()
    Image.fromarray((np.arange(56 * 56 * 3) % 251).astype(np.uint8).reshape(56, 56, 3)).save(buf, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "GIF": "gif"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def _tone(seconds, sr):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_input_audio_and_image_parts_are_accepted(http):
    text_only = post(http, messages=[{"role": "user", "content": "What is this?"}], max_tokens=1)
    base = text_only.json()["usage"]["prompt_tokens"]
    pcm16 = base64.b64encode((_tone(1.0, 24000) * 32767).astype("<i2").tobytes()).decode()
    cases = {
        "wav": {"type": "input_audio", "input_audio": {"data": _wav_b64(_tone(1.0, 16000), 16000), "format": "wav"}},
        "wav48k": {"type": "input_audio", "input_audio": {"data": _wav_b64(np.stack([_tone(1.0, 48000)] * 2, 1),
                                                                              48000), "format": "wav"}},
        "mp3": {"type": "input_audio", "input_audio": {"data": _wav_b64(_tone(1.0, 16000), 16000, "MP3"),
                                                       "format": "mp3"}},
        "pcm16": {"type": "input_audio", "input_audio": {"data": pcm16, "format": "pcm16"}},
        "png": {"type": "image_url", "image_url": {"url": _image_uri("PNG")}},
        "jpeg": {"type": "image_url", "image_url": {"url": _image_uri("JPEG"), "detail": "low"}},
    }
    grew = {}
    for name, part in cases.items():
        r = post(http, messages=[{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}],
                 max_tokens=1)
        assert r.status_code == 200, (name, r.text)
        grew[name] = r.json()["usage"]["prompt_tokens"] - base
    # 1 s of audio = 25 audio tokens (+ bos/eos), whatever its container and rate; a 56x56 image = 4 tokens (+2)
    assert grew["wav"] == grew["wav48k"] == grew["pcm16"] == 27, grew
    assert 26 <= grew["mp3"] <= 29, grew        # mp3 frames pad the length a little
    assert grew["png"] == grew["jpeg"] == 6, grew


# ------------------------------------------------------------------------------------------------ bad input


def _user(parts):
    return [{"role": "user", "content": parts}]


BAD = [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported role"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages", "at least one user message"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])},
     "messages[0].content[0].image_url.url", "remote URLs are not fetched"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}])},
     "messages[0].content[0].image_url.url", "not valid base64"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": _image_uri("GIF")}}])},
     "messages[0].content[0].image_url.url", "JPEG or PNG"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])},
     "messages[0].content[0].image_url.url", "cannot decode the image"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "flac"}}])},
     "messages[0].content[0].input_audio.format", "'wav', 'mp3' or 'pcm16'"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}])},
     "messages[0].content[0].input_audio.data", "not valid base64"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "aGVsbG8gd29ybGQh", "format": "wav"}}])},
     "messages[0].content[0].input_audio.data", "not a WAV file"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}])},
     "messages[0].content[0].input_audio.data", "cannot decode the audio"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "pcm16"}}])},
     "messages[0].content[0].input_audio.data", "whole number of 2-byte samples"),
    ({"messages": _user([{"type": "file", "file": {}}])}, "messages[0].content[0].type", "unsupported content"),
    ({"messages": STORY, "modalities": ["text", "audio"], "audio": {"voice": "alloy"}}, "audio.voice",
     "this model's voices: Chelsie, Ethan"),
    ({"messages": STORY, "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "mp3"}},
     "audio.format", "'pcm16' or 'wav'"),
    ({"messages": STORY, "modalities": ["video"]}, "modalities", "modalities must be"),
    ({"messages": STORY, "n": 2}, "n", "only n=1"),
    ({"messages": STORY, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": STORY, "stop": ["\n"]}, "stop", "stop sequences are not supported"),
    ({"messages": STORY, "temperature": 3}, "temperature", "temperature must be a number in [0.0, 2.0]"),
    ({"messages": STORY, "top_p": 0}, "top_p", "top_p must be"),
    ({"messages": STORY, "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"messages": STORY, "max_completion_tokens": "9"}, "max_completion_tokens", "integer"),
    ({"messages": STORY, "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"messages": STORY, "response_format": {"type": "json_object"}}, "response_format", "only response_format"),
    ({"messages": [{"role": "assistant", "audio": {"id": "audio_nope"}}, *STORY]}, "messages[0].audio.id",
     "unknown or expired assistant audio id"),
    # errors found by the pipeline before the first event are 400s too
    ({"messages": STORY, "max_tokens": 5000}, None, "exceeds the model's context"),
]


@pytest.mark.parametrize("body,param,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_a_400_naming_the_field(http, body, param, message):
    r = post(http, model="omni-tiny", **{"max_tokens": 1, **body})   # max_tokens: short if it were accepted
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert message in err["message"], err
    assert err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


def test_malformed_json_is_a_400(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=["a list"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    assert metric(http, "omnivox_errors_total", type="invalid_request_error") >= 2


# ------------------------------------------------------------------------------------------------ busy, cancel, auth


def _bare_app(omni, engine, options=None):
    app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
    app.state.omni, app.state.engine, app.state.metrics = omni, engine, Metrics()
    app.state.options = options or SimpleNamespace(api_key=None, allow_origins=(), host="127.0.0.1")
    return app


def test_busy_engine_is_a_503_with_an_openai_error(omni):
    class Full:
        def stream(self, make_gen, cancel):
            raise EngineBusy("the server is busy (4 active and 16 queued responses); try again shortly")

    app = _bare_app(omni, Full())
    r = TestClient(app).post("/v1/chat/completions", json={"messages": STORY})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "server_busy" and "busy" in r.json()["error"]["message"]
    assert app.state.metrics.errors_total.value("server_busy") == 1


def test_handler_runs_without_an_engine_and_checks_key_and_origin(omni):
    opts = SimpleNamespace(api_key="k3y", allow_origins=(), host="127.0.0.1")
    client = TestClient(_bare_app(omni, None, opts))
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/chat/completions", json=body,
                    headers={"Authorization": "Bearer k3y", "Origin": "https://evil.example"})
    assert r.status_code == 403
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3y"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True},
                                    headers={"Authorization": "Bearer k3y"}).text)
    assert "".join(d.get("content") or "" for d in deltas(events)) == r.json()["choices"][0]["message"]["content"]


def test_client_disconnect_cancels_the_turn(server, http):
    engine = server.app.state.engine
    before = metric(http, "omnivox_responses_total", status="cancelled")
    body = dict(AUDIO_BODY, stream=True, max_tokens=400, max_audio_tokens=4000)
    with httpx.Client(base_url=server.base, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
    t0 = time.perf_counter()
    while engine.stats()["active"] or metric(http, "omnivox_responses_total", status="cancelled") == before:
        assert time.perf_counter() - t0 < 5, ("the turn was not cancelled", engine.stats())
        time.sleep(0.05)
    print(f"turn freed {time.perf_counter() - t0:.2f} s after the disconnect", file=sys.stderr)


def test_client_disconnect_cancels_a_non_streamed_turn(server, http):
    engine = server.app.state.engine
    before = metric(http, "omnivox_responses_total", status="cancelled")
    body = dict(AUDIO_BODY, max_tokens=400, max_audio_tokens=4000)
    with httpx.Client(base_url=server.base, timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)    # gives up after 1.5 s and closes the connection
    t0 = time.perf_counter()
    while engine.stats()["active"] or metric(http, "omnivox_responses_total", status="cancelled") == before:
        assert time.perf_counter() - t0 < 5, ("the turn was not cancelled", engine.stats())
        time.sleep(0.05)


def test_streamed_wav_request_streams_raw_pcm16_chunks(http):
    # documented choice: a stream carries PCM16 chunks whatever audio.format says (no WAV header mid-stream)
    events = stream(http, messages=STORY, modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"},
                    temperature=0, seed=1, max_tokens=3, max_audio_tokens=40)
    chunks = [base64.b64decode(d["audio"]["data"]) for d in deltas(events) if "data" in d.get("audio", {})]
    assert chunks and chunks[0][:4] != b"RIFF" and all(len(c) % 2 == 0 for c in chunks)
