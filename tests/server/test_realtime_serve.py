"""`omnivox serve`: startup errors are one stderr line and exit 2; a real process serves the pages, health and
API routes, and the system prompt rule (speech prompt first, instructions after it) reaches the conversation."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cli_support import assert_clean_error, omnivox
from omnivox.model import load
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT
from server_support import Raw, Server, free_port, run, text_user


def test_serve_startup_errors_are_one_line_exit_2(tmp_path, tiny_checkpoint):
    assert_clean_error(omnivox("serve", "--model", str(tmp_path / "missing")), "does not exist")
    path, _ = tiny_checkpoint("base")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clean_error(omnivox("serve", "--model", str(path), "--port", str(port)), "cannot listen")
    assert_clean_error(omnivox("serve", "--model", str(path), "--port", "70000"), "port")


def test_serve_process_serves_pages_health_and_api(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "omnivox", "serve", "--model", str(path), "--port", str(port),
                             "--api-key", "k1", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                r = httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert httpx.get(base + "/call").status_code == 200
        assert httpx.get(base + "/static/realtime.js").status_code == 200
        assert httpx.get(base + "/static/nope.js").status_code == 404
        assert httpx.get(base + "/v1/voices").status_code == 401
        voices = httpx.get(base + "/v1/voices", headers={"Authorization": "Bearer k1"}).json()
        assert voices["default"] in voices["voices"]
        assert "omnivox_sessions 0" in httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    with Server(load(path, audio=True)) as s:
        yield s


def test_system_prompt_keeps_the_speech_prompt_when_speaking(server):
    state = server.app.state

    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            conv = next(iter(state.sessions.values())).conv
            await c.send({"type": "session.update", "session": {"instructions": "Answer in French."}})
            await c.until("session.updated")
            await c.send(text_user("Hi"))
            await c.send({"type": "response.create"})
            await c.until("response.done")
            assert conv.system == SPEECH_SYSTEM_PROMPT + "\n\nAnswer in French."
            # text only: the instructions are the whole system prompt
            await c.send({"type": "response.create", "response": {"output_modalities": ["text"],
                                                                  "instructions": "Be short."}})
            await c.until("response.done")
            assert conv.system == "Be short."
    run(main())
