"""The model worker: one thread runs every model computation for every session.

torch already spreads each op over the cores, so two threads running the model at once would only fight for them
(and the model code is not thread-safe). The asyncio side hands work to the worker in two forms:

- `await engine.call(fn, *args)`: a short job (encode a window of audio, prefill an item, edit the conversation),
  run FIFO between stepping rounds; its result or exception comes back to the awaiting coroutine.
- `engine.stream(make_gen, cancel)`: a turn. `make_gen()` runs on the worker and returns a generator of events; the
  worker advances every active stream by ONE event per round (round-robin), so several sessions interleave a
  token or a DiT block at a time and none waits for another's whole answer.

Background streams (`stream(..., background=True)`: a user turn's transcription) have the lowest priority: they are
admitted without taking an active slot or counting toward the busy limit, and a round steps one of them only when
no foreground stream could be stepped (none active, or all waiting for their consumer, e.g. paced audio). So they
fill the gaps of a reply that is played at real time and delay a foreground turn by at most the one background step
in flight when it becomes ready.

Each loop of the worker: close cancelled streams -> run the jobs queued so far -> admit waiting streams up to
`max_active` -> one round over the active streams. Cancellations go first so that a job submitted right after a
cancel (barge-in: the next user turn) never runs while the cancelled turn's generator is still open.

Back-pressure: events reach the event loop through a per-stream buffer of at most `max_buffered` events. A stream
whose consumer is slow (a paced or stalled websocket) is simply not advanced while its buffer is full, so memory
never grows with a slow client and the other streams keep their pace. Over `max_active + max_queued` streams,
`stream()` raises `EngineBusy` at once (the session turns it into a `server_busy` error event).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import torch


class EngineBusy(Exception):
    """Too many active + queued turns."""


_END = object()  # sentinel: the stream is over (completed, cancelled or failed)


class _Stream:
    def __init__(self, make_gen: Callable[[], Iterator], cancel: threading.Event, max_buffered: int,
                 loop: asyncio.AbstractEventLoop, background: bool = False):
        self.make_gen = make_gen
        self.background = background
        self.cancel = cancel
        self.max_buffered = max_buffered
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()  # filled by the worker, at most max_buffered + 1 items
        self.gen: Iterator | None = None
        self.outstanding = 0        # events handed to the loop and not consumed yet (guarded by Engine._lock)
        self.finished = False
        self.busy_s = 0.0           # worker time spent in make_gen() and next(gen) for this stream

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass


class _StreamIterator:
    """The asyncio side of one stream. Closing it early (break, task cancel, aclose) cancels the turn."""

    def __init__(self, engine: "Engine", stream: _Stream):
        self._engine, self._stream = engine, stream

    def __aiter__(self):
        return self

    @property
    def busy_s(self) -> float:
        """Worker seconds this turn has used so far (its compute time, without the time spent waiting for its
        consumer or for other turns' steps)."""
        return self._stream.busy_s

    async def __anext__(self):
        s = self._stream
        try:
            item = await s.queue.get()
        except asyncio.CancelledError:
            s.cancel.set()
            self._engine._wake.set()
            raise
        if item is _END:
            s.queue.put_nowait(_END)  # keep ending on further calls
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            s.queue.put_nowait(_END)
            raise item
        self._engine._consumed(s)
        return item

    async def aclose(self) -> None:
        if not self._stream.finished:
            self._stream.cancel.set()
            self._engine._wake.set()


class Engine:
    def __init__(self, omni, *, max_active: int = 4, max_queued: int = 16):
        if max_active < 1 or max_queued < 0:
            raise ValueError("max_active must be >= 1 and max_queued >= 0")
        self.omni = omni
        self.max_active = max_active
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._jobs: collections.deque = collections.deque()
        self._waiting: collections.deque[_Stream] = collections.deque()
        self._active: list[_Stream] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.rounds = 0                  # stepping rounds run (for tests and metrics)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="omnivox-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker; open streams are closed and their consumers see the end, pending jobs fail."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------------------------------------ public API
    async def call(self, fn, *args):
        """Run `fn(*args)` on the worker (FIFO with other jobs, between stepping rounds); returns its result."""
        if self._thread is None or self._closing:
            raise RuntimeError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._jobs.append((fn, args, loop, fut))
        self._wake.set()
        return await fut

    def stream(self, make_gen: Callable[[], Iterator], cancel: threading.Event,
               max_buffered: int = 64, background: bool = False) -> AsyncIterator:
        """Start a turn (see the module docstring). Raises EngineBusy when over the limits."""
        if self._thread is None or self._closing:
            raise RuntimeError("the engine is not running")
        if max_buffered < 1:
            raise ValueError("max_buffered must be >= 1")
        s = _Stream(make_gen, cancel, max_buffered, asyncio.get_running_loop(), background)
        with self._lock:
            live = sum(not x.cancel.is_set() and not x.background for x in self._active) + \
                sum(not x.cancel.is_set() and not x.background for x in self._waiting)
            if not background and live >= self.max_active + self.max_queued:
                raise EngineBusy(f"the server is busy ({self.max_active} active and {self.max_queued} queued "
                                 "responses); try again shortly")
            self._waiting.append(s)
        self._wake.set()
        return _StreamIterator(self, s)

    def stats(self) -> dict:
        """active / queued: turns being served / waiting; closing: cancelled turns whose generator the worker
        closes once the step in flight (one token, or one token2wav block) returns; jobs: short jobs waiting."""
        with self._lock:
            closing = sum(s.cancel.is_set() for s in self._active) + sum(s.cancel.is_set() for s in self._waiting)
            return {"active": sum(not s.cancel.is_set() and not s.background for s in self._active),
                    "queued": sum(not s.cancel.is_set() and not s.background for s in self._waiting),
                    "closing": closing, "jobs": len(self._jobs)}

    # ------------------------------------------------------------------------------------------------ worker
    def _consumed(self, s: _Stream) -> None:
        with self._lock:
            s.outstanding -= 1
            wake = s.outstanding == s.max_buffered - 1
        if wake:
            self._wake.set()

    def _finish(self, s: _Stream, error: BaseException | None = None) -> None:
        gen, s.gen = s.gen, None
        if gen is not None:
            try:
                with torch.inference_mode():
                    gen.close()  # GeneratorExit inside the turn: it keeps what it has produced and stops
            except Exception as e:  # noqa: BLE001 - a failing close must not kill the worker
                error = error or e
        s.finished = True
        if error is not None:
            s.deliver(error)
        s.deliver(_END)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._closing:
                self._shutdown()
                return
            busy = False
            # 1. cancellations first (see the module docstring)
            with self._lock:
                cancelled = [s for s in self._active if s.cancel.is_set()]
                self._active = [s for s in self._active if not s.cancel.is_set()]
                dropped = [s for s in self._waiting if s.cancel.is_set()]
                self._waiting = collections.deque(s for s in self._waiting if not s.cancel.is_set())
            for s in cancelled + dropped:
                self._finish(s)
                busy = True
            # 2. the short jobs queued so far
            with self._lock:
                jobs, self._jobs = list(self._jobs), collections.deque()
            for fn, args, loop, fut in jobs:
                busy = True
                try:
                    with torch.inference_mode():
                        result = fn(*args)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    loop.call_soon_threadsafe(_set_exception, fut, e)
                else:
                    loop.call_soon_threadsafe(_set_result, fut, result)
            # 3. admit waiting streams
            while True:
                with self._lock:
                    slots = self.max_active - sum(not x.background for x in self._active)
                    s = next((x for x in self._waiting if x.background or slots > 0), None)
                    if s is None:
                        break
                    self._waiting.remove(s)
                busy = True
                t0 = time.perf_counter()
                try:
                    with torch.inference_mode():
                        s.gen = s.make_gen()
                except Exception as e:  # noqa: BLE001 - the consumer raises it
                    self._finish(s, e)
                    continue
                finally:
                    s.busy_s += time.perf_counter() - t0
                with self._lock:
                    self._active.append(s)
            # 4. one round: one event per active foreground stream whose buffer has room; one background
            # stream's event only when no foreground stream was stepped
            with self._lock:
                active = [s for s in self._active if not s.background] + [s for s in self._active if s.background]
            stepped = False
            for s in active:
                if s.cancel.is_set():
                    busy = True  # closed at the top of the next loop
                    continue
                if s.background and stepped:
                    continue
                with self._lock:
                    room = s.outstanding < s.max_buffered
                if not room:
                    continue
                stepped = True
                busy = True
                t0 = time.perf_counter()
                try:
                    with torch.inference_mode():
                        event = next(s.gen)
                except StopIteration:
                    self._drop_active(s)
                    s.gen = None
                    self._finish(s)
                    continue
                except Exception as e:  # noqa: BLE001 - the consumer raises it
                    self._drop_active(s)
                    self._finish(s, e)
                    continue
                finally:
                    s.busy_s += time.perf_counter() - t0
                with self._lock:
                    s.outstanding += 1
                s.deliver(event)
            self.rounds += 1
            if not busy:
                self._wake.wait(timeout=0.5)

    def _drop_active(self, s: _Stream) -> None:
        with self._lock:
            if s in self._active:
                self._active.remove(s)

    def _shutdown(self) -> None:
        with self._lock:
            streams = self._active + list(self._waiting)
            self._active, self._waiting = [], collections.deque()
            jobs, self._jobs = list(self._jobs), collections.deque()
        for s in streams:
            self._finish(s, RuntimeError("the engine was closed"))
        for _, _, loop, fut in jobs:
            loop.call_soon_threadsafe(_set_exception, fut, RuntimeError("the engine was closed"))


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
