"""`omnivox doctor`: is this machine ready to run a model? One line per check, ✓ or ✗ with the fix.

Nothing is downloaded and no weights are loaded: the checkpoint's parts come from `checkpoint_files.check_parts`
(the loader's own completeness check) and its memory from the config's shapes on the meta device. Every check runs
guarded (torch is imported inside its checks), so a broken install is a ✗ line, never a traceback.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omnivox.checkpoint_files import size_text

HELP = """\
Checks, one line each, ✓ or ✗ with the fix. Required (exit code 1 when one fails): Python, torch, PyAV's audio
and video decoders, the checkpoint's parts (config, weights, tokenizer, processor, speakers) and memory for its
weights. Informative (never change the exit code): CPU features, CUDA, the chat template (a built-in one is the
fallback), the Hugging Face Hub (only while the model still has to be downloaded), ffmpeg on PATH (PyAV brings its
own FFmpeg) and Chromium (browser tests only). Exit code 0 when every required check passes."""

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 4)
DECODERS = ("aac", "mp3", "h264")                 # m4a audio, mp3 audio, the usual video codec
CHROMIUM = "/usr/bin/chromium"                    # what the browser tests drive (tests/browser_support.py)
WORKING_MEMORY = 2**30                            # beside the weights: KV caches, activations (an estimate)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _guarded(name: str, required: bool, check) -> list[Check]:
    """Run one check; an unexpected error is its ✗ line."""
    try:
        out = check()
        return out if isinstance(out, list) else [out]
    except Exception as e:
        return [Check(name, False, f"the check itself failed: {type(e).__name__}: {e}", required=required)]


# ---- the platform

def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] >= MIN_PYTHON:
        return Check("python", True, f"{version} ({sys.executable})")
    return Check("python", False, f"{version} is too old", f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer")


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:  # not installed, or a broken wheel
        return Check("torch", False, f"cannot import torch ({type(e).__name__}: {e})",
                     "pip install torch==2.13.0 (README set-up)")
    version = torch.__version__
    numbers = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    if numbers < MIN_TORCH:
        return Check("torch", False, f"{version} is too old", f"pip install torch==2.13.0 (needs >= "
                                                                 f"{'.'.join(map(str, MIN_TORCH))})")
    return Check("torch", True, f"{version} ({build})")


def cpu_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    name, flags = platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and name == platform.machine():
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def check_cpu() -> Check:
    import torch

    info = Path("/proc/cpuinfo")
    name, flags = cpu_flags(info.read_text(errors="replace") if info.is_file() else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kernels = torch.backends.cpu.get_cpu_capability()
    def yes(*names):
        return "yes" if set(names) & flags else "no"

    detail = (f"{name}, {cores} cores, torch kernels {kernels}; native bf16 {yes('avx512_bf16', 'amx_bf16')}, "
              f"VNNI {yes('avx512_vnni', 'avx_vnni')}, AMX {yes('amx_bf16', 'amx_int8')} "
              f"({' '.join(('+' if f in flags else '-') + f for f in CPU_FLAGS)})")
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    if x86 and "avx2" not in flags:
        return Check("cpu", False, detail, "no AVX2: torch runs its slowest kernels; expect slow generation",
                     required=False)
    return Check("cpu", True, detail, required=False)


def check_cuda() -> Check:
    import torch

    if not torch.cuda.is_available():
        fix = ""
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            fix = "this torch is a CPU-only build but the machine has an NVIDIA driver: install a CUDA build of torch"
        return Check("cuda", False, f"no CUDA GPU visible to torch {torch.__version__}: omnivox runs on the CPU", fix,
                     required=False)
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    more = f" (+{count - 1} more)" if count > 1 else ""
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    return Check("cuda", True, f"{props.name}{more}, compute {props.major}.{props.minor}, {bf16}, "
                               f"{size_text(free)} free of {size_text(total)}", required=False)


def check_pyav() -> Check:
    try:
        import av
    except Exception as e:
        return Check("pyav", False, f"cannot import av ({type(e).__name__}: {e})", "pip install av")
    missing = []
    for codec in DECODERS:
        try:
            av.codec.Codec(codec, "r")
        except Exception:
            missing.append(codec)
    ffmpeg = getattr(av, "ffmpeg_version_info", "?")
    if missing:
        return Check("pyav", False, f"PyAV {av.__version__} (FFmpeg {ffmpeg}) lacks the {', '.join(missing)} "
                                    "decoder(s)", "pip install --force-reinstall av (the wheel bundles them)")
    return Check("pyav", True, f"PyAV {av.__version__} (FFmpeg {ffmpeg}): decoders {', '.join(DECODERS)}")


def check_ffmpeg() -> Check:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return Check("ffmpeg", False, "not on PATH; omnivox does not need it (PyAV brings its own FFmpeg)",
                     "apt-get install ffmpeg, to convert media yourself", required=False)
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=5).stdout
        version = (out.splitlines() or ["?"])[0]
    except (OSError, subprocess.TimeoutExpired) as e:
        version = f"does not run ({type(e).__name__})"
    return Check("ffmpeg", True, f"{exe}: {version}", required=False)


def check_chromium() -> Check:
    if os.access(CHROMIUM, os.X_OK):
        return Check("chromium", True, f"{CHROMIUM} (for the browser tests)", required=False)
    return Check("chromium", False, f"{CHROMIUM} not found: only the browser tests need it",
                 "apt-get install chromium", required=False)


# ---- the checkpoint

def locate(model: str) -> tuple[Path | None, bool, list[Check]]:
    """(directory to check or None, whether it is a hub id, lines about where it is), with no network request."""
    from omnivox.checkpoint_files import cached_snapshot, hub_download_advice, is_hub_id

    path = Path(model).expanduser()
    if path.is_dir():
        return path, False, [Check("checkpoint", True, str(path.resolve()))]
    if path.exists():
        return None, False, [Check("checkpoint", False, f"{model} is a file", "--model takes a checkpoint directory")]
    if not is_hub_id(model):
        return None, False, [Check("checkpoint", False, f"model directory {model} does not exist",
                                   "pass --model DIR of a checkpoint, or a hub id such as Qwen/Qwen2.5-Omni-3B")]
    try:
        cached = cached_snapshot(model)
    except ImportError:
        return None, True, [Check("checkpoint", False, f"{model} is a hub id but huggingface_hub is not installed",
                                  "pip install huggingface_hub, or pass --model DIR")]
    lines = [Check("checkpoint", True, f"{model}: downloaded ({cached})") if cached else
             Check("checkpoint", False, f"{model} is not downloaded", hub_download_advice(model))]
    return cached, True, lines


def hub_line(model: str) -> Check:
    from omnivox.checkpoint_files import hub_offline, hub_problem

    if hub_offline():
        return Check("hub", False, "offline mode is on (HF_HUB_OFFLINE): nothing can be downloaded",
                     "unset HF_HUB_OFFLINE to download", required=False)
    problem = hub_problem(model)
    if problem:
        return Check("hub", False, problem, "download on a machine that reaches it and copy the folder: --model DIR",
                     required=False)
    return Check("hub", True, f"{model} can be downloaded", required=False)


def check_checkpoint(model: str) -> list[Check]:
    from omnivox.checkpoint_files import check_parts, hub_download_advice

    root, hub, lines = locate(model)
    if root is not None:
        for part in check_parts(root, speech=True):
            fix = ""
            if part.missing:
                fix = (hub_download_advice(model) if hub else
                       f"copy {', '.join(part.missing)} from the original checkpoint "
                       "(`hf download Qwen/Qwen2.5-Omni-3B --local-dir DIR` fetches a whole one)")
            lines.append(Check(part.name, part.ok, part.detail, fix, part.required))
    if hub and not all(c.ok for c in lines if c.required):
        lines.append(hub_line(model))
    return lines


def model_nbytes(root: Path) -> int:
    """Bytes of the weights `omnivox.load(root)` fills (speech included when the config has it): counted on a
    meta-built model, so the fp32 token2wav counts in fp32; the weight files' size when no model can be built."""
    from omnivox.config import OmniConfig

    try:
        from omnivox.loading import checkpoint_dtype, loaded_nbytes
        from omnivox.model import build_meta

        cfg = OmniConfig.from_dir(root)
        return loaded_nbytes(build_meta(cfg, audio_output=cfg.speaks),
                             checkpoint_dtype(cfg.dtype))
    except Exception:
        return sum(f.stat().st_size for f in root.glob("*.safetensors"))


