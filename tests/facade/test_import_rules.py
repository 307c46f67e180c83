"""The house's import rule, read from the source (ast; nothing is imported): imports run one way, facade and
server -> streaming -> model parts. Model parts import nothing above them, the Thinker never imports the Talker,
streaming never imports the server, the facade or the CLI, protocol code reaches model code only through
streaming, only the CLI starts the server, and the package never imports demos/ or benchmarks/. Lazy imports
inside functions, relative imports and importlib.import_module("...") count like any other import.

The same checker is fed one synthetic file per rule, so a violation is shown to be caught."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# each top-level folder of the package and the import name pyproject's package-dir maps it to
FOLDERS = {"omnivox": "omnivox", "server": "omnivox.server", "streaming": "omnivox.streaming",
           "thinker": "omnivox.thinker", "talker": "omnivox.talker", "encoders": "omnivox.encoders"}
OUTSIDE = ("demos", "benchmarks")           # folders that use the package; it never imports them
MODEL = {"thinker", "talker", "encoders"}
ABOVE_MODEL = {"streaming", "server", "facade", "cli"}
# importer's room -> {room it may not import: why}
FORBIDDEN = {
    "thinker": {**dict.fromkeys(ABOVE_MODEL, "model code imports nothing above it"),
                "talker": "the Thinker never imports the Talker"},
    "talker": dict.fromkeys(ABOVE_MODEL, "model code imports nothing above it"),
    "encoders": dict.fromkeys(ABOVE_MODEL, "model code imports nothing above it"),
    "streaming": dict.fromkeys(("server", "facade", "cli"), "streaming imports only itself and model code"),
    "server": {**dict.fromkeys(MODEL, "protocol code reaches model code only through streaming"),
               "cli": "the server never imports the CLI"},
    "facade": {"server": "only the CLI imports the server", "cli": "the facade never imports the CLI"},
    "cli": {},
}


def room(name: str) -> str | None:
    """A dotted import name -> the room it belongs to (None: outside the project)."""
    parts = name.split(".")
    if parts[0] in OUTSIDE or parts[0] in outside_modules():
        return "outside"
    if parts[0] != "omnivox":
        return None
    if len(parts) > 1 and parts[1] in ("server", "streaming", *MODEL):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "cli"
    return "facade"


@functools.cache
def outside_modules() -> set[str]:
    """Module names that only demos/ and benchmarks/ hold (a bare `import speech` would reach them)."""
    return {p.stem for folder in OUTSIDE for p in (ROOT / folder).glob("*.py")}


def imported_names(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) for every import in the source, nested ones included; relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                   in ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The import-rule breaches of one module's source, one line each."""
    mine = room(module)
    out = []
    for line, name in imported_names(module, source, is_package):
        theirs = room(name)
        if theirs == "outside":
            out.append(f"{module}:{line}: imports {name}: the package never imports demos/ or benchmarks/")
        elif theirs in FORBIDDEN[mine]:
            out.append(f"{module}:{line}: {mine} imports {name} ({theirs}): {FORBIDDEN[mine][theirs]}")
    return out


def package_modules():
    """(module name, path, is_package) for every .py file of the package's folders."""
    for folder, prefix in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            yield ".".join((prefix, *(rel[:-1] if is_package else rel))), path, is_package


def test_the_package_follows_the_import_rule():
    modules = list(package_modules())
    assert len(modules) > 40 and {m for m, _, _ in modules} >= {
        "omnivox.cli", "omnivox.server.app", "omnivox.server.realtime", "omnivox.streaming.pipeline",
        "omnivox.thinker.model", "omnivox.talker.model", "omnivox.encoders.audio"}
    found = [v for module, path, is_package in modules
             for v in violations(module, path.read_text(encoding="utf-8"), is_package)]
    assert not found, "\n".join(found)


def test_the_checked_folders_are_the_ones_pyproject_maps():
    tomllib = pytest.importorskip("tomllib")
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in mapping.items():
        top, *sub = folder.split("/")
        assert top in FOLDERS and name == ".".join([FOLDERS[top], *sub]), (name, folder)
    assert {folder.split("/")[0] for folder in mapping.values()} == set(FOLDERS)


@pytest.mark.parametrize("module, source", [
    ("omnivox.thinker.model", "from omnivox.talker.model import Talker"),
    ("omnivox.thinker.model", "from ..talker import model"),                     # relative
    ("omnivox.thinker.model", "import importlib\nimportlib.import_module('omnivox.talker.dit')"),
    ("omnivox.talker.model", "import omnivox.streaming.pipeline"),
    ("omnivox.encoders.audio", "def f():\n    from omnivox.cli import main"),    # lazy, inside a function
    ("omnivox.encoders.video", "from omnivox.errors import InputError"),
    ("omnivox.streaming.pipeline", "from omnivox.server.engine import Engine"),
    ("omnivox.streaming.conversation", "from omnivox import cli"),
    ("omnivox.streaming.vad", "from omnivox.model import load"),
    ("omnivox.server.chat_request", "from omnivox.thinker.sampling import SamplingParams"),
    ("omnivox.server.realtime", "from omnivox.encoders.audio_features import load_audio"),
    ("omnivox.server.app", "from omnivox.cli import main"),
    ("omnivox.model", "from omnivox.server.app import create_app"),
    ("omnivox.model", "import benchmarks.speech"),
    ("omnivox.server.app", "from demos import offline_qa"),
    ("omnivox.cli", "import offline_qa"),                                         # a demos/ module by bare name
])
def test_a_breach_of_each_rule_is_caught(module, source):
    assert len(violations(module, source)) == 1, violations(module, source)


@pytest.mark.parametrize("module, source", [
    ("omnivox.talker.model", "from omnivox.thinker.model import KVCache"),          # the Talker reuses the Thinker
    ("omnivox.talker.token2wav", "from . import dit"),
    ("omnivox.streaming.pipeline", "from omnivox.thinker.model import prefill\nimport torch"),
    ("omnivox.server.realtime", "from omnivox.streaming.conversation import Conversation"),
    ("omnivox.server.app", "from omnivox.model import load"),                      # the server may load
    ("omnivox.cli", "def serve():\n    from omnivox.server.app import create_app"),  # the CLI starts the server
    ("omnivox.model", "from omnivox.thinker.model import Thinker"),                 # the loader builds the parts
])
def test_allowed_imports_pass(module, source):
    assert violations(module, source) == []
