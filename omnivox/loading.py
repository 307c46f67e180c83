"""Reading a checkpoint: its tensors (lazy, memory-mapped), its speakers, its dtype (where it lives and whether
it is complete: `checkpoint_files`).

No model is built here; the facade builds modules on the meta device and calls `load_module`. The contract
with model code:

- Parameter and persistent-buffer names are the raw safetensors names below a prefix, so loading is a strict
  name-for-name match (missing, unexpected and wrongly shaped tensors are one CheckpointError).
- Floating-point tensors are cast to the requested dtype, except inside any submodule that sets the class or
  instance attribute `keep_fp32 = True` (token2wav): everything below it stays float32. Non-float tensors keep
  the dtype the module declared.
- Parameters are loaded with requires_grad=False (this is an inference runtime).
- Non-persistent buffers (RoPE tables, filterbanks, windows: computed, not stored) are still on the meta device
  after the tensors are assigned. `load_module` then calls `reset_buffers()` (no arguments) on every submodule
  that defines it, inside `with torch.device(device)`, so factory calls without an explicit device land on the
  load device; `reset_buffers` must rebuild every such buffer from config numbers (never read a meta tensor).
  A buffer still on meta afterwards is an error naming it.

Tensors are read one at a time. One kept in the checkpoint's own dtype on the CPU is a copy-on-write view of
the file mapped by `safetensors.safe_open` (no copy at all); one that is cast or moved to a GPU is read into a
transient buffer with plain file reads and converted, so no mapped file pages pile up beside the converted
weights. Peak RSS stays near the size of the loaded weights (plus one tensor).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

from omnivox.checkpoint_files import short_list, weight_map
from omnivox.errors import CheckpointError, InputError

# ---- safetensors files

_TORCH_DTYPE = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _read_header(file: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file, checked against the file size (no tensor data is read)."""
    def bad(why):
        return CheckpointError(f"{file} is truncated or corrupt ({why}); download it again")

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise bad(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets") from None
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} ends at byte {end} of {data_size} data bytes")
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")
        tensors[name] = {"dtype": dtype, "shape": tuple(shape), "offset": 8 + n + begin, "nbytes": end - begin}
    return tensors


