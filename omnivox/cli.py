"""`omnivox` command line: `ask` (one turn, streamed to stdout), `serve` (the realtime server), `bench` (ours
vs the reference) and `doctor` (is this machine ready?).

Every user-facing failure (bad checkpoint, bad input, bad option) prints one line on stderr and exits with 2.
Set OMNIVOX_DEBUG=1 to get tracebacks for unexpected internal errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omnivox import doctor  # stdlib only at import time

DEFAULT_MODEL = "Qwen/Qwen2.5-Omni-3B"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags `omnivox ask` and demos/offline_qa.py share (streaming.decoding says what they mean)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true",
                      help="argmax decoding in the Thinker and the Talker, as the reference's do_sample=False: the "
                           "repetition penalty still applies (the checkpoint's for the Thinker, 1.05 for the Talker)")
    mode.add_argument("--temperature", type=float, default=None, help="Thinker sampling temperature")
    p.add_argument("--top-p", type=float, default=None, help="Thinker nucleus sampling")
    p.add_argument("--top-k", type=int, default=None, help="Thinker top-k sampling")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="repetition penalty of the Thinker and the Talker, greedy or sampled (1.0: none)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible runs)")
    p.add_argument("--talker-codec-prompt", action="store_true",
                   help="the reference's other Talker prompt (codec pad/bos rows, multimodal positions), as "
                        "transformers 4 ran it; default: transformers 5's single-request generate (see README)")
    p.add_argument("--fast-start", action="store_true",
                   help="approximate: solve the first speech chunk with 4 ODE time points instead of 10, so "
                        "the first audio comes sooner (later chunks stay exact; see README)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnivox", description="Streaming runtime for Qwen2.5-Omni.")
    sub = p.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer one message, streaming the text as it is generated")
    ask.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"checkpoint directory or Hugging Face hub id (default {DEFAULT_MODEL})")
    ask.add_argument("--text", required=True, help="the user's message")
    ask.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    ask.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable)")
    ask.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeatable)")
    ask.add_argument("--video", action="append", default=[], metavar="FILE", help="video file (repeatable)")
    ask.add_argument("--use-audio-in-video", action="store_true",
                     help="also listen to the videos' audio tracks (interleaved with the frames)")
    ask.add_argument("--max-new-tokens", type=positive_int, default=512)
    add_sampling_arguments(ask)
    ask.add_argument("--no-audio", action="store_true", help="text only: skip the Talker and token2wav weights")
    ask.add_argument("--out", default=None, metavar="WAV",
                     help="speak the answer into this 24 kHz WAV file, written as the audio is produced")
    ask.add_argument("--speaker", default=None, help="voice from the checkpoint's spk_dict.pt (default Chelsie)")
    ask.add_argument("--max-codec-tokens", type=positive_int, default=4096,
                     help="Talker limit (50 codec tokens per second of speech)")
    ask.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    ask.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ask.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights dtype (auto: the checkpoint's, bf16 for the official files; token2wav stays fp32)")

    serve = sub.add_parser("serve", help="run the realtime server (OpenAI Realtime websocket, chat completions, "
                           "browser pages)")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"checkpoint directory or Hugging Face hub id (default {DEFAULT_MODEL})")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require this key (Authorization: Bearer, or the openai-insecure-api-key. subprotocol)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                       help="browser origin allowed to connect, e.g. https://app.example.com (repeatable)")
    serve.add_argument("--max-sessions", type=positive_int, default=16, help="open websocket sessions at most")
    serve.add_argument("--max-active", type=positive_int, default=4, help="responses generated together")
    serve.add_argument("--max-queued", type=int, default=16, help="responses waiting; more get server_busy")
    serve.add_argument("--max-session-seconds", type=positive_int, default=3600)
    serve.add_argument("--max-output-tokens", type=positive_int, default=1024, help="Thinker tokens per response")
    serve.add_argument("--max-codec-tokens", type=positive_int, default=4096, help="Talker codes per response")
    serve.add_argument("--max-context-tokens", type=positive_int, default=None,
                       help="a conversation's KV cache at most (default: the model's context); older turns are "
                            "dropped past it")
    serve.add_argument("--no-audio", action="store_true", help="text only: skip the Talker and token2wav weights")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights dtype (auto: the checkpoint's; token2wav stays fp32)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    bench = sub.add_parser("bench", help="benchmarks: ours vs the reference implementation, side by side")
    bench.add_argument("what", choices=["thinker", "encoders", "speech", "parity"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help)")

    check = sub.add_parser("doctor", help="check this machine and a checkpoint, one line per check",
                           description=doctor.HELP)
    check.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"checkpoint directory or Hugging Face hub id (default {DEFAULT_MODEL})")
    return p


def sampling_from_args(args, generation: dict):
    """(Thinker, Talker) SamplingParams from the add_sampling_arguments flags (streaming.decoding: their meaning)."""
    from omnivox.streaming.decoding import talker_sampling, thinker_sampling

    thinker = thinker_sampling(generation, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return thinker, talker_sampling(greedy=args.greedy, repetition_penalty=args.repetition_penalty, seed=args.seed)


def resolve_device(name: str) -> str:
    """cpu / cuda / cuda:N / auto -> a torch device name; ValueError when it cannot be used here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA GPU is available")
    return name


