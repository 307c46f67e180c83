"""Where a checkpoint lives and whether it holds every file a run needs; no torch, so it answers in a blink.

`check_parts` is the one completeness check: the loader refuses a directory (or a cached hub snapshot) whose
required parts are missing, and `omnivox doctor` prints the same parts one line each. A hub id is looked up in
the huggingface_hub cache without any network request first, so a model downloaded once runs offline; only a
model that is not (completely) cached costs one request, with a hard deadline, before a download starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from omnivox.errors import CheckpointError

# What `resolve_model_path` fetches from the hub: the files a checkpoint directory needs, nothing else.
HUB_PATTERNS = ["*.json", "*.safetensors", "spk_dict.pt", "merges.txt", "vocab.json", "*.jinja"]
# Hard deadline (DNS, connect and answer together) for the one request that decides, before a download starts,
# whether the Hub can be reached: huggingface_hub's API requests have no timeout of their own, so a network that
# drops packets (or an endpoint that never answers) would otherwise hang the first run.
HUB_TIMEOUT_S = 5.0

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def short_list(items: list[str], limit: int = 5) -> str:
    """'a, b, c' or 'a, b, ... (12 in all)'."""
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ---- which files a checkpoint directory needs

@dataclass(frozen=True)
class Part:
    """One part of a checkpoint directory as found on disk."""
    name: str                      # "config", "weights", "tokenizer", "processor", "speakers", "chat template"
    ok: bool
    detail: str                    # what was found, or what is wrong
    missing: tuple[str, ...] = ()  # file names absent (or empty): what a download would bring
    required: bool = True          # a run needs it (the chat template has a built-in fallback)


def weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json -> {tensor name: shard file name}."""
    try:
        table = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(k): str(v) for k, v in table.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None


def _size(f: Path) -> int:
    """Bytes of a regular file (a cache symlink is followed); 0 when absent: an empty file counts as missing."""
    try:
        return f.stat().st_size if f.is_file() else 0
    except OSError:
        return 0


def size_text(n: int) -> str:
    """'10.4 GiB', or '8.4 MiB' below a tenth of a GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def check_parts(root: Path, speech: bool = True) -> list[Part]:
    """The parts of checkpoint directory `root`: config.json (a Qwen2.5-Omni or Qwen3-Omni one), the weights (every shard the
    index names), the tokenizer (tokenizer.json or vocab.json + merges.txt), the processor config (audio, image
    and video input), with `speech` the speakers (spk_dict.pt, or for Qwen3-Omni the voices config.json names; not
    for a config without a talker), and the chat
    template. Only config.json, the
    shard index and the template sources are read; the tensors are the loader's business."""
    from omnivox.config import OmniConfig
    from omnivox.thinker.tokenizer import find_chat_template

    def has(name: str) -> bool:
        return _size(root / name) > 0

    parts = []
    if not has("config.json"):
        parts.append(Part("config", False, "config.json missing: not a model checkpoint directory", ("config.json",)))
    else:
        try:
            cfg = OmniConfig.from_dir(root)
            speech_note = "" if cfg.speaks else ", no talker: text only"
            speech = speech and not speech_note  # a text-only checkpoint needs no speakers (the loader says why)
            parts.append(Part("config", True, f"config.json ({cfg.model_type}{speech_note})"))
            if cfg.family == "qwen3":   # its voices are named in config.json (talker_config.speaker_id)
                voices = (cfg.talker or {}).get("speaker_id") or {}
                if speech:
                    parts.append(Part("speakers", bool(voices), f"{len(voices)} voices in config.json" if voices else
                                      "config.json names no voices (talker_config.speaker_id)"))
                speech = False
        except CheckpointError as e:
            parts.append(Part("config", False, str(e)))

    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(weight_map(index).values()))
            gone = tuple(f for f in shards if not has(f))
            size = sum(_size(root / f) for f in shards)
            parts.append(Part("weights", True, f"{len(shards)} shards, {size_text(size)}") if not gone else
                         Part("weights", False, f"{len(gone)} of {len(shards)} shards missing: "
                                                f"{short_list(list(gone))}", gone))
        except CheckpointError as e:
            parts.append(Part("weights", False, str(e), (index.name,)))
    else:
        files = sorted(f for f in root.glob("*.safetensors") if _size(f) > 0)
        parts.append(Part("weights", True, f"{short_list([f.name for f in files], 2)}, "
                                           f"{size_text(sum(map(_size, files)))}") if files else
                     Part("weights", False, "no model.safetensors (or index with shards)", ("model.safetensors",)))

    if has("tokenizer.json"):
        parts.append(Part("tokenizer", True, "tokenizer.json"))
    elif has("vocab.json") and has("merges.txt"):
        parts.append(Part("tokenizer", True, "vocab.json + merges.txt"))
    else:
        parts.append(Part("tokenizer", False, "tokenizer.json (or vocab.json + merges.txt) missing",
                          ("tokenizer.json",)))

    found = [n for n in ("preprocessor_config.json", "processor_config.json") if has(n)]
    parts.append(Part("processor", True, " + ".join(found)) if found else
                 Part("processor", False, "preprocessor_config.json (or processor_config.json) missing: needed for "
                                          "audio, image and video input", ("preprocessor_config.json",)))

    if speech:
        parts.append(Part("speakers", True, "spk_dict.pt") if has("spk_dict.pt") else
                     Part("speakers", False, "spk_dict.pt missing: needed for speech (--no-audio runs text only)",
                          ("spk_dict.pt",)))

    try:
        where = find_chat_template(root)[1]
        parts.append(Part("chat template", True, where) if where != "built-in" else
                      Part("chat template", False, "none in the checkpoint: the built-in official template is used",
                           ("chat_template.json",), required=False))
    except (ValueError, OSError) as e:  # a template list without a default, unreadable JSON
        parts.append(Part("chat template", False, str(e)))
    return parts


