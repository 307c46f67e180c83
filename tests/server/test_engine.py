"""The model worker: round-robin stepping of turns, short jobs between rounds, bounded buffers for slow
consumers, cancel closes the generator on the worker, EngineBusy over the limits. No model needed."""

import asyncio
import threading
import time

import pytest

from omnivox.server.engine import Engine, EngineBusy


def counting(name, n, log, closed=None):
    def make():
        def gen():
            try:
                for i in range(n):
                    log.append((name, i, threading.current_thread().name))
                    yield f"{name}{i}"
            finally:
                if closed is not None:
                    closed.append(name)
        return gen()
    return make


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def engine():
    e = Engine(omni=None, max_active=2, max_queued=1)
    e.start()
    yield e
    e.close()


def test_streams_are_stepped_round_robin_on_the_worker(engine):
    log = []

    async def main():
        a = engine.stream(counting("a", 5, log), threading.Event())
        b = engine.stream(counting("b", 5, log), threading.Event())
        out_a, out_b = await asyncio.gather(collect(a), collect(b))
        return out_a, out_b

    out_a, out_b = run(main())
    assert out_a == [f"a{i}" for i in range(5)] and out_b == [f"b{i}" for i in range(5)]
    assert {t for _, _, t in log} == {"omnivox-engine"}
    order = [name for name, _, _ in log]
    # interleaved one event at a time, not one whole turn after the other
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"]), order


async def collect(it):
    return [x async for x in it]


def test_jobs_run_fifo_between_rounds_and_return_or_raise(engine):
    async def main():
        order = []
        r = await asyncio.gather(*(engine.call(lambda i=i: order.append(i) or i * i) for i in range(5)))
        assert r == [0, 1, 4, 9, 16] and order == [0, 1, 2, 3, 4]

        def boom():
            raise ValueError("bad job")
        with pytest.raises(ValueError, match="bad job"):
            await engine.call(boom)
        # the worker survives a failing job
        assert await engine.call(lambda: threading.current_thread().name) == "omnivox-engine"
    run(main())


def test_slow_consumer_is_not_advanced_past_its_buffer(engine):
    log = []

    async def main():
        it = engine.stream(counting("s", 1000, log), threading.Event(), max_buffered=4)
        first = await it.__anext__()
        await asyncio.sleep(0.3)  # the worker would run hundreds of steps in this time if unbounded
        produced = len(log)
        rest = [x async for x in it]
        return first, produced, rest

    first, produced, rest = run(main())
    assert first == "s0"
    assert produced <= 6, produced          # 1 consumed + 4 buffered (+1 in flight)
    assert len(rest) == 999                 # nothing lost once the consumer reads again


def test_cancel_closes_the_generator_on_the_worker_and_ends_the_iterator(engine):
    log, closed = [], []

    async def main():
        cancel = threading.Event()
        it = engine.stream(counting("c", 10_000, log, closed), cancel, max_buffered=2)
        got = [await it.__anext__() for _ in range(3)]
        cancel.set()
        t0 = time.perf_counter()
        rest = [x async for x in it]
        return got, rest, time.perf_counter() - t0

    got, rest, took = run(main())
    assert got == ["c0", "c1", "c2"]
    assert len(rest) <= 3 and took < 1.0
    assert closed == ["c"]
    assert engine.stats()["active"] == 0 and engine.stats()["queued"] == 0


def test_over_the_limits_raises_engine_busy_at_once_and_queued_streams_run_later(engine):
    log = []

    async def main():
        gate = threading.Event()

        def blocking():
            def gen():
                while not gate.is_set():
                    yield "tick"
                    time.sleep(0.01)
            return gen()

        a = engine.stream(blocking, threading.Event(), max_buffered=1)
        b = engine.stream(blocking, threading.Event(), max_buffered=1)
        c = engine.stream(counting("q", 2, log), threading.Event())     # queued (max_active=2, max_queued=1)
        with pytest.raises(EngineBusy):
            engine.stream(counting("x", 2, log), threading.Event())
        await asyncio.sleep(0.1)
        assert engine.stats()["active"] == 2 and engine.stats()["queued"] == 1
        gate.set()
        await asyncio.gather(collect(a), collect(b))
        assert await collect(c) == ["q0", "q1"]
        assert engine.stats() == {"active": 0, "queued": 0, "closing": 0, "jobs": 0}

    run(main())


def test_a_generator_error_reaches_the_consumer_and_make_gen_runs_on_the_worker(engine):
    where = []

    def make():
        where.append(threading.current_thread().name)

        def gen():
            yield 1
            raise RuntimeError("turn failed")
        return gen()

    async def main():
        it = engine.stream(make, threading.Event())
        assert await it.__anext__() == 1
        with pytest.raises(RuntimeError, match="turn failed"):
            await it.__anext__()
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()

    run(main())
    assert where == ["omnivox-engine"]


def test_abandoned_iterator_cancels_its_stream(engine):
    closed = []

    async def main():
        it = engine.stream(counting("z", 10_000, [], closed), threading.Event(), max_buffered=2)
        await it.__anext__()
        await it.aclose()
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.02)

    run(main())
    assert closed == ["z"] and engine.stats()["active"] == 0


def test_busy_time_counts_worker_compute_not_consumer_waits(engine):
    def make():
        def gen():
            for i in range(4):
                time.sleep(0.05)
                yield i
        return gen()

    async def main():
        it = engine.stream(make, threading.Event(), max_buffered=1)
        out = []
        async for x in it:
            out.append(x)
            await asyncio.sleep(0.2)   # a slow (paced) consumer
        return out, it.busy_s

    out, busy = run(main())
    assert out == [0, 1, 2, 3]
    assert 0.18 <= busy <= 0.5, busy


def test_background_streams_step_only_when_no_foreground_stream_can(engine):
    """A transcription (background) never takes a step from a reply: while the reply can be stepped it waits; when
    the reply's consumer is full (paced audio) it fills the gap; it takes no active slot and is never busy."""
    log = []

    async def main():
        fg = engine.stream(counting("fg", 6, log), threading.Event(), max_buffered=3)
        bg = engine.stream(counting("bg", 4, log), threading.Event(), background=True)
        # the engine is full for foreground turns (max_active 2 + max_queued 1) but a background turn still starts
        more = [engine.stream(counting(f"x{k}", 1, log), threading.Event()) for k in range(2)]
        out_bg = await collect(bg)
        assert out_bg == [f"bg{i}" for i in range(4)]
        order = [n for n, _, _ in log]
        # fg filled its buffer (3) before bg got a step; no bg step came while fg had room
        first = order.index("bg")
        assert order[:first].count("fg") == 3 and {"x0", "x1"} <= set(order[:first]), order
        out_fg = await collect(fg)
        assert out_fg == [f"fg{i}" for i in range(6)]
        for m in more:
            await collect(m)
    run(main())
