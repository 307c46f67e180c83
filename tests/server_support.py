"""Shared helpers of the server tests: in-process `omnivox serve` (create_app + uvicorn in a daemon thread on a free
loopback port, started (waiting until it listens) and stopped as a context manager, so tests can look at the app's
engine and sessions), the module fixture that loads the tiny "base" checkpoint with audio, the Realtime tests'
server and raw websocket client, and a strict parser of the Prometheus text that /metrics serves."""

import asyncio
import base64
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
import websockets
from openai import AsyncOpenAI

from omnivox.model import load
from omnivox.server.app import ServerOptions, create_app, uvicorn_config
from omnivox.server.realtime import SessionLimits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """create_app(omni, options) served by uvicorn in a thread on options.port; `with` starts and stops it."""

    def __init__(self, omni, options: ServerOptions, start_timeout: float = 10.0):
        self.options = options
        self.start_timeout = start_timeout
        self.app = create_app(omni, options)
        self.server = uvicorn.Server(uvicorn_config(self.app, options, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.options.port}"


@pytest.fixture(scope="module")
def omni(tiny_checkpoint):
    """The tiny "base" checkpoint loaded with the talker and vocoder (import this name into a test module)."""
    path, _ = tiny_checkpoint("base")
    return load(path, audio=True)


# ------------------------------------------------------------------------------------------------ Realtime
KEY = "test-key"
QUICK = dict(max_output_tokens=8, max_codec_tokens=30)


class Server(LiveServer):
    """The realtime tests' server: API key KEY, QUICK limits unless `limits` overrides some."""

    def __init__(self, omni, limits=None, api_key=KEY, **options):
        limits = SessionLimits(**{**QUICK, **(limits or {})})
        super().__init__(omni, ServerOptions(port=free_port(), api_key=api_key, limits=limits, **options))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.options.port}/v1"

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(api_key=KEY, websocket_base_url=self.url, base_url=f"{self.base}/v1")


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def b64pcm(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class Raw:
    """A bare websocket client speaking JSON events."""

    def __init__(self, server, headers=None, subprotocols=None, origin=None):
        self.url = f"{server.url}/realtime?model=omnivox-tiny"
        self.headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
        self.subprotocols = subprotocols
        self.origin = origin
        self.log = []
        self.times = []  # arrival time of each logged event

    async def __aenter__(self):
        kw = {}
        if self.subprotocols:
            kw["subprotocols"] = self.subprotocols
        if self.origin:
            kw["origin"] = self.origin
        self.ws = await websockets.connect(self.url, additional_headers=self.headers, max_size=None, **kw)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def send(self, event):
        await self.ws.send(event if isinstance(event, (str, bytes)) else json.dumps(event))

    async def until(self, *types, timeout=60):
        async def loop():
            while True:
                ev = json.loads(await self.ws.recv())
                self.log.append(ev)
                self.times.append(time.monotonic())
                if ev["type"] in types:
                    return ev
        return await asyncio.wait_for(loop(), timeout)

    async def text_turn(self, text="Hi", modalities=("text",)):
        await self.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        await self.send({"type": "response.create", "response": {"output_modalities": list(modalities)}})
        return await self.until("response.done")


def text_user(text):
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


# ------------------------------------------------------------------------------------------------ /metrics
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf)|NaN"
_SAMPLE = re.compile(rf"^({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? ({_VALUE})$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse(text: str) -> dict:
    """Strict parser for the subset we emit -> {family: {"type", "help", "samples": [(name, labels, value)]}}."""
    assert text.endswith("\n") and not text.endswith("\n\n"), "exposition ends with exactly one newline"
    families: dict = {}
    current = None
    for line in text[:-1].split("\n"):
        if m := _HELP.match(line):
            assert m.group(1) not in families, f"family {m.group(1)} declared twice"
            current = families[m.group(1)] = {"help": m.group(2), "type": None, "samples": []}
            continue
        if m := _TYPE.match(line):
            assert current is families.get(m.group(1)) and current["type"] is None and not current["samples"], line
            current["type"] = m.group(2)
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert current is not None and current["type"], f"sample before HELP/TYPE: {line!r}"
        family = next(f for f, d in families.items() if d is current)
        suffixes = ("_bucket", "_sum", "_count") if current["type"] == "histogram" else ("",)
        assert any(name == family + s for s in suffixes), f"{name} outside its family {family}"
        pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        v = float(value.replace("Inf", "inf"))
        current["samples"].append((name, pairs, v))
    for family, d in families.items():
        if d["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in d["samples"] if s[0].endswith("_bucket")]
            assert buckets and buckets[-1][0] == "+Inf", f"{family}: buckets must end with le=\"+Inf\""
            bounds = [float(le.replace("Inf", "inf")) for le, _ in buckets]
            assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family}: buckets must be cumulative"
            count = [s[2] for s in d["samples"] if s[0] == family + "_count"]
            assert count == [counts[-1]], f"{family}: _count must equal the +Inf bucket"
            assert len([s for s in d["samples"] if s[0] == family + "_sum"]) == 1
    return families


def value(families, family, name=None, **labels):
    got = [v for n, ls, v in families[family]["samples"] if n == (name or family) and ls == labels]
    assert len(got) == 1, (family, name, labels, families[family]["samples"])
    return got[0]
