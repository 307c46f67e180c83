"""The realtime server against the official `openai` SDK (unmodified) on a tiny random checkpoint: text turn,
server-VAD audio turn, barge-in, PCM16 audio deltas; protocol robustness (each bad event -> an `error` event, the
session goes on); concurrent sessions and server_busy; a disconnect frees everything.

The server runs in-process (uvicorn in a thread on a free port) so tests can look at its engine and sessions."""

import asyncio
import base64
import time

import numpy as np
import pytest

from server_support import Server, b64pcm, omni, run  # noqa: F401 (omni: module fixture)
from speechlike import silence, speechlike


@pytest.fixture(scope="module")
def server(omni):
    with Server(omni) as s:
        yield s


async def until(conn, *types, timeout=60, log=None):
    """Read events until one of `types`; returns it (events seen go to `log`)."""
    async def loop():
        async for ev in conn:
            if log is not None:
                log.append(ev)
            if ev.type in types:
                return ev
        raise AssertionError(f"connection closed before {types}")
    return await asyncio.wait_for(loop(), timeout)


async def text_turn(conn, text="Hello there", log=None):
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create()
    log = [] if log is None else log
    done = await until(conn, "response.done", log=log)
    return done, log


# ------------------------------------------------------------------------------------------------ SDK sessions
def test_sdk_text_turn(server):
    async def main():
        async with server.client().realtime.connect(model="omnivox-tiny") as conn:
            created = await until(conn, "session.created")
            assert created.session.model and created.session.audio.output.voice == "Chelsie"
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "instructions": "Be brief."})
            updated = await until(conn, "session.updated")
            assert updated.session.output_modalities == ["text"]
            done, log = await text_turn(conn)
            types = [e.type for e in log]
            assert done.response.status in ("completed", "incomplete")
            assert done.response.usage.output_tokens >= 1
            deltas = "".join(e.delta for e in log if e.type == "response.output_text.delta")
            text_done = next(e for e in log if e.type == "response.output_text.done")
            assert text_done.text == deltas and deltas
            expected = ["conversation.item.added", "conversation.item.done", "response.created",
                        "response.output_item.added", "conversation.item.added", "response.content_part.added",
                        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "conversation.item.done", "response.done"]
            order = [t for t in types if t in expected]
            dedup = [t for k, t in enumerate(order) if k == 0 or t != order[k - 1]]
            assert dedup == expected, dedup
            assert "response.output_audio.delta" not in types
    run(main())


def test_sdk_audio_turn_with_server_vad_and_pcm16_deltas(server):
    speech = np.concatenate([silence(0.5), speechlike(1.5, seed=1), silence(1.2)])

    async def main():
        async with server.client().realtime.connect(model="omnivox-tiny") as conn:
            await until(conn, "session.created")
            log = []
            for k in range(0, len(speech), 2400):  # 100 ms appends, as a microphone would send
                await conn.input_audio_buffer.append(audio=b64pcm(speech[k:k + 2400]))
            started = await until(conn, "input_audio_buffer.speech_started", log=log)
            stopped = await until(conn, "input_audio_buffer.speech_stopped", log=log)
            # speech from 0.5 s to 2.0 s; the item starts prefix_padding_ms (300) before the detected start
            assert 120 <= started.audio_start_ms <= 350, started
            assert 1900 <= stopped.audio_end_ms <= 2200, stopped
            committed = await until(conn, "input_audio_buffer.committed", log=log)
            assert committed.item_id == started.item_id
            done = await until(conn, "response.done", log=log)
            assert done.response.status in ("completed", "incomplete")
            deltas = [e for e in log if e.type == "response.output_audio.delta"]
            assert deltas, [e.type for e in log]
            pcm = b"".join(base64.b64decode(e.delta) for e in deltas)
            assert len(pcm) % 2 == 0 and len(pcm) > 0
            samples = np.frombuffer(pcm, "<i2")
            # 480 samples (20 ms at 24 kHz) per codec token (a few of which are control ids, EOS among them):
            # the deltas carry the whole spoken answer
            codes = done.response.usage.output_token_details.audio_tokens
            assert 480 * (codes - 4) <= len(samples) <= 480 * codes, (len(samples), codes)
            transcript = next(e for e in log if e.type == "response.output_audio_transcript.done")
            assert transcript.transcript == "".join(e.delta for e in log
                                                   if e.type == "response.output_audio_transcript.delta")
    run(main())


