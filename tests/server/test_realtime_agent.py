"""Voice-agent behaviour of a Realtime session on a tiny random checkpoint: input audio transcription by the loaded
model (GA and beta spellings, off by default, after the reply's first output), a conversation driven past a
small context window (old turns dropped, `truncation: disabled` a clear error), and cancel / barge-in that stop
within one step of a deliberately slowed model with no audio after `response.done`."""

import asyncio
import base64
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import omnivox.talker.model as talker_module
from omnivox.streaming import conversation as conversation_module
from omnivox.streaming.decoding import checkpoint_sampling
from omnivox.streaming.pipeline import GenerationOptions, generate
from server_support import Raw, Server, b64pcm, omni, run, text_user  # noqa: F401 (omni: module fixture)
from speechlike import silence, speechlike


@pytest.fixture(scope="module")
def server(omni):
    with Server(omni) as s:
        yield s


def asr_oracle(omni, samples_16k, max_new_tokens):
    """What the loaded model answers to the ASR prompt on the same audio, one-shot (the public pipeline)."""
    messages = [{"role": "system", "content": conversation_module.ASR_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "audio", "audio": samples_16k},
                                             {"type": "text", "text": conversation_module.ASR_INSTRUCTION}]}]
    sampling = replace(checkpoint_sampling(omni.config.generation), greedy=True)
    done = list(generate(omni, messages, GenerationOptions(max_new_tokens=max_new_tokens, sampling=sampling)))[-1]
    return done.text.lstrip()


async def speak(c, seconds=1.5, seed=1):
    speech = np.concatenate([silence(0.4), speechlike(seconds, seed=seed), silence(1.0)])
    for k in range(0, len(speech), 2400):
        await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(speech[k:k + 2400])})


# ------------------------------------------------------------------------------------------------ transcription
def test_server_vad_turn_is_transcribed_by_the_loaded_model_after_the_reply_starts(server, omni):
    state = server.app.state

    async def main():
        async with Raw(server) as c:
            await c.until("session.created")
            session = next(s for s in state.sessions.values() if s.id == c.log[0]["session"]["id"])
            await c.send({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["text"],
                "audio": {"input": {"transcription": {"model": "whisper-1"}}}}})
            upd = await c.until("session.updated")
            assert upd["session"]["audio"]["input"]["transcription"] == {"model": "whisper-1"}
            await speak(c)
            committed = await c.until("input_audio_buffer.committed")
            item_id = committed["item_id"]
            completed = await c.until("conversation.item.input_audio_transcription.completed", timeout=60)
            if not any(e["type"] == "response.done" for e in c.log):   # the reply usually ends first
                await c.until("response.done")
            types = [e["type"] for e in c.log]
            # the reply's first output came before any transcription work was sent
            assert types.index("response.output_text.delta") < \
                types.index("conversation.item.input_audio_transcription.delta")
            deltas = [e for e in c.log if e["type"] == "conversation.item.input_audio_transcription.delta"]
            assert all(e["item_id"] == item_id and e["content_index"] == 0 for e in deltas)
            transcript = completed["transcript"]
            assert completed["item_id"] == item_id and transcript == "".join(e["delta"] for e in deltas)
            usage = completed["usage"]
            assert usage["type"] == "tokens" and usage["output_tokens"] >= 1
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            assert usage["input_token_details"]["audio_tokens"] >= 30      # 1.5 s+ of audio at 25 per second
            # the words are the loaded model's answer to the ASR prompt on the committed audio
            audio = next(m for m in session.conv.messages() if m["role"] == "user")["content"][0]["audio"]
            seconds = len(audio) / 16000
            cap = min(8, 16 + int(8 * seconds))                   # QUICK: max_output_tokens 8
            assert transcript == asr_oracle(omni, audio, cap) and transcript
            # the conversation item now carries them
            await c.send({"type": "conversation.item.retrieve", "item_id": item_id})
            got = await c.until("conversation.item.retrieved")
            assert got["item"]["content"] == [{"type": "input_audio", "transcript": transcript}]
    run(main())


