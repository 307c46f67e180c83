"""Realtime load test: N concurrent OpenAI-Realtime sessions against `omnivox serve` over loopback.

    python benchmarks/realtime_load.py [--sessions 8] [--duration 180] [--question-seconds 3] [--model DIR]
                                       [--max-output-tokens 32] [--json out.json]

Starts `omnivox serve` as a child process (default: a tiny random checkpoint written by tests/tiny.py into a temp
dir; --model DIR for a real one; --url ws://HOST:PORT to use a running server instead, --server-pid for its RSS),
then opens --sessions websocket sessions (`websockets` library, subprotocol "realtime", GA event names). Each
session sets server_vad (OpenAI defaults) with audio output and then, until --duration seconds have passed, repeats
one turn: --lead-silence seconds of silence, a speech-like question (tests/speechlike.py, --question-seconds long,
a different seed per session and turn), then silence until the response is done (or --turn-timeout), all sent as
PCM16 24 kHz base64 `input_audio_buffer.append` events in real time (--chunk-ms per event), as a microphone would.

Measured per turn (client clock, loopback):
- end-of-turn latency: `input_audio_buffer.speech_stopped` received -> first `response.output_audio.delta`
  (the server's end of turn to first audio; what /metrics calls end_of_turn_to_first_audio_seconds);
- user latency: last speech sample sent -> first audio delta (adds the silence_duration_ms the VAD waits for);
- turns started (speech_started) / completed (response.done completed or incomplete) / cancelled / failed,
  error events by code, turns with no speech_stopped or no audio before the timeout;
- speech_stopped lag: its arrival minus when the audio that completes its silence window was sent — how far the
  server's reading of appends (and so its VAD) runs behind real time;
- server RSS (psutil, else /proc/PID/status VmRSS) before the sessions, at the end (sessions closed, +2 s) and the
  peak sampled every second; the server's own /metrics histograms (end-of-turn and first-audio means).
Server events are tied to turns by audio time (speech_started/stopped carry audio_start_ms/audio_end_ms on the
session's input clock, which the client keeps), responses to the turn whose speech_stopped came last, so a server
that runs seconds behind does not shift the bookkeeping; VAD events outside every question are counted.
Prints a table; --json FILE writes every figure and the per-turn records.
For the issue's question-length figures run with --sessions 1 and --question-seconds 3, then 15.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from speechlike import silence, speechlike, to_pcm16  # noqa: E402

RATE = 24000
SILENCE_MS = 500                # server_vad silence_duration_ms (OpenAI default)
T0 = time.monotonic()


def now() -> float:
    """Seconds since the script started (all recorded times use this clock)."""
    return time.monotonic() - T0


# ------------------------------------------------------------------------------------------------ server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class ServerProcess:
    """`python -m omnivox serve` in a child process, its output in a log file; stop() ends it (SIGINT, then kill)."""

    def __init__(self, model: Path, port: int, args: argparse.Namespace, log_path: Path):
        self.port = port
        cmd = [sys.executable, "-m", "omnivox", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--max-sessions", str(args.sessions + 2), "--log-level", "warning"]
        if args.max_active:
            cmd += ["--max-active", str(args.max_active)]
        if args.max_codec_tokens:
            cmd += ["--max-codec-tokens", str(args.max_codec_tokens)]
        cmd += args.server_arg
        self.cmd = cmd
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if json.loads(http_get(f"http://127.0.0.1:{self.port}/healthz", 2.0)).get("status") == "ok":
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def tiny_model_dir(tmp: Path) -> Path:
    import tiny        # tests/tiny.py (builds with the reference implementation: benchmark/test-only)
    out = tmp / "tiny_base"
    tiny.make_checkpoint(out, "base")
    return out


# ------------------------------------------------------------------------------------------------ one session

@dataclass
class Turn:
    session: int
    index: int
    question_start_ms: int = 0                # where the question lies in the session's input audio (ms)
    question_end_ms: int = 0
    t_audio0: float = 0.0                     # client time the session audio at question_start_ms was sent
    speech_end_sent: float | None = None      # client time the last speech sample was sent
    speech_started: float | None = None       # client times the events arrived
    speech_stopped: float | None = None
    audio_start_ms: int | None = None         # the server's event fields
    audio_end_ms: int | None = None
    first_audio: float | None = None
    done: float | None = None
    status: str | None = None                 # response.done status, or timeout / no_speech_stopped / busy
    response_id: str | None = None
    audio_bytes: int = 0

    @property
    def eot_latency_ms(self) -> float | None:
        if self.speech_stopped is None or self.first_audio is None:
            return None
        return (self.first_audio - self.speech_stopped) * 1000.0

    @property
    def user_latency_ms(self) -> float | None:
        if self.speech_end_sent is None or self.first_audio is None:
            return None
        return (self.first_audio - self.speech_end_sent) * 1000.0

    def stop_lag_ms(self, silence_duration_ms: int) -> float | None:
        """speech_stopped arrival - when the audio that completes its silence window was sent: the server's
        backlog in reading appends (about 0, within a window or two, when it keeps up)."""
        if self.speech_stopped is None or self.audio_end_ms is None:
            return None
        sent = self.t_audio0 + (self.audio_end_ms + silence_duration_ms - self.question_start_ms) / 1000.0
        return (self.speech_stopped - sent) * 1000.0


@dataclass
class SessionResult:
    index: int
    turns: list[Turn] = field(default_factory=list)
    errors: dict = field(default_factory=dict)      # error code -> count
    unmatched_vad_events: int = 0                   # speech_started/stopped whose audio time is in no question
    fatal: str | None = None


def _b64_chunks(x: np.ndarray, chunk: int) -> list[tuple[str, int]]:
    """[(base64 PCM16, samples)] of `chunk` samples each."""
    return [(base64.b64encode(to_pcm16(x[i : i + chunk])).decode(), len(x[i : i + chunk]))
            for i in range(0, len(x), chunk)]


async def run_session(k: int, url: str, args: argparse.Namespace, deadline: float, t_start: float) -> SessionResult:
    """One client: turns of (lead silence, question, silence until the response is done). Server events are tied to
    turns by audio time (speech_started/stopped carry audio_start_ms/audio_end_ms on the session's input clock),
    and responses to the turn whose speech_stopped came last, so a lagging server never shifts the bookkeeping."""
    import websockets

    res = SessionResult(k)
    chunk = RATE * args.chunk_ms // 1000
    silent_chunk = _b64_chunks(silence(chunk / RATE), chunk)[0]
    lead_chunks = _b64_chunks(silence(args.lead_silence), chunk)
    sent_samples = 0                                    # the session's input clock
    await asyncio.sleep(args.stagger * k)               # sessions do not all speak in the same instant
    try:
        ws = await asyncio.wait_for(websockets.connect(url, subprotocols=["realtime"], max_size=2 ** 24,
                                                       open_timeout=30, ping_interval=None), 30)
    except Exception as e:                               # noqa: BLE001 - reported, the other sessions go on
        res.fatal = f"connect: {type(e).__name__}: {e}"
        return res
    ready = asyncio.Event()
    changed = asyncio.Event()                           # set on every event that may end the current turn
    last_stopped: Turn | None = None                    # the turn a new response belongs to
    by_response: dict[str, Turn] = {}
    margin_ms = 1500

    def turn_at(ms: int) -> Turn | None:
        for t in reversed(res.turns):
            if t.question_start_ms - margin_ms <= ms <= t.question_end_ms + margin_ms:
                return t
        return None

    async def reader():
        nonlocal last_stopped
        async for raw in ws:
            t = now()
            ev = json.loads(raw)
            kind = ev.get("type", "")
            if kind == "session.updated":
                ready.set()
            elif kind == "error":
                err = ev.get("error") or {}
                code = err.get("code") or err.get("type") or "unknown"
                res.errors[code] = res.errors.get(code, 0) + 1
                if code == "server_busy" and last_stopped is not None and last_stopped.done is None:
                    last_stopped.status, last_stopped.done = "busy", t
            elif kind == "input_audio_buffer.speech_started":
                turn = turn_at(int(ev.get("audio_start_ms", -10 ** 9)))
                if turn is None:
                    res.unmatched_vad_events += 1
                elif turn.speech_started is None:
                    turn.speech_started, turn.audio_start_ms = t, ev.get("audio_start_ms")
            elif kind == "input_audio_buffer.speech_stopped":
                turn = turn_at(int(ev.get("audio_end_ms", -10 ** 9)))
                if turn is None:
                    res.unmatched_vad_events += 1
                elif turn.speech_stopped is None:
                    turn.speech_stopped, turn.audio_end_ms = t, ev.get("audio_end_ms")
                    last_stopped = turn
            elif kind == "response.created":
                rid = (ev.get("response") or {}).get("id")
                if last_stopped is not None and last_stopped.response_id is None and rid:
                    last_stopped.response_id = rid
                    by_response[rid] = last_stopped
            elif kind in ("response.output_audio.delta", "response.audio.delta"):
                turn = by_response.get(ev.get("response_id"))
                if turn is not None:
                    if turn.first_audio is None:
                        turn.first_audio = t
                    turn.audio_bytes += len(ev.get("delta", "")) * 3 // 4
            elif kind == "response.done":
                r = ev.get("response") or {}
                turn = by_response.get(r.get("id"))
                if turn is not None and turn.done is None:
                    turn.done, turn.status = t, r.get("status")
            changed.set()

    async def send(data: tuple[str, int]) -> None:
        nonlocal sent_samples
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": data[0]}))
        sent_samples += data[1]

    async def send_paced(chunks: list[tuple[str, int]], t0: float) -> float:
        """Send chunks at real-time pace from t0; returns the time the last one went out."""
        for i, data in enumerate(chunks):
            wait = t0 + i * args.chunk_ms / 1000 - now()
            if wait > 0:
                await asyncio.sleep(wait)
            await send(data)
        return now()

    read_task = asyncio.create_task(reader())
    try:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["audio"],
            "max_output_tokens": args.max_output_tokens,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                                   "silence_duration_ms": SILENCE_MS, "create_response": True,
                                                   "interrupt_response": True}},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}}}}}))
        await asyncio.wait_for(ready.wait(), 30)
        index = 0
        while now() < deadline and not read_task.done():
            question = speechlike(args.question_seconds, RATE, seed=1000 * k + index % args.distinct_questions)
            q_chunks = _b64_chunks(question, chunk)
            t0 = now()
            t_q = await send_paced(lead_chunks, t0)
            turn = Turn(k, index, question_start_ms=sent_samples * 1000 // RATE,
                        question_end_ms=(sent_samples + len(question)) * 1000 // RATE, t_audio0=t_q)
            res.turns.append(turn)
            turn.speech_end_sent = await send_paced(q_chunks, t_q)
            # the microphone stays open: silence until the response is done (or the turn times out)
            t_silence, i = now(), 0
            limit = turn.speech_end_sent + args.turn_timeout
            while turn.done is None and now() < limit and not read_task.done():
                if turn.speech_stopped is None and now() > turn.speech_end_sent + args.stop_timeout:
                    turn.status = "no_speech_stopped"      # the VAD missed the end of the question
                    break
                wait = t_silence + i * args.chunk_ms / 1000 - now()
                if wait > 0:
                    changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), wait)
                    continue
                await send(silent_chunk)
                i += 1
            if turn.done is None and turn.status is None:
                turn.status = "timeout"
            index += 1
    except Exception as e:                               # noqa: BLE001
        res.fatal = f"{type(e).__name__}: {e}"
    finally:
        read_task.cancel()
        with contextlib.suppress(BaseException):
            await read_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 5)
    if read_task.done() and not read_task.cancelled() and read_task.exception() is not None and res.fatal is None:
        res.fatal = f"reader: {read_task.exception()!r}"
    return res


# ------------------------------------------------------------------------------------------------ report

def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def parse_metrics(text: str) -> dict:
    """Mean of each *_seconds histogram (sum / count) and the error counters from Prometheus text."""
    out: dict = {}
    sums, counts = {}, {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\w.]+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        if name.endswith("_sum") and not labels:
            sums[name[:-4]] = v
        elif name.endswith("_count") and not labels:
            counts[name[:-6]] = v
        elif "errors_total" in name or "responses_total" in name:
            out[name + labels] = v
    for base, c in counts.items():
        if base in sums and c:
            out[base + "_mean"] = sums[base] / c
            out[base + "_count"] = c
    return out


def summarize(results: list[SessionResult], wall_s: float, rss: dict, metrics: dict, args) -> dict:
    turns = [t for r in results for t in r.turns]
    eot = [t.eot_latency_ms for t in turns if t.eot_latency_ms is not None]
    user = [t.user_latency_ms for t in turns if t.user_latency_ms is not None]
    errors: dict = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    lags = [t.stop_lag_ms(SILENCE_MS) for t in turns if t.stop_lag_ms(SILENCE_MS) is not None]
    statuses: dict = {}
    for t in turns:
        statuses[t.status or "none"] = statuses.get(t.status or "none", 0) + 1
    return {
        "sessions": args.sessions, "duration_s": args.duration, "max_codec_tokens": args.max_codec_tokens, "wall_s": round(wall_s, 1),
        "question_seconds": args.question_seconds, "max_output_tokens": args.max_output_tokens,
        "turns_sent": len(turns),
        "turns_speech_started": sum(t.speech_started is not None for t in turns),
        "turns_speech_stopped": sum(t.speech_stopped is not None for t in turns),
        "turns_with_audio": sum(t.first_audio is not None for t in turns),
        "turns_completed": sum(t.status in ("completed", "incomplete") for t in turns),
        "turn_status": statuses,
        "eot_to_first_audio_ms": {"p50": percentile(eot, 50), "p95": percentile(eot, 95),
                                  "max": max(eot) if eot else None, "n": len(eot)},
        "speech_end_to_first_audio_ms": {"p50": percentile(user, 50), "p95": percentile(user, 95), "n": len(user)},
        "speech_stopped_lag_ms": {"p50": percentile(lags, 50), "p95": percentile(lags, 95), "n": len(lags)},
        "unmatched_vad_events": sum(r.unmatched_vad_events for r in results),
        "error_events": errors,
        "session_failures": [f"session {r.index}: {r.fatal}" for r in results if r.fatal],
        "server_rss_mib": {k: (None if v is None else round(v / 2 ** 20, 1)) for k, v in rss.items()},
        "server_metrics": metrics,
        "turns": [{**asdict(t), "eot_latency_ms": t.eot_latency_ms, "user_latency_ms": t.user_latency_ms,
                   "stop_lag_ms": t.stop_lag_ms(SILENCE_MS)} for t in turns],
    }


def print_table(s: dict) -> None:
    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    e, u, r = s["eot_to_first_audio_ms"], s["speech_end_to_first_audio_ms"], s["server_rss_mib"]
    rows = [
        ("sessions x duration", f"{s['sessions']} x {s['duration_s']} s (wall {s['wall_s']} s)"),
        ("question", f"{s['question_seconds']} s speech-like, max_output_tokens {s['max_output_tokens']}, "
                     f"server max_codec_tokens {s['max_codec_tokens'] or 'default'}"),
        ("turns sent / speech_started / speech_stopped",
         f"{s['turns_sent']} / {s['turns_speech_started']} / {s['turns_speech_stopped']}"),
        ("turns with audio / completed", f"{s['turns_with_audio']} / {s['turns_completed']}"),
        ("turn status", ", ".join(f"{k} {v}" for k, v in sorted(s["turn_status"].items()))),
        ("speech_stopped -> first audio p50 / p95 / max (ms)", f"{ms(e['p50'])} / {ms(e['p95'])} / {ms(e['max'])}"),
        ("last speech sample -> first audio p50 / p95 (ms)", f"{ms(u['p50'])} / {ms(u['p95'])}"),
        ("speech_stopped lag behind the audio p50 / p95 (ms)",
         f"{ms(s['speech_stopped_lag_ms']['p50'])} / {ms(s['speech_stopped_lag_ms']['p95'])}"),
        ("VAD events outside any question", str(s["unmatched_vad_events"])),
        ("error events", ", ".join(f"{k} {v}" for k, v in s["error_events"].items()) or "none"),
        ("session failures", "; ".join(s["session_failures"]) or "none"),
        ("server RSS before / peak / after (MiB)", f"{r.get('before')} / {r.get('peak')} / {r.get('after')}"),
    ]
    m = s["server_metrics"]
    for key in sorted(m):
        if key.endswith("_seconds_mean"):
            rows.append((f"/metrics {key[:-5]} mean (ms)", f"{m[key] * 1000:.0f} (n={m.get(key[:-5] + '_count', 0):.0f})"))
        elif key.endswith("_mean"):
            rows.append((f"/metrics {key[:-5]} mean", f"{m[key]:.2f} (n={m.get(key[:-5] + '_count', 0):.0f})"))
    w = max(len(a) for a, _ in rows)
    print()
    for a, b in rows:
        print(f"{a:<{w}}  {b}")


# ------------------------------------------------------------------------------------------------ main

async def run_all(url: str, args, server_pid: int | None, rss: dict) -> tuple[list[SessionResult], float]:
    t_start = now()
    deadline = t_start + args.duration
    stop_sampling = asyncio.Event()

    async def sample_rss():
        while not stop_sampling.is_set():
            if server_pid is not None:
                v = rss_bytes(server_pid)
                if v is not None:
                    rss["peak"] = max(rss.get("peak") or 0, v)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 1.0)

    sampler = asyncio.create_task(sample_rss())
    hard_limit = args.duration + args.turn_timeout + 60 + args.stagger * args.sessions
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(run_session(k, url, args, deadline, t_start) for k in range(args.sessions))), hard_limit)
    finally:
        stop_sampling.set()
        await sampler
    return results, now() - t_start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8, help="concurrent Realtime sessions (default 8)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds during which sessions start new turns")
    p.add_argument("--question-seconds", type=float, default=3.0, help="length of each spoken question")
    p.add_argument("--lead-silence", type=float, default=0.6, help="silence before each question (s)")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per input_audio_buffer.append (ms)")
    p.add_argument("--turn-timeout", type=float, default=90.0, help="give up on a response after this (s)")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="give up on a turn when no speech_stopped comes this long after the question (s)")
    p.add_argument("--max-output-tokens", type=int, default=32, help="session max_output_tokens (Thinker tokens)")
    p.add_argument("--distinct-questions", type=int, default=4, help="questions per session, cycled")
    p.add_argument("--stagger", type=float, default=0.37, help="delay between session starts (s)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a tiny random one)")
    p.add_argument("--url", default=None, help="ws://HOST:PORT of a running server (no server is started)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    p.add_argument("--max-active", type=int, default=None, help="passed to omnivox serve --max-active")
    p.add_argument("--max-codec-tokens", type=int, default=None,
                   help="passed to omnivox serve (default 150 = 3 s of speech with the tiny checkpoint, whose random "
                        "Talker never ends a reply; the server's default with --model)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for omnivox serve")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /healthz")
    p.add_argument("--json", type=Path, default=None, help="write the summary and per-turn records here")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.duration <= 0 or args.question_seconds <= 0 or args.chunk_ms < 10:
        p.error("--sessions >= 1, --duration > 0, --question-seconds > 0 and --chunk-ms >= 10 please")

    tmp = Path(tempfile.mkdtemp(prefix="omnivox_load_"))
    server: ServerProcess | None = None
    rss: dict = {"before": None, "peak": None, "after": None}
    metrics: dict = {}
    try:
        if args.url:
            base = args.url.rstrip("/")
            http = base.replace("ws://", "http://").replace("wss://", "https://")
            pid = args.server_pid
        else:
            model = args.model
            if model is None:
                print("writing a tiny random checkpoint ...", flush=True)
                model = tiny_model_dir(tmp)
                if args.max_codec_tokens is None:
                    args.max_codec_tokens = 150
            port = free_port()
            server = ServerProcess(model, port, args, tmp / "server.log")
            print(f"starting: {' '.join(server.cmd)}", flush=True)
            server.wait_ready(args.ready_timeout)
            base, http, pid = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}", server.pid
        if pid is not None:
            rss["before"] = rss["peak"] = rss_bytes(pid)
        url = f"{base}/v1/realtime?model=omnivox"
        print(f"{args.sessions} sessions on {url} for {args.duration:g} s ...", flush=True)
        results, wall = asyncio.run(run_all(url, args, pid, rss))
        time.sleep(2.0)                                  # sessions are closed: give the server a moment to free
        if pid is not None:
            rss["after"] = rss_bytes(pid)
        with contextlib.suppress(Exception):
            metrics = parse_metrics(http_get(f"{http}/metrics"))
        summary = summarize(results, wall, rss, metrics, args)
        print_table(summary)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
            print(f"\nwrote {args.json}")
        if server is not None and server.proc.poll() is not None:
            print(f"server exited early ({server.proc.returncode}):\n{server.tail()}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:                               # noqa: BLE001
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if server is not None:
            print(server.tail(), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
