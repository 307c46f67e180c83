"""Prompt-prefix reuse: rows an earlier request computed (the speech system prompt, the user header) are copied,
not prefilled again, for the Thinker and the Talker; replies, codes and audio equal a run without reuse; reuse stops
at the first media placeholder; a conversation's Talker reuses its earlier turns' prompt rows; the cache is a
bounded LRU."""

import numpy as np
import pytest
import soundfile as sf
import torch

from media_fixtures import tone
from omnivox.model import load
from omnivox.streaming import pipeline
from omnivox.streaming.conversation import Conversation
from omnivox.streaming.pipeline import (SPEECH_SYSTEM_PROMPT, AudioChunk, GenerationOptions, generate, media_ids,
                                        user_messages)
from omnivox.streaming.prefix import PrefixCache
from omnivox.talker import model as talker_model
from omnivox.thinker.model import KVCache
from omnivox.thinker.sampling import SamplingParams

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def omni(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    return load(path, audio=True)


@pytest.fixture
def rows(monkeypatch):
    """Rows each Thinker prefill and each Talker prefill computed, in call order."""
    seen = {"thinker": [], "talker": []}
    real_prefill, real_talker_prefill = pipeline.prefill, talker_model.talker_prefill

    def thinker_prefill(thinker, cache, embeds, positions, *a):
        seen["thinker"].append(embeds.shape[1])
        return real_prefill(thinker, cache, embeds, positions, *a)

    def talker_prefill(*a, prefix=None, **k):
        seen["talker"].append(a[2].shape[1] + 2 - (prefix.length if prefix is not None else 0))
        return real_talker_prefill(*a, prefix=prefix, **k)

    monkeypatch.setattr(pipeline, "prefill", thinker_prefill)
    monkeypatch.setattr(talker_model, "talker_prefill", talker_prefill)
    return seen


def speak(omni, question, reuse=True, audios=()):
    opts = GenerationOptions(max_new_tokens=12, sampling=GREEDY, audio=True, talker_sampling=GREEDY,
                             max_codec_tokens=40, reuse_prefix=reuse)
    events = list(generate(omni, user_messages(question, SPEECH_SYSTEM_PROMPT, audios=audios), opts))
    wave = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    return events[-1], wave


def common_prefix(omni, a, b):
    render = lambda q: omni.tokenizer.encode(omni.tokenizer.render_chat(  # noqa: E731
        user_messages(q, SPEECH_SYSTEM_PROMPT), add_generation_prompt=True))
    x, y = render(a), render(b)
    n = 0
    while x[n] == y[n]:
        n += 1
    return n, len(y)


def test_second_request_reuses_the_system_prompt_rows_and_answers_the_same(omni, rows):
    omni.prefix_cache.clear()
    speak(omni, "What colour is the sky?")
    shared, total = common_prefix(omni, "What colour is the sky?", "Name three rivers.")
    rows["thinker"].clear(), rows["talker"].clear()
    warm, warm_wave = speak(omni, "Name three rivers.")
    assert rows["thinker"] == [total - shared] and rows["talker"] == [total + 2 - shared], (rows, shared, total)
    cold, cold_wave = speak(omni, "Name three rivers.", reuse=False)
    assert rows["thinker"][-1] == total and rows["talker"][-1] == total + 2
    assert warm.token_ids == cold.token_ids and warm.codec_ids == cold.codec_ids and len(cold.codec_ids) > 12
    assert warm_wave.shape == cold_wave.shape and np.abs(warm_wave - cold_wave).max() <= 1e-5


def test_the_same_question_again_recomputes_only_the_last_row(omni, rows):
    omni.prefix_cache.clear()
    first, _ = speak(omni, "Count to five.")
    rows["thinker"].clear(), rows["talker"].clear()
    again, _ = speak(omni, "Count to five.")
    assert rows["thinker"] == [1] and rows["talker"] == [2]       # the Talker reuses every prompt row
    assert again.token_ids == first.token_ids and again.codec_ids == first.codec_ids


def test_reuse_stops_at_the_first_media_placeholder(omni, rows, tmp_path):
    omni.prefix_cache.clear()
    clip = str(tmp_path / "a.wav")
    sf.write(clip, tone(1.0, 16000), 16000)
    speak(omni, "What do you hear?", audios=[clip])                # stores only the rows before the audio
    entry = max(omni.prefix_cache._entries.values(), key=lambda e: e.ids.numel())
    with torch.inference_mode():
        ids = pipeline.build_prompt(omni, user_messages("What do you hear?", SPEECH_SYSTEM_PROMPT,
                                                        audios=[clip])).input_ids
    first_media = int(torch.isin(ids[0], torch.tensor(media_ids(omni))).nonzero()[0, 0])
    assert entry.ids.numel() == first_media
    rows["thinker"].clear()
    warm, _ = speak(omni, "What do you hear?", audios=[clip])
    assert rows["thinker"] == [ids.shape[1] - first_media]
    cold, _ = speak(omni, "What do you hear?", audios=[clip], reuse=False)
    assert warm.token_ids == cold.token_ids and warm.codec_ids == cold.codec_ids


def test_conversation_talker_reuses_earlier_turns(omni, rows):
    omni.prefix_cache.clear()
    opts = GenerationOptions(max_new_tokens=6, sampling=GREEDY, audio=True, talker_sampling=GREEDY,
                             max_codec_tokens=20)
    results = {}
    for reuse in (True, False):
        conv = Conversation(omni, system=SPEECH_SYSTEM_PROMPT)
        conv.add("user", [{"type": "text", "text": "Hello there."}], "u1")
        list(conv.respond(opts, "a1"))
        conv.add("user", [{"type": "text", "text": "And what next?"}], "u2")
        rows["talker"].clear()
        done = list(conv.respond(GenerationOptions(**{**opts.__dict__, "reuse_prefix": reuse}), "a2"))[-1]
        results[reuse] = (done, list(rows["talker"]))
    (warm, warm_rows), (cold, cold_rows) = results[True], results[False]
    assert warm.codec_ids == cold.codec_ids and warm.token_ids == cold.token_ids
    assert warm_rows[0] < cold_rows[0] // 2, (warm_rows, cold_rows)   # turn 1's prompt rows were not recomputed


def test_prefix_cache_bounds_and_matching():
    c = PrefixCache(max_entries=2, max_tokens=10, min_tokens=3)
    cache = KVCache(torch.randn(2, 1, 1, 32, 4), torch.randn(2, 1, 1, 32, 4), 12)
    hidden = torch.randn(1, 12, 8)
    ids = torch.arange(100, 112)[None]
    e = c.store(ids, cache, hidden, media_ids=(999,))
    assert e.ids.numel() == 10                                      # capped at max_tokens
    entry, n = c.match(torch.cat([ids[:, :6], torch.tensor([[1, 2, 3]])], 1), (999,))
    assert entry is e and n == 6
    assert c.match(torch.tensor([[100, 101, 7, 8, 9]]), (999,)) == (None, 0)   # 2 rows < min_tokens
    assert c.match(ids[:, :5], (102,))[1] == 0                     # media at index 2: too little before it
    entry, n = c.match(ids[:, :5], (999,))
    assert n == 4                                                   # the last row is always recomputed
    target = KVCache(torch.zeros(2, 1, 1, 32, 4), torch.zeros(2, 1, 1, 32, 4), 0)
    head = c.restore(entry, n, target)
    assert target.length == 4 and torch.equal(target.k[:, :, :, :4], cache.k[:, :, :, :4])
    assert torch.equal(head, hidden[:, :4])
    for base in (200, 300):                                         # LRU: two more prompts evict the first
        c.store(torch.arange(base, base + 12)[None], cache, hidden, (999,))
    assert c.match(ids, (999,)) == (None, 0) and len(c._entries) == 2
    assert c.nbytes > 0


def test_talker_rows_attach_to_their_thinker_prefix_or_stand_alone():
    c = PrefixCache(max_entries=4, max_tokens=64, min_tokens=3)
    th = KVCache(torch.randn(2, 1, 1, 32, 4), torch.randn(2, 1, 1, 32, 4), 10)
    tk = KVCache(torch.randn(3, 1, 1, 40, 2), torch.randn(3, 1, 1, 40, 2), 14)
    ids = torch.arange(100, 110)[None]
    c.store(ids, th, torch.randn(1, 10, 8), (999,))
    c.store_talker(ids, tk, 10, (999,))                             # attached to the Thinker entry
    assert len(c._entries) == 1
    rows = c.talker_rows(torch.cat([ids, torch.tensor([[5, 6]])], 1), (999,))
    assert rows.length == 10 and torch.equal(rows.k[:, :, :, :10], tk.k[:, :, :, :10])
    # a conversation's longer history: Talker rows only, found by the Talker and ignored by the Thinker
    longer = torch.arange(300, 314)[None]
    c.store_talker(longer, tk, 14, (999,))
    assert c.talker_rows(longer, (999,)).length == 14
    assert c.match(longer, (999,), thinker=True) == (None, 0)
    # a Thinker entry that extends a prefix takes over its Talker rows
    c.store(torch.cat([ids, torch.tensor([[7, 8]])], 1), KVCache(th.k, th.v, 12), torch.randn(1, 12, 8), (999,))
    entry, n = c.match(torch.cat([ids, torch.tensor([[7, 8, 9]])], 1), (999,), thinker=True)
    assert n == 12 and entry.talker_k is not None and entry.talker_k.shape[3] == 10