def available_memory() -> tuple[str, int | None]:
    """(where the weights go, bytes free there): the first CUDA GPU when torch sees one (as --device auto), else
    RAM (MemAvailable)."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0 memory", torch.cuda.mem_get_info(0)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "RAM", int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return "RAM", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "RAM", None


def check_memory(model: str) -> Check:
    root = locate(model)[0]
    where, free = available_memory()
    have = f"{size_text(free)} {where} available" if free is not None else f"{where} available: unknown"
    if root is None or not (root / "config.json").is_file():
        return Check("memory", True, f"{have}; the model's size is known once it is downloaded", required=False)
    weights = model_nbytes(root)
    need = weights + WORKING_MEMORY
    detail = f"{have}; the weights take {size_text(weights)} (+ ~{size_text(WORKING_MEMORY)} working memory)"
    if free is None or free >= need:
        return Check("memory", True, detail)
    return Check("memory", False, detail, "close other programs, or use a smaller model (Qwen/Qwen2.5-Omni-3B) "
                                          "or --no-audio (skips the speech weights)")


# ---- all of it

def run_checks(model: str) -> list[Check]:
    checks = []
    for name, required, check in (("python", True, check_python), ("torch", True, check_torch),
                                  ("cpu", False, check_cpu), ("cuda", False, check_cuda),
                                  ("pyav", True, check_pyav), ("ffmpeg", False, check_ffmpeg),
                                  ("chromium", False, check_chromium),
                                  ("checkpoint", True, lambda: check_checkpoint(model)),
                                  ("memory", True, lambda: check_memory(model))):
        checks += _guarded(name, required, check)
    return checks


def format_check(c: Check, marks: tuple[str, str] = ("✓", "✗")) -> str:
    line = f"{marks[0] if c.ok else marks[1]} {c.name}: {c.detail}"
    if not c.ok and c.fix:
        line += f" — fix: {c.fix}"
    if not c.ok and not c.required:
        line += " (informative)"
    return line


def main(model: str) -> int:
    """Print every check; 0 when all required ones pass, else 1."""
    encoding = sys.stdout.encoding or "ascii"
    try:
        "✓✗—".encode(encoding)
        marks = ("✓", "✗")
    except (UnicodeEncodeError, LookupError):
        marks = ("ok", "XX")
    checks = run_checks(model)
    for c in checks:
        line = format_check(c, marks)
        print(line.encode(encoding, errors="replace").decode(encoding), flush=True)
    failed = [c.name for c in checks if c.required and not c.ok]
    print(f"omnivox doctor: {len(failed)} required check(s) failed: {', '.join(failed)}" if failed else
          "omnivox doctor: ready (all required checks pass)")
    return 1 if failed else 0
