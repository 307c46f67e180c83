"""In-process `omnivox serve` for the server tests: create_app + uvicorn in a daemon thread on a free loopback port,
started (waiting until it listens) and stopped as a context manager, so tests can look at the app's engine and
sessions; plus the module fixture that loads the tiny "base" checkpoint with audio."""

import socket
import threading
import time

import pytest
import uvicorn

from omnivox.model import load
from omnivox.server import ServerOptions, create_app, uvicorn_config


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