FAST_START_STEPS = 4  # ODE time points for the first DiT window with --fast-start (3 RK4 steps instead of 9)


def stream_options(args):
    """token2wav StreamOptions for --fast-start (None: the exact defaults)."""
    if not args.fast_start:
        return None  # the exact defaults
    from omnivox.talker.token2wav import StreamOptions

    return StreamOptions(first_steps=FAST_START_STEPS)


def cmd_ask(args) -> int:
    from omnivox.errors import InputError
    from omnivox.model import load
    from omnivox.streaming.pipeline import (AudioChunk, Done, GenerationOptions, TextDelta, generate,
                                            resolve_speaker, speech_system_prompt, user_messages)
    for kind, paths in (("audio", args.audio), ("image", args.image), ("video", args.video)):
        for path in paths:
            if not os.path.isfile(path):
                raise InputError(f"{kind} file {path} does not exist")
    if args.use_audio_in_video and not args.video:
        raise InputError("--use-audio-in-video needs at least one --video")
    speech = args.out is not None
    if speech and args.no_audio:
        raise InputError("--out asks for speech but --no-audio turns it off; drop one of them")
    if speech:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise InputError(f"cannot write {args.out}: directory {out_dir} does not exist")
    omni = load(args.model, device=resolve_device(args.device), dtype=args.dtype, audio=speech)
    if speech:
        resolve_speaker(omni, args.speaker)
    sampling, talker_sampling = sampling_from_args(args, omni.config.generation)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling,
                                use_audio_in_video=args.use_audio_in_video, audio=speech, speaker=args.speaker,
                                talker_sampling=talker_sampling, max_codec_tokens=args.max_codec_tokens,
                                talker_codec_prompt=args.talker_codec_prompt,
                                token2wav=stream_options(args))
    system = args.system if args.system is not None else (speech_system_prompt(omni) if speech else None)
    messages = user_messages(args.text, system, audios=args.audio, images=args.image, videos=args.video)
    done, wav = None, None
    try:
        if speech:
            import soundfile as sf

            wav = sf.SoundFile(args.out, mode="w", samplerate=24000, channels=1, subtype="PCM_16", format="WAV")
        for event in generate(omni, messages, options):
            if isinstance(event, TextDelta) and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, AudioChunk):
                wav.write(event.samples)
                wav.flush()
            elif isinstance(event, Done):
                done = event
    finally:
        if wav is not None:
            wav.close()
    if args.json:
        out = {
            "text": done.text,
            "token_ids": done.token_ids,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "timings": {"load_s": round(omni.load_s, 3), **done.timings},
        }
        if speech:
            out.update(codec_ids=done.codec_ids, audio=os.path.abspath(args.out),
                       audio_seconds=round(done.audio_seconds, 4))
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def cmd_serve(args) -> int:
    import socket

    from omnivox.errors import InputError
    from omnivox.model import load
    from omnivox.server.app import ServerOptions, create_app, uvicorn_config
    from omnivox.server.realtime import SessionLimits

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queued < 0:
        raise InputError("--max-queued must be >= 0")
    try:  # fail before loading the model when the address is taken
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    omni = load(args.model, device=resolve_device(args.device), dtype=args.dtype, audio=not args.no_audio)
    if omni.config.family == "qwen3":
        raise InputError(f"{omni.path} is a Qwen3-Omni checkpoint: `omnivox serve` runs Qwen2.5-Omni only so far "
                         "(multi-turn sessions are not wired for Qwen3-Omni yet); `omnivox ask` and "
                         "demos/offline_qa.py run it")
    limits = SessionLimits(max_session_s=args.max_session_seconds, max_output_tokens=args.max_output_tokens,
                           max_codec_tokens=args.max_codec_tokens, max_context_tokens=args.max_context_tokens)
    options = ServerOptions(host=args.host, port=args.port, api_key=args.api_key,
                            allow_origins=tuple(args.allow_origin), max_sessions=args.max_sessions,
                            max_active=args.max_active, max_queued=args.max_queued, limits=limits)
    import uvicorn

    uvicorn.Server(uvicorn_config(create_app(omni, options), options, log_level=args.log_level)).run()
    return 0


def cmd_bench(args) -> int:
    # Benchmarks import the reference implementation (a test-only dependency), so they live in the source
    # checkout's benchmarks/ folder rather than in the runtime package.
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.what}.py"
    if not script.is_file():
        raise ValueError(f"benchmark script {script} not found: benchmarks run from a source checkout "
                         "(pip install -e '.[test]')")
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    from omnivox.errors import OmnivoxError

    args = _parser().parse_args(argv)
    try:
        if args.command == "ask":
            return cmd_ask(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "doctor":
            return doctor.main(args.model)
    except (OmnivoxError, ValueError) as e:
        print(f"omnivox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnivox: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # unexpected: say so in one line, keep the traceback for OMNIVOX_DEBUG=1
        if os.environ.get("OMNIVOX_DEBUG"):
            raise
        print(f"omnivox: internal error: {type(e).__name__}: {e} (set OMNIVOX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
