"""Shared fixtures: tiny random checkpoints written once per test session by the reference implementation."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
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
