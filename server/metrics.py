"""Server metrics in the Prometheus text exposition format (version 0.0.4), with no client library.

One `Metrics` object per server (app.state.metrics). Every update and `render()` hold one lock, so realtime
sessions, the chat endpoint and the /metrics scrape may touch it from any thread or task.

    metrics.sessions.inc(); metrics.sessions.dec()          # open realtime sessions (gauge)
    metrics.queue_depth.set_function(lambda: engine.stats()["queued"])   # read at scrape time
    metrics.first_audio_seconds.observe(0.42)
    metrics.errors_total.inc(type="invalid_request_error")
    metrics.responses_total.inc(status="completed")

Definitions:
- `first_audio_seconds`: from the moment a response was asked for (chat request received, realtime
  `response.create` or automatic response) to its first audio samples being ready to send.
- `end_of_turn_to_first_audio_seconds`: realtime only; from the end of the user's turn (VAD speech_stopped or
  the manual commit) to the first audio samples of the reply.
- `realtime_factor`: compute seconds spent generating a response / seconds of audio it produced (observed only
  for responses with audio). Realtime responses count the engine worker's busy time for the turn, not wall time,
  which would include the pacing and waiting for other turns. Below 1 the server generates speech faster than
  real time; above 1 playback would stall.
- `errors_total{type}`: error replies by their OpenAI error type (invalid_request_error, server_busy, ...).
- `responses_total{status}`: finished responses by status (completed, incomplete, cancelled, failed).
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
RESPONSE_STATUSES = ("completed", "incomplete", "cancelled", "failed")


def format_value(v: float) -> str:
    """A sample value as Prometheus writes it: integers without a dot, +Inf/-Inf/NaN spelled out."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, lock: threading.Lock):
        self.name, self.help, self._lock = name, help, lock

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]


class Gauge(_Metric):
    """A value that goes up and down; or, with `set_function`, a value read at scrape time."""
    kind = "gauge"

    def __init__(self, name: str, help: str, lock: threading.Lock):
        super().__init__(name, help, lock)
        self._value = 0.0
        self._fn: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set_function(self, fn: Callable[[], float] | None) -> None:
        """Read the value from `fn()` at each render (e.g. the engine's queue length); None: back to set/inc."""
        with self._lock:
            self._fn = fn

    @property
    def value(self) -> float:
        with self._lock:
            fn, value = self._fn, self._value
        return value if fn is None else _call(fn)

    def _render(self, read: float | None = None) -> list[str]:
        # `read`: the function's value, taken before the lock (the source may hold locks of its own)
        return self._header() + [f"{self.name} {format_value(self._value if read is None else read)}"]


def _call(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # a failing source must not break the scrape
        return float("nan")


class Counter(_Metric):
    """Monotonic counts, one series per label value (a single label name, e.g. type or status)."""
    kind = "counter"

    def __init__(self, name: str, help: str, lock: threading.Lock, label: str, initial: tuple[str, ...] = ()):
        super().__init__(name, help, lock)
        self.label = label
        self._values: dict[str, float] = {v: 0.0 for v in initial}

    def inc(self, amount: float = 1.0, **label: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        if set(label) != {self.label}:
            raise ValueError(f"{self.name} takes exactly one label, {self.label}=...")
        key = str(label[self.label])
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, label_value: str) -> float:
        with self._lock:
            return self._values.get(label_value, 0.0)

    def _render(self) -> list[str]:
        lines = self._header()
        for key in sorted(self._values):
            lines.append(f"{self.name}{_labels(((self.label, key),))} {format_value(self._values[key])}")
        return lines


class Histogram(_Metric):
    """Cumulative buckets (`le` upper bounds, +Inf last), _sum and _count, as Prometheus histograms are."""
    kind = "histogram"

    def __init__(self, name: str, help: str, lock: threading.Lock, buckets: tuple[float, ...]):
        super().__init__(name, help, lock)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds) or any(math.isinf(b) for b in bounds):
            raise ValueError("histogram buckets must be distinct finite numbers (+Inf is added)")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)   # per bucket, not cumulative; the last is (largest bound, +Inf)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        value = float(value)
        if math.isnan(value):
            return
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def sum(self) -> float:
        with self._lock:
            return self._sum

    def quantile(self, q: float) -> float:
        """Estimate like PromQL's histogram_quantile: linear inside the bucket holding rank q * count.
        NaN without observations; the largest finite bound when the rank falls in the +Inf bucket."""
        if not 0 <= q <= 1:
            raise ValueError("q must be in [0, 1]")
        with self._lock:
            counts, total = list(self._counts), self._count
        if total == 0:
            return float("nan")
        rank = q * total
        seen = 0
        for i, c in enumerate(counts):
            if seen + c >= rank and c > 0:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lo = 0.0 if i == 0 else self.bounds[i - 1]
                return lo + (self.bounds[i] - lo) * (rank - seen) / c
            seen += c
        return self.bounds[-1]

    def _render(self) -> list[str]:
        lines = self._header()
        cumulative = 0
        for bound, c in zip(self.bounds + (math.inf,), self._counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{format_value(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {format_value(self._sum)}")
        lines.append(f"{self.name}_count {self._count}")
        return lines


class Metrics:
    """The server's metrics; names carry the `omnivox_` prefix in the exposition."""

    def __init__(self, prefix: str = "omnivox_"):
        self._lock = threading.Lock()
        p, lock = prefix, self._lock
        self.sessions = Gauge(p + "sessions", "Open realtime websocket sessions.", lock)
        self.queue_depth = Gauge(p + "queue_depth", "Turns waiting for the model worker.", lock)
        self.first_audio_seconds = Histogram(
            p + "first_audio_seconds", "Seconds from a response being requested to its first audio samples.",
            lock, LATENCY_BUCKETS)
        self.end_of_turn_to_first_audio_seconds = Histogram(
            p + "end_of_turn_to_first_audio_seconds",
            "Seconds from the end of the user's turn (speech stopped or commit) to the first audio of the reply.",
            lock, LATENCY_BUCKETS)
        self.realtime_factor = Histogram(
            p + "realtime_factor", "Compute seconds spent generating a response per second of audio it produced "
            "(realtime: the engine worker's busy time for the turn, not wall time; below 1: faster than real "
            "time).", lock, RTF_BUCKETS)
        self.errors_total = Counter(p + "errors_total", "Error replies sent, by OpenAI error type.", lock, "type")
        self.responses_total = Counter(p + "responses_total", "Finished responses, by status.", lock, "status",
                                       initial=RESPONSE_STATUSES)
        self._all: list[_Metric] = [self.sessions, self.queue_depth, self.first_audio_seconds,
                                    self.end_of_turn_to_first_audio_seconds, self.realtime_factor,
                                    self.errors_total, self.responses_total]

    def render(self) -> str:
        """The exposition text (serve with content type `text/plain; version=0.0.4; charset=utf-8`)."""
        reads = {id(g): _call(g._fn) for g in (self.sessions, self.queue_depth) if g._fn is not None}
        with self._lock:
            lines = [line for m in self._all
                     for line in (m._render(reads.get(id(m))) if isinstance(m, Gauge) else m._render())]
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