class Checkpoint:
    """The tensors of a checkpoint directory, by raw name; each is read (memory-mapped) only when asked for."""

    def __init__(self, root: Path, files: dict[str, Path], headers: dict[Path, dict[str, dict]]):
        self.root = root
        self._file_of = files               # tensor name -> file
        self._headers = headers             # file -> {name: {dtype, shape}}
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, path) -> "Checkpoint":
        from safetensors import safe_open

        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model directory {root} does not exist")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            files = {k: root / v for k, v in weight_map(index).items()}
            missing = sorted({f.name for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{root} is incomplete: {index.name} lists {len(missing)} missing file(s): "
                                      f"{', '.join(missing[:5])}")
            shards = sorted(set(files.values()))
        elif (root / "model.safetensors").is_file():
            shards, files = [root / "model.safetensors"], None
        else:
            shards, files = sorted(root.glob("*.safetensors")), None
            if not shards:
                raise CheckpointError(f"{root} holds no model weights (model.safetensors or "
                                      "model.safetensors.index.json with its shards)")
        headers = {f: _read_header(f) for f in shards}
        if files is None:
            files = {}
            for f in shards:
                for name in headers[f]:
                    if name in files:
                        raise CheckpointError(f"tensor {name} is stored twice: in {files[name].name} and {f.name}")
                    files[name] = f
        else:
            for name, f in files.items():
                if name not in headers[f]:
                    raise CheckpointError(f"{index.name} places {name} in {f.name}, which does not hold it")
        ckpt = cls(root, files, headers)
        for f in shards:  # safetensors' own checks too, up front, so a bad file never fails mid-load
            try:
                ckpt._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{f} is truncated or corrupt ({e}); download it again") from None
        return ckpt

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header, without reading the tensor."""
        return self._headers[self._file(name)][name]["shape"]

    def dtype(self, name: str) -> torch.dtype | None:
        """Stored dtype from the header (None for a dtype torch lacks)."""
        return _TORCH_DTYPE.get(self._headers[self._file(name)][name]["dtype"])

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a copy-on-write view of the memory-mapped file (pages are read when touched)."""
        file = self._file(name)
        try:
            return self._handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file} could not be read at tensor {name} ({e})") from None

    def nbytes(self, name: str) -> int:
        return self._headers[self._file(name)][name]["nbytes"]

    def read(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor read with plain file reads (no mapping stays behind once it is converted and dropped).

        scratch: a uint8 CPU buffer of at least `nbytes(name)` to read into (no fresh allocation); the result is
        then a view of it, valid until the buffer is reused. Without it the result is a private copy.
        """
        file = self._file(name)
        info = self._headers[file][name]
        dtype = _TORCH_DTYPE.get(info["dtype"])
        if dtype is None:
            return self.get(name).clone()
        if scratch is None:
            buf = torch.empty(info["nbytes"], dtype=torch.uint8)
        else:
            buf = scratch[:info["nbytes"]]
        try:
            with open(file, "rb") as fh:
                fh.seek(info["offset"])
                got = fh.readinto(memoryview(buf.numpy())) if info["nbytes"] else 0
        except OSError as e:
            raise CheckpointError(f"{file} could not be read at tensor {name} ({e})") from None
        if got != info["nbytes"]:
            raise CheckpointError(f"{file} is truncated at tensor {name} (it changed after it was opened?)")
        return buf.view(dtype).reshape(info["shape"])

    def close(self) -> None:
        """Drop the file handles (tensors already loaded stay valid)."""
        self._handles.clear()

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.root} holds no tensor {name}") from None


# ---- filling a meta-built module

def _dtype_rule(module: nn.Module, dtype: torch.dtype):
    """(name, declared dtype) -> the dtype `load_module` gives it: `dtype` for floats, float32 below keep_fp32."""
    fp32_roots = [name for name, m in module.named_modules() if getattr(m, "keep_fp32", False) is True]

    def target_dtype(name: str, declared: torch.dtype) -> torch.dtype:
        if not declared.is_floating_point:
            return declared
        for root in fp32_roots:
            if root == "" or name.startswith(root + "."):
                return torch.float32
        return dtype

    return target_dtype


def loaded_nbytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the tensors `load_module(module, ..., dtype=dtype)` fills take (a meta-built module is enough)."""
    target_dtype = _dtype_rule(module, dtype)
    seen, total = set(), 0
    for name, t in module.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        if id(t) not in seen:  # tied parameters count once
            seen.add(id(t))
            total += t.numel() * target_dtype(name, t.dtype).itemsize
    return total


def load_module(module: nn.Module, ckpt: Checkpoint, prefix: str, *, dtype: torch.dtype, device="cpu",
                tied: dict[str, str] | None = None, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Fill `module` (built on the meta device) from the checkpoint tensors named `prefix + name`.

    tied: {missing name: name it shares}, relative to `module` (e.g. {"lm_head.weight": "model.embed_tokens.weight"});
    both end up as one Parameter. ignore_prefixes: checkpoint names below `prefix` that this module does not load
    (relative to `prefix`; full names are accepted too). See the module docstring for keep_fp32 and reset_buffers.
    """
    device = torch.device(device)
    tied = dict(tied or {})
    target_dtype = _dtype_rule(module, dtype)

    # what the module wants: parameters and persistent buffers, by full dotted name
    wanted: dict[str, tuple[nn.Module, str, torch.Tensor, bool]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        base = mod_name + "." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                wanted.setdefault(base + n, (mod, n, p, True))
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                wanted.setdefault(base + n, (mod, n, b, False))
    for src, dst in tied.items():
        if src not in wanted or dst not in wanted:
            raise ValueError(f"tied names {src} -> {dst} are not both parameters of the module")

    ignored = tuple(ignore_prefixes)
    present = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]
    present = [k for k in present if not k.startswith(ignored) and not (prefix + k).startswith(ignored)]
    present_set = set(present)
    missing = sorted(prefix + n for n in wanted if n not in present_set and n not in tied)
    unexpected = sorted(prefix + k for k in present if k not in wanted)
    mismatched = sorted(f"{prefix + n} (checkpoint {list(ckpt.shape(prefix + n))}, model {list(t.shape)})"
                        for n, (_, _, t, _) in wanted.items()
                        if n in present_set and n not in tied and tuple(ckpt.shape(prefix + n)) != tuple(t.shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {short_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape: {short_list(mismatched, 3)}")
        raise CheckpointError(f"{ckpt.root} does not match the model{f' under {prefix!r}' if prefix else ''}: "
                              + "; ".join(parts) + " (wrong model size or not a Qwen2.5-Omni checkpoint?)")

    plan = {}  # name -> (checkpoint key, dtype, zero-copy?)
    for name, (_, _, declared, _) in wanted.items():
        if name not in tied:
            key, want = prefix + name, target_dtype(name, declared.dtype)
            plan[name] = (key, want, device.type == "cpu" and ckpt.dtype(key) == want)
    # one read buffer, reused: converted tensors are fresh copies (a cast, or a host -> GPU copy)
    scratch = torch.empty(max([ckpt.nbytes(k) for k, _, zc in plan.values() if not zc] or [0]), dtype=torch.uint8)
    loaded: dict[str, nn.Parameter] = {}
    for name, (key, want, zero_copy) in plan.items():
        mod, attr, _, is_param = wanted[name]
        if zero_copy:
            t = ckpt.get(key)  # a view of the mapped file
        else:
            t = ckpt.read(key, scratch).to(device=device, dtype=want, copy=True)
        if is_param:
            t = nn.Parameter(t, requires_grad=False)
            loaded[name] = t
            mod._parameters[attr] = t
        else:
            mod._buffers[attr] = t
    for src, dst in tied.items():
        mod, attr, _, _ = wanted[src]
        mod._parameters[attr] = loaded[dst]

    with torch.device(device):
        for mod in module.modules():
            reset = getattr(mod, "reset_buffers", None)
            if callable(reset):
                reset()
    still_meta = [f"{n}" for n, b in module.named_buffers() if b is not None and b.is_meta]
    still_meta += [f"{n}" for n, p in module.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"after loading, {short_list(still_meta)} are still on the meta device: their module must "
                              "define reset_buffers() to rebuild computed buffers (model-code bug)")


# ---- speakers and dtypes

def load_speakers(path) -> dict[str, dict]:
    """spk_dict.pt (or the directory holding it) -> {name: {bos_token: int, cond: (1, D), ref_mel: (1, T, M)}}."""
    file = Path(path)
    if file.is_dir():
        file = file / "spk_dict.pt"
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: the checkpoint has no speakers (needed for speech output)")
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{file} is not a readable speaker file ({type(e).__name__}: {why})") from None
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{file} must hold a non-empty dict of speakers")
    speakers = {}
    for name, spk in raw.items():
        where = f"{file}: speaker {name!r}"
        if not isinstance(name, str) or not isinstance(spk, dict):
            raise CheckpointError(f"{where} must map a name to a dict")
        bos, cond, ref = spk.get("bos_token"), spk.get("cond"), spk.get("ref_mel")
        if isinstance(bos, torch.Tensor) and bos.numel() == 1 and not bos.is_floating_point():
            bos = bos.item()
        if not isinstance(bos, int) or isinstance(bos, bool):
            raise CheckpointError(f"{where} has no integer bos_token")
        if not isinstance(cond, torch.Tensor) or cond.dim() != 2 or cond.shape[0] != 1:
            raise CheckpointError(f"{where}: cond must be a (1, D) tensor, got "
                                  f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        if not isinstance(ref, torch.Tensor) or ref.dim() != 3 or ref.shape[0] != 1 or ref.shape[1] == 0:
            raise CheckpointError(f"{where}: ref_mel must be a (1, T, mel bins) tensor, got "
                                  f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}")
        speakers[name] = {"bos_token": int(bos), "cond": cond.float(), "ref_mel": ref.float()}
    dims = {(s["cond"].shape[1], s["ref_mel"].shape[2]) for s in speakers.values()}
    if len(dims) > 1:
        raise CheckpointError(f"{file}: speakers disagree on (cond size, mel bins): {sorted(dims)}")
    return speakers


_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def checkpoint_dtype(name: str | torch.dtype, saved: str = "bfloat16") -> torch.dtype:
    """A dtype option ("bfloat16", "float16", "float32", "auto" = `saved`, the dtype the checkpoint was saved in)."""
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise InputError(f"unsupported dtype {name}; use bfloat16, float16 or float32")
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        key = str(saved).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InputError(f"dtype auto: the checkpoint's dtype {saved!r} is not bfloat16, float16 or float32")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {name!r}; use bfloat16, float16, float32 or auto")
    return _DTYPES[key]
