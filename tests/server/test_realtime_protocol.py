"""Realtime protocol robustness and limits, with a raw websocket client (so malformed frames can be sent): every
bad event gets one `error` event with a clear code and the session still answers a normal turn afterwards;
manual commit mode; item create/delete/retrieve with audio and image parts; auth and Origin; concurrent sessions
and server_busy; a disconnect frees the session and its engine work within a second; session length limit."""

import asyncio
import base64
import gc
import io
import json
import time
import weakref

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from server_support import KEY, Raw, Server, b64pcm, omni, run, text_user  # noqa: F401 (omni: module fixture)
from speechlike import silence, speechlike


@pytest.fixture(scope="module")
def server(omni):
    with Server(omni) as s:
        yield s


BAD_EVENTS = [
    ("not json {", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    (json.dumps({"type": "no.such.event"}), "invalid_event_type"),
    (json.dumps({"no_type": 1}), "missing_required_parameter"),
    (json.dumps({"type": 5}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": "fast"}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": {"instructions": 7}}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": "high"}}}}}), "invalid_type"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {
        "type": "audio/pcmu"}}}}}), "invalid_value"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_type"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%not base64%%%"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
     "invalid_audio"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                               "content": "hello"}}), "invalid_type"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(b"notapng").decode()}]}}),
     "invalid_image"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/cat.jpg"}]}}), "invalid_image"),
    (json.dumps({"type": "conversation.item.delete", "item_id": "item_missing"}), "item_not_found"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "item_missing", "audio_end_ms": 5}),
     "item_not_found"),
    (json.dumps({"type": "response.create", "response": {"instructions": 3}}), "invalid_type"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (b"\x00\x01binary", "invalid_event"),
]


def test_each_bad_event_gets_an_error_and_the_session_keeps_working(server):
    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            for k, (frame, code) in enumerate(BAD_EVENTS):
                await c.send(frame)
                err = await c.until("error", "session.updated", "conversation.item.added")
                assert err["type"] == "error", (k, frame, err)
                assert err["error"]["code"] == code, (k, frame, err)
                assert err["error"]["type"] and err["error"]["message"] and err["event_id"]
            # the client's event id is echoed in the error
            await c.send({"type": "no.such.event", "event_id": "evt_42"})
            err = await c.until("error")
            assert err["error"]["event_id"] == "evt_42"
            done = await c.text_turn()
            assert done["response"]["status"] in ("completed", "incomplete")
    run(main())


def test_oversized_event_is_refused_with_an_error(server):
    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (15 * 1024 * 1024 + 10)})
            await c.send(big)
            err = await c.until("error")
            assert err["error"]["code"] == "event_too_large"
            done = await c.text_turn()
            assert done["response"]["status"] in ("completed", "incomplete")
    run(main())


