"""The official 3B/7B configs (v4 style, as the real files are) build, on the meta device, exactly the parameter
names and shapes the reference saves — so a real checkpoint loads by strict name matching — and the totals come
out at the published sizes."""

import json
from pathlib import Path

import pytest
import torch

from omnivox.config import OmniConfig
from omnivox.model import build_meta

CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "configs"
EXPECTED_TOTAL = {"3b": 5.54e9, "7b": 10.73e9}


def config_path(size: str) -> Path:
    for base in (CONFIGS, Path(__file__).resolve().parents[2] / "shared" / "configs"):
        p = base / f"qwen2.5-omni-{size}.config.json"
        if p.is_file():
            return p
    pytest.skip("official configs (../shared/configs) not present")


def reference_saved_shapes(raw: dict) -> dict[str, tuple]:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    cfg = Qwen2_5OmniConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        ref = Qwen2_5OmniForConditionalGeneration(cfg)
    state = revert_weight_conversion(ref, dict(ref.state_dict()))
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_official_config_names_and_shapes_match_reference(size):
    raw = json.loads(config_path(size).read_text())
    cfg = OmniConfig.from_dict(raw)
    ours = build_meta(cfg, audio_output=True)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = reference_saved_shapes(raw)
    missing = sorted(set(ref_shapes) - set(ours_shapes))
    extra = sorted(set(ours_shapes) - set(ref_shapes))
    assert not missing and not extra, (missing[:10], extra[:10])
    wrong = [k for k in ref_shapes if ref_shapes[k] != ours_shapes[k]]
    assert not wrong, [(k, ref_shapes[k], ours_shapes[k]) for k in wrong[:10]]
    total = sum(p.numel() for p in ours.parameters())
    assert total == pytest.approx(EXPECTED_TOTAL[size], rel=0.005), total


def test_thinker_only_build_has_no_talker():
    raw = json.loads(config_path("3b").read_text())
    ours = build_meta(OmniConfig.from_dict(raw), audio_output=False)
    names = list(ours.state_dict())
    assert names and all(n.startswith("thinker.") for n in names)