def test_transcription_is_off_by_default(server):
    async def main():
        async with Raw(server) as c:
            created = await c.until("session.created")
            assert created["session"]["audio"]["input"]["transcription"] is None
            await c.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
            await c.until("session.updated")
            await speak(c)
            committed = await c.until("input_audio_buffer.committed")
            await c.until("response.done")
            await asyncio.sleep(0.5)
            await c.send({"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
            got = await c.until("conversation.item.retrieved")
            assert got["item"]["content"] == [{"type": "input_audio", "transcript": None}]
            assert not any("input_audio_transcription" in e["type"] for e in c.log)
    run(main())


def test_beta_client_with_manual_commit_gets_its_transcript(server):
    async def main():
        async with server.client().beta.realtime.connect(model="omnivox-tiny") as conn:
            async def until(*types):
                async for ev in conn:
                    if ev.type in types:
                        return ev
            await until("session.created")
            await conn.session.update(session={"modalities": ["text"], "turn_detection": None,
                                               "input_audio_transcription": {"model": "whisper-1",
                                                                             "language": "en"}})
            upd = await until("session.updated")
            assert upd.session.input_audio_transcription.model == "whisper-1"
            await conn.input_audio_buffer.append(audio=b64pcm(speechlike(1.0, seed=3)))
            await conn.input_audio_buffer.commit()
            committed = await until("input_audio_buffer.committed")
            done = await asyncio.wait_for(until("conversation.item.input_audio_transcription.completed"), 60)
            assert done.item_id == committed.item_id and done.content_index == 0
            assert isinstance(done.transcript, str) and done.usage.output_tokens >= 1
    run(main())


# ------------------------------------------------------------------------------------------------ context limits
WINDOW = 192


def long_question(k):
    return f"Question {k}: the quick brown fox jumps over the lazy dog, and then what?"


def test_a_session_driven_past_its_context_window_drops_the_oldest_turns(omni):
    with Server(omni, limits=dict(max_context_tokens=WINDOW)) as server:
        state = server.app.state

        async def main():
            async with Raw(server) as c:
                created = await c.until("session.created")
                assert created["session"]["truncation"] == "auto"
                session = next(iter(state.sessions.values()))
                await c.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                                                    "instructions": "Be brief."}})
                await c.until("session.updated")
                users = []
                for k in range(10):
                    await c.send(text_user(long_question(k)))
                    users.append((await c.until("conversation.item.added"))["item"]["id"])
                    await c.send({"type": "response.create"})
                    done = await c.until("response.done")
                    assert done["response"]["status"] in ("completed", "incomplete"), done["response"]
                    assert session.conv.tokens <= WINDOW
                deleted = [e["item_id"] for e in c.log if e["type"] == "conversation.item.deleted"]
                assert len(deleted) >= 4 and deleted[0] == users[0]     # oldest first
                assert session.conv.rebuilds >= 2
                # the session's items, the conversation's items and the model's system prompt agree
                assert list(session.items) == session.conv.items() and users[-1] in session.items
                assert set(deleted).isdisjoint(session.items)
                assert session.conv.messages()[0] == {"role": "system", "content": "Be brief."}
                # truncation disabled: a clear error instead
                await c.send({"type": "session.update", "session": {"type": "realtime", "truncation": "disabled"}})
                assert (await c.until("session.updated"))["session"]["truncation"] == "disabled"
                failure = None
                for k in range(10, 20):
                    await c.send(text_user(long_question(k)))
                    ev = await c.until("conversation.item.added", "error")
                    if ev["type"] == "error":
                        failure = ev["error"]
                        break
                    await c.send({"type": "response.create"})
                    done = await c.until("response.done")
                    if done["response"]["status"] == "failed":
                        failure = done["response"]["status_details"]["error"]
                        break
                assert failure is not None and failure["code"] == "context_length_exceeded", failure
                assert "truncation is disabled" in failure["message"]
                assert not [e for e in c.log[len(deleted):] if e["type"] == "conversation.item.deleted"
                            and e["item_id"] not in deleted and e["item_id"] in users]
                # a bad value is refused
                await c.send({"type": "session.update", "session": {"truncation": {"type": "retention_ratio",
                                                                                   "retention_ratio": 1.5}}})
                assert (await c.until("error"))["error"]["param"] == "session.truncation.retention_ratio"
        run(main())