def test_second_response_create_while_active_and_cancel(omni):
    with Server(omni, limits=dict(max_output_tokens=64, max_codec_tokens=300)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                await c.send(text_user("Tell me"))
                await c.send({"type": "response.create"})
                created = await c.until("response.created")
                await c.send({"type": "response.create"})
                err = await c.until("error")
                assert err["error"]["code"] == "conversation_already_has_active_response"
                await c.until("response.output_audio.delta")
                await c.send({"type": "response.cancel"})
                done = await c.until("response.done")
                assert done["response"]["id"] == created["response"]["id"]
                assert done["response"]["status"] == "cancelled"
                assert done["response"]["status_details"]["reason"] == "client_cancelled"
                types = [e["type"] for e in c.log]
                tail = types[types.index("response.done") - 5:types.index("response.done") + 1]
                assert tail == ["response.output_audio.done", "response.output_audio_transcript.done",
                                "response.content_part.done", "response.output_item.done",
                                "conversation.item.done", "response.done"], tail
                done = await c.text_turn()
                assert done["response"]["status"] in ("completed", "incomplete")
        run(main())


def test_manual_commit_mode_and_item_kinds(server):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()

    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            await c.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                                                "audio": {"input": {"turn_detection": None}}}})
            upd = await c.until("session.updated")
            assert upd["session"]["audio"]["input"]["turn_detection"] is None
            # speech appended without VAD: nothing happens until the client commits
            x = np.concatenate([speechlike(1.0, seed=3), silence(0.8)])
            for k in range(0, len(x), 4800):
                await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(x[k:k + 4800])})
            await c.send({"type": "input_audio_buffer.commit"})
            committed = await c.until("input_audio_buffer.committed")
            added = await c.until("conversation.item.added")
            assert added["item"]["id"] == committed["item_id"]
            assert added["item"]["content"][0]["type"] == "input_audio"
            assert not any(e["type"] == "input_audio_buffer.speech_started" for e in c.log)
            # clear
            await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(silence(0.3))})
            await c.send({"type": "input_audio_buffer.clear"})
            await c.until("input_audio_buffer.cleared")
            await c.send({"type": "input_audio_buffer.commit"})
            assert (await c.until("error"))["error"]["code"] == "input_audio_buffer_commit_empty"
            # an image + text item, an audio item, an assistant item, a system item
            await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": data_uri}, {"type": "input_text", "text": "What is this?"}]}})
            img_item = (await c.until("conversation.item.added"))["item"]
            assert [p["type"] for p in img_item["content"]] == ["input_image", "input_text"]
            await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_audio", "audio": b64pcm(speechlike(0.5, seed=4))}]}})
            await c.until("conversation.item.done")
            await c.send({"type": "conversation.item.create", "item": {
                "id": "item_assist", "type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello."}]}})
            await c.until("conversation.item.done")
            await c.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be nice."}]}})
            await c.until("conversation.item.done")
            await c.send({"type": "conversation.item.retrieve", "item_id": "item_assist"})
            got = await c.until("conversation.item.retrieved")
            assert got["item"]["content"][0]["text"] == "Hello."
            await c.send({"type": "conversation.item.delete", "item_id": "item_assist"})
            assert (await c.until("conversation.item.deleted"))["item_id"] == "item_assist"
            await c.send({"type": "response.create"})
            done = await c.until("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
    run(main())


def test_api_key_origin_and_subprotocol(server):
    async def main():
        with pytest.raises(websockets.InvalidStatus) as e:
            async with Raw(server, headers={}) as c:
                pass
        assert e.value.response.status_code == 403
        with pytest.raises(websockets.InvalidStatus):
            async with Raw(server, headers={"Authorization": "Bearer wrong"}) as c:
                pass
        # browsers: key in the subprotocol list, "realtime" accepted, the key never echoed
        async with Raw(server, headers={}, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"],
                       origin=f"http://localhost:{server.options.port}") as c:
            assert c.ws.subprotocol == "realtime"
            await c.until("session.created")
        with pytest.raises(websockets.InvalidStatus):
            async with Raw(server, origin="https://evil.example") as c:
                pass

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.options.port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get("/v1/models")).status_code == 401
            auth = {"Authorization": f"Bearer {KEY}"}
            models = (await http.get("/v1/models", headers=auth)).json()
            assert models["object"] == "list" and models["data"][0]["id"] == server.options.model_id
            voices = (await http.get("/v1/voices", headers=auth)).json()
            assert voices == {"voices": ["Chelsie", "Ethan"], "default": "Chelsie"}
            metrics = (await http.get("/metrics")).text
            assert "omnivox_sessions" in metrics and "omnivox_queue_depth" in metrics
    run(main())