def missing_files(root: Path, speech: bool = True) -> list[str]:
    """The files a run needs that `root` lacks (an empty file counts as missing), by name."""
    return [f for p in check_parts(root, speech) if p.required for f in p.missing]


# ---- local directory or hub id

def is_hub_id(model: str) -> bool:
    """`model` names a hub repository ("Qwen/Qwen2.5-Omni-3B") rather than a path (no local directory checked)."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


def hub_download_advice(model: str) -> str:
    """The fix for a hub id that is not (completely) on this machine."""
    hf = "hf"
    if shutil.which("hf") is None and (Path(sys.executable).parent / "hf").is_file():
        hf = str(Path(sys.executable).parent / "hf")  # a virtual environment that is not activated
    return f"get it with `{hf} download {model}` or pass a local checkpoint: --model DIR"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_path(model: str, offline: bool | None = None, speech: bool = True) -> Path:
    """A complete local checkpoint directory, or a hub id ("Qwen/Qwen2.5-Omni-3B") found in or fetched into the
    huggingface_hub cache.

    A directory (or cached snapshot) counts as complete when `missing_files` finds nothing (spk_dict.pt only with
    `speech`). A complete cached snapshot is used without any network request. Otherwise one request with a hard
    HUB_TIMEOUT_S deadline decides whether the Hub can be reached before a download starts: no connection, an
    unknown repository or offline mode is one CheckpointError within seconds, never a hang.
    offline: None reads HF_HUB_OFFLINE.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        missing = missing_files(path, speech=speech)
        if "config.json" in missing:
            raise CheckpointError(f"{path} has no config.json: not a model checkpoint directory")
        if missing:
            raise CheckpointError(f"{path} is incomplete: {short_list(missing)} missing "
                                  f"(`omnivox doctor --model {model}` lists every part)")
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; --model takes a checkpoint directory or a hub id")
    if not is_hub_id(model):
        raise CheckpointError(f"model directory {model} does not exist")
    offline = hub_offline() if offline is None else offline
    advice = hub_download_advice(model)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{model} is not a local directory and huggingface_hub is not installed to fetch it; "
                              + advice) from None
    cached = cached_snapshot(model)
    missing = missing_files(cached, speech=speech) if cached is not None else []
    if cached is not None and not missing:
        return cached
    have = (f"the downloaded copy of {model} is incomplete ({short_list(missing, 3)} missing)" if cached
            else f"{model} is neither a local directory nor downloaded")
    if offline:
        raise CheckpointError(f"{have} and offline mode is on (HF_HUB_OFFLINE); {advice}")
    unreachable = hub_problem(model)
    if unreachable:
        raise CheckpointError(f"{have}, and {unreachable}; {advice}")
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id=model, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # gated, disk full, the network went away mid-download: all mean "get it yourself"
        raise CheckpointError(f"could not download {model} from the Hugging Face Hub ({_first_sentence(e)}); "
                              + advice) from None
    return Path(snapshot)


def cached_snapshot(model: str) -> Path | None:
    """The huggingface_hub cache's snapshot of hub id `model` (complete or not), found without any network request."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=model, allow_patterns=HUB_PATTERNS,
                                                      local_files_only=True))
    except Exception as e:  # not cached; recent versions say which snapshot is incomplete
        where = getattr(e, "snapshot_path", None)
        return Path(where) if where and Path(where).is_dir() else None


def hub_problem(model: str) -> str | None:
    """Why the Hub cannot serve `model` right now (unreachable, no answer in time, no such repository), or None.

    The request runs on a daemon thread so that the deadline also bounds name resolution, which no HTTP timeout
    covers; a thread still waiting on a dead network is abandoned.
    """
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    outcome: list = []

    def ask():
        try:
            huggingface_hub.HfApi().repo_info(model, timeout=HUB_TIMEOUT_S)
            outcome.append(None)
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=ask, name="omnivox-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    endpoint = huggingface_hub.constants.ENDPOINT
    if not outcome:
        return f"the Hugging Face Hub ({endpoint}) did not answer within {HUB_TIMEOUT_S:g} s"
    error = outcome[0]
    if error is None:
        return None
    if isinstance(error, RepositoryNotFoundError):
        return (f"the Hugging Face Hub has no model {model} (check the name; a private or gated one needs "
                "`hf auth login`)")
    return f"the Hugging Face Hub ({endpoint}) cannot be reached ({_first_sentence(error)})"


def _first_sentence(e: Exception) -> str:
    # huggingface_hub's messages run over lines and name its keyword arguments, not our options
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