def test_sdk_barge_in_cancels_the_response_and_stops_audio(omni):
    # long answer (paced at real time) so the interruption lands mid-response
    with Server(omni, limits=dict(max_output_tokens=64, max_codec_tokens=400)) as server:
        async def main():
            async with server.client().realtime.connect(model="omnivox-tiny") as conn:
                await until(conn, "session.created")
                await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": "Talk."}]})
                await conn.response.create()
                log = []
                await until(conn, "response.output_audio.delta", log=log)
                # the person starts speaking while the answer plays
                speech = np.concatenate([speechlike(1.0, seed=2), silence(0.2)])
                for k in range(0, len(speech), 2400):
                    await conn.input_audio_buffer.append(audio=b64pcm(speech[k:k + 2400]))
                started = await until(conn, "input_audio_buffer.speech_started", log=log)
                t_started = time.monotonic()
                done = await until(conn, "response.done", log=log)
                assert time.monotonic() - t_started < 2.0
                assert done.response.status == "cancelled"
                assert done.response.status_details.reason == "turn_detected"
                k = next(i for i, e in enumerate(log) if e.type == "input_audio_buffer.speech_started")
                after = [e for e in log[k:] if e.type == "response.output_audio.delta"]
                # paced audio: at most the lead (0.5 s) plus one delta was in flight when speech started
                assert sum(len(base64.b64decode(e.delta)) for e in after) / 2 / 24000 <= 0.7
                sent = sum(len(base64.b64decode(e.delta)) for e in log if e.type == "response.output_audio.delta")
                assert sent / 2 / 24000 < 400 / 50  # not the whole answer
                item_id = done.response.output[0].id
                heard_ms = int(sent / 2 / 24000 * 1000) // 2
                await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=heard_ms)
                truncated = await until(conn, "conversation.item.truncated", "error")
                assert truncated.type == "conversation.item.truncated", truncated
                assert truncated.audio_end_ms == heard_ms
                # the turn that interrupted goes on: the session still answers
                await conn.input_audio_buffer.append(audio=b64pcm(silence(1.0)))
                await until(conn, "input_audio_buffer.speech_stopped")
                assert started.item_id
                done2 = await until(conn, "response.done")
                assert done2.response.status in ("completed", "incomplete")
        run(main())


def test_speech_is_prefilled_while_the_person_speaks(server):
    """Streaming in: during a 4 s question, audio goes into the conversation window by window before the turn
    ends, so only the last fraction of a second is left when speech_stopped comes."""
    speech = np.concatenate([silence(0.3), speechlike(4.0, seed=5), silence(1.0)])
    state = server.app.state

    async def main():
        async with server.client().realtime.connect(model="omnivox-tiny") as conn:
            await until(conn, "session.created")
            session = next(iter(state.sessions.values()))
            conv = session.conv
            pushed = []
            real_push = conv.push_audio
            conv.push_audio = lambda x: (pushed.append((time.monotonic(), len(x))), real_push(x))[1]
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(conn, "session.updated")
            for k in range(0, len(speech), 2400):
                await conn.input_audio_buffer.append(audio=b64pcm(speech[k:k + 2400]))
                await asyncio.sleep(0.02)
            await until(conn, "input_audio_buffer.speech_stopped")
            t_stop = time.monotonic()
            await until(conn, "response.done")
            before = sum(n for t, n in pushed if t < t_stop) / 16000
            total = sum(n for _, n in pushed) / 16000
            assert 4.0 <= total <= 4.6, total
            assert before >= 3.0, (before, total)
    run(main())


def test_beta_sdk_client_gets_beta_event_names(server):
    async def main():
        async with server.client().beta.realtime.connect(model="omnivox-tiny") as conn:
            created = await until(conn, "session.created")
            assert created.session.voice == "Chelsie" and created.session.modalities == ["text", "audio"]
            await conn.session.update(session={"modalities": ["text"], "voice": "ethan", "turn_detection": None,
                                               "input_audio_format": "pcm16"})
            updated = await until(conn, "session.updated")
            assert updated.session.voice == "Ethan" and updated.session.turn_detection is None
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hi"}]})
            await conn.response.create()
            log = []
            done = await until(conn, "response.done", log=log)
            types = {e.type for e in log}
            assert "response.text.delta" in types and "response.text.done" in types
            assert "response.output_text.delta" not in types
            assert done.response.status in ("completed", "incomplete")
    run(main())


def test_multi_turn_session_keeps_the_kv_cache_across_turns(server):
    state = server.app.state

    async def main():
        async with server.client().realtime.connect(model="omnivox-tiny") as conn:
            await until(conn, "session.created")
            session = next(iter(state.sessions.values()))
            conv = session.conv
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(conn, "session.updated")
            done1, _ = await text_turn(conn, "First question")
            ids1 = conv.cached_ids()
            done2, _ = await text_turn(conn, "Second question")
            ids2 = conv.cached_ids()
            assert done1.response.status in ("completed", "incomplete")
            assert done2.response.status in ("completed", "incomplete")
            # the second turn extended the cache of the first (its prompt was not prefilled again from the top)
            assert len(ids2) > len(ids1) > 0
            assert ids2[:len(ids1) - 2] == ids1[:len(ids1) - 2]
            # the server's item list mirrors the conversation's: user, assistant, user, assistant
            assert conv.items() == list(session.items) and len(conv.items()) == 4
    run(main())


def test_content_part_events_validate_against_the_ga_schema(server):
    """response.content_part.added/.done carry part.type "audio" or "text" (the schema's only values) while the
    item itself says output_audio/output_text; strict clients validate both with the openai package's models."""
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter
    strict = TypeAdapter(RealtimeServerEvent)

    async def main():
        async with server.client().realtime.connect(model="omnivox-tiny") as conn:
            await until(conn, "session.created")
            done, log = await text_turn(conn)
            parts = [e for e in log if e.type.startswith("response.content_part.")]
            assert [e.type for e in parts] == ["response.content_part.added", "response.content_part.done"]
            for ev in parts:
                strict.validate_python(ev.model_dump(exclude_unset=True))
                assert ev.part.type == "audio"
            item = next(e for e in log if e.type == "response.output_item.done").item
            assert item.content[0].type == "output_audio"
            strict.validate_python(done.model_dump(exclude_unset=True))
    run(main())