def test_two_sessions_complete_and_a_third_gets_server_busy(omni):
    with Server(omni, max_active=1, max_queued=1, limits=dict(max_output_tokens=16, max_codec_tokens=80)) as server:
        async def main():
            async with Raw(server) as a, Raw(server) as b, Raw(server) as c:
                for x in (a, b, c):
                    await x.until("session.created")
                for x in (a, b):
                    await x.send(text_user("Hello"))
                    await x.send({"type": "response.create"})
                    await x.until("response.created")
                await c.send(text_user("Me too"))
                await c.send({"type": "response.create"})
                err = await c.until("error", "response.created")
                assert err["type"] == "error" and err["error"]["code"] == "server_busy", err
                done_a, done_b = await asyncio.gather(a.until("response.done"), b.until("response.done"))
                assert done_a["response"]["status"] in ("completed", "incomplete")
                assert done_b["response"]["status"] in ("completed", "incomplete")
                assert any(e["type"] == "response.output_audio.delta" for e in a.log)
                assert any(e["type"] == "response.output_audio.delta" for e in b.log)
                # once they are done the third one is served
                await c.send({"type": "response.create"})
                assert (await c.until("response.done"))["response"]["status"] in ("completed", "incomplete")
        run(main())
    with Server(omni, max_sessions=1) as server:
        async def sessions():
            async with Raw(server) as a:
                await a.until("session.created")
                async with Raw(server) as b:
                    err = await b.until("error")
                    assert err["error"]["code"] == "server_busy"
        run(sessions())


def test_disconnect_mid_response_frees_the_session_within_a_second(omni):
    with Server(omni, limits=dict(max_output_tokens=64, max_codec_tokens=400)) as server:
        state = server.app.state

        async def main():
            c = Raw(server)
            await c.__aenter__()
            await c.until("session.created")
            await c.send(text_user("Talk"))
            await c.send({"type": "response.create"})
            await c.until("response.output_audio.delta")
            assert len(state.sessions) == 1 and state.engine.stats()["active"] == 1
            ref = weakref.ref(next(iter(state.sessions.values())))
            t0 = time.monotonic()
            await c.ws.close()
            freed = None
            while time.monotonic() - t0 < 10.0:
                if not state.sessions and ref() is not None:
                    gc.collect()  # only then: a full collection holds the GIL the server needs
                stats = state.engine.stats()
                if freed is None and not state.sessions and ref() is None and stats["active"] == stats["queued"] == 0:
                    freed = time.monotonic() - t0
                if freed is not None and stats["closing"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert not state.sessions and ref() is None
            assert state.engine.stats() == {"active": 0, "queued": 0, "closing": 0, "jobs": 0}
            return freed

        took = run(main())
        print(f"session and engine turn freed {took:.3f} s after the client closed")
        assert took < 1.0


def test_session_ends_at_its_maximum_length(omni):
    with Server(omni, limits=dict(max_session_s=1.0)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                err = await c.until("error", timeout=5)
                assert err["error"]["code"] == "session_expired"
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(c.ws.recv(), 5)
        run(main())


def test_input_audio_buffer_limit(omni):
    with Server(omni, limits=dict(max_input_audio_s=1.0)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                await c.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
                await c.until("session.updated")
                for _ in range(3):
                    await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(silence(0.4))})
                err = await c.until("error")
                assert err["error"]["code"] == "input_audio_buffer_full"
                await c.send({"type": "input_audio_buffer.commit"})
                committed = await c.until("input_audio_buffer.committed")
                assert committed["item_id"]
        run(main())


def test_camera_frames_during_a_spoken_turn(server):
    """The call page sends input_image items about once a second while the person speaks."""
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    frame = {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()}]}}

    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            await c.send({"type": "session.update", "session": {"output_modalities": ["text"]}})
            await c.until("session.updated")
            x = np.concatenate([silence(0.3), speechlike(2.5, seed=6), silence(1.0)])
            for k in range(0, len(x), 2400):
                await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(x[k:k + 2400])})
                if k % 24000 == 12000:
                    await c.send(frame)
            done = await c.until("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            assert not [e for e in c.log if e["type"] == "error"], [e for e in c.log if e["type"] == "error"]
            kinds = [e["item"]["content"][0]["type"] for e in c.log if e["type"] == "conversation.item.done"
                     and e["item"]["role"] == "user"]
            assert "input_image" in kinds and "input_audio" in kinds
    run(main())


def test_outgoing_audio_is_paced_near_real_time(omni):
    """The client never holds more than the lead (0.5 s) + one delta (0.1 s) of unplayed audio, assuming it plays
    audio as it arrives; token2wav hands over up to a second at once, so unpaced sending would exceed that."""
    with Server(omni, limits=dict(max_output_tokens=48, max_codec_tokens=150)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                await c.send(text_user("Talk"))
                await c.send({"type": "response.create"})
                await c.until("response.done")
                play_end, worst, total = 0.0, 0.0, 0.0
                for ev, t in zip(c.log, c.times):
                    if ev["type"] == "response.output_audio.delta":
                        dur = len(base64.b64decode(ev["delta"])) / 2 / 24000
                        play_end = max(play_end, t) + dur
                        worst = max(worst, play_end - t)
                        total += dur
                assert total >= 1.0, total
                assert worst <= 0.5 + 0.1 + 0.1, worst  # + 0.1 s of scheduling slack
        run(main())


def test_item_inserted_after_previous_item_id(server):
    state = server.app.state

    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            session = next(iter(state.sessions.values()))
            for name in ("a", "c"):
                await c.send({"type": "conversation.item.create", "item": {
                    "id": f"item_{name}", "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": name}]}})
                await c.until("conversation.item.done")
            await c.send({"type": "conversation.item.create", "previous_item_id": "item_a", "item": {
                "id": "item_b", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]}})
            added = await c.until("conversation.item.added")
            assert added["previous_item_id"] == "item_a"
            assert list(session.items) == ["item_a", "item_b", "item_c"]
            assert session.conv.items() == ["item_a", "item_b", "item_c"]
            await c.send({"type": "conversation.item.create", "previous_item_id": "item_zz", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}})
            assert (await c.until("error"))["error"]["code"] == "item_not_found"
            done = await c.text_turn()
            assert done["response"]["status"] in ("completed", "incomplete")
    run(main())