# ------------------------------------------------------------------------------------------------ cancel
STEP_S = 0.08      # each Thinker token and each Talker code takes this long in the slowed model


@pytest.fixture
def slow_model(monkeypatch):
    """Every Thinker decode step and Talker step sleeps STEP_S; returns the start times of each."""
    starts = {"thinker": [], "talker": []}
    real_decode, real_talker = conversation_module.decode_step, talker_module.talker_step

    def decode(*args, **kwargs):
        starts["thinker"].append(time.monotonic())
        time.sleep(STEP_S)
        return real_decode(*args, **kwargs)

    def talker(*args, **kwargs):
        starts["talker"].append(time.monotonic())
        time.sleep(STEP_S)
        return real_talker(*args, **kwargs)

    monkeypatch.setattr(conversation_module, "decode_step", decode)
    monkeypatch.setattr(talker_module, "talker_step", talker)
    return starts


def audio_after(log, response_id, index):
    return [e for e in log[index + 1:] if e["type"] == "response.output_audio.delta"
            and e["response_id"] == response_id]


def test_response_cancel_stops_within_one_step_and_no_audio_follows_done(omni, slow_model):
    with Server(omni, limits=dict(max_output_tokens=200, max_codec_tokens=2000, audio_lead_s=None)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                await c.send(text_user("Talk for a long time."))
                await c.send({"type": "response.create"})
                created = await c.until("response.created")
                rid = created["response"]["id"]
                await c.until("response.output_audio.delta")
                t_cancel = time.monotonic()
                await c.send({"type": "response.cancel"})
                done = await c.until("response.done")
                t_done = time.monotonic()
                assert done["response"]["status"] == "cancelled"
                # stopped within the step in flight (each step is STEP_S): not the rest of a Talker group
                for part, starts in slow_model.items():
                    late = [t for t in starts if t > t_cancel]
                    assert len(late) <= 1, (part, [round(t - t_cancel, 3) for t in late])
                assert t_done - t_cancel < 3 * STEP_S + 0.3
                k = len(c.log) - 1
                await asyncio.sleep(4 * STEP_S)
                await c.send({"type": "conversation.item.retrieve", "item_id": done["response"]["output"][0]["id"]})
                await c.until("conversation.item.retrieved", "error")
                assert not audio_after(c.log, rid, k)
                assert not [t for t in slow_model["thinker"] + slow_model["talker"] if t > t_done]
        run(main())


def test_barge_in_stops_within_one_step_and_no_audio_follows_done(omni, slow_model):
    with Server(omni, limits=dict(max_output_tokens=200, max_codec_tokens=2000, audio_lead_s=None)) as server:
        async def main():
            async with Raw(server) as c:
                await c.until("session.created")
                await c.send(text_user("Talk for a long time."))
                await c.send({"type": "response.create"})
                rid = (await c.until("response.created"))["response"]["id"]
                await c.until("response.output_audio.delta")
                speech = np.concatenate([speechlike(1.0, seed=2), silence(0.1)])
                for k in range(0, len(speech), 2400):
                    await c.send({"type": "input_audio_buffer.append", "audio": b64pcm(speech[k:k + 2400])})
                await c.until("input_audio_buffer.speech_started")
                t_started = time.monotonic()
                done = await c.until("response.done")
                assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
                assert done["response"]["status_details"]["reason"] == "turn_detected"
                t_done = time.monotonic()
                # the server set the cancel before it sent speech_started: at most the step in flight ran on
                for part, starts in slow_model.items():
                    late = [t for t in starts if t_started < t < t_done]
                    assert len(late) <= 1, (part, [round(t - t_started, 3) for t in late])
                assert t_done - t_started < 3 * STEP_S + 0.3
                k = len(c.log) - 1
                await asyncio.sleep(0.5)
                await c.send({"type": "input_audio_buffer.clear"})
                await c.until("input_audio_buffer.cleared")
                assert not audio_after(c.log, rid, k)
        run(main())
