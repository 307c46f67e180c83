"""Shared fixtures: tiny random checkpoints written once per test session by the reference implementation.

Test files live in folders that mirror the packages; the helpers they share (tiny.py, cli_support.py,
server_support.py, ...) live here in tests/, which this file puts on sys.path."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("cli_support", "server_support")  # their asserts report like a test's
import tiny  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make(variant="base") -> (Path, reference Qwen2_5OmniForConditionalGeneration in fp32 eval mode)."""

    def make(variant="base"):
        key = variant if isinstance(variant, str) else repr(variant)
        if key not in _CACHE:
            name = variant if isinstance(variant, str) else variant.name
            out = tmp_path_factory.mktemp(f"ckpt_{name}")
            model = tiny.make_checkpoint(out, variant, with_model=True)
            _CACHE[key] = (out, model)
        return _CACHE[key]

    return make