def test_a_client_that_stops_reading_stalls_its_turn_without_growing_memory(omni):
    """Back-pressure chain: socket send blocks -> bounded outgoing queue fills -> the response task blocks ->
    the engine stream's buffer fills -> the worker stops advancing that turn (no unbounded buffering anywhere)."""
    from types import SimpleNamespace

    from omnivox.server.engine import Engine
    from omnivox.server.metrics import Metrics
    from omnivox.server.realtime import RealtimeSession, SessionLimits

    class StuckSocket:
        async def send_text(self, text):
            await asyncio.Event().wait()   # the client never reads

        async def receive(self):
            await asyncio.Event().wait()

    async def main():
        engine = Engine(omni)
        engine.start()
        try:
            limits = SessionLimits(outgoing_queue=8, stream_buffer=4, audio_lead_s=None, max_output_tokens=400,
                                   max_codec_tokens=4000)
            session = RealtimeSession(StuckSocket(), SimpleNamespace(omni=omni, engine=engine, metrics=Metrics()),
                                      limits, "tiny")
            produced = []
            real_respond = session.conv.respond

            def counting_respond(options, item_id):
                for ev in real_respond(options, item_id):
                    produced.append(type(ev).__name__)
                    yield ev
            session.conv.respond = counting_respond
            runner = asyncio.create_task(session.run())
            await asyncio.sleep(0.1)
            await engine.call(session.conv.add, "user", [{"type": "text", "text": "Talk"}], "item_u")
            await session.start_response({"output_modalities": ["text"]})
            await asyncio.sleep(2.0)
            n1 = len(produced)
            await asyncio.sleep(1.5)
            n2 = len(produced)
            assert n1 == n2, (n1, n2)                         # stalled, not buffering
            assert n1 <= limits.outgoing_queue + limits.stream_buffer + 4, n1
            assert session.out.qsize() == limits.outgoing_queue
            assert engine.stats()["active"] == 1
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            for _ in range(100):
                if engine.stats()["active"] == engine.stats()["closing"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats()["active"] == 0 and engine.stats()["closing"] == 0
        finally:
            engine.close()
    run(main())
