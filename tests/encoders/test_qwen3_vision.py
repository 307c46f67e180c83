"""Qwen3-Omni's vision encoder (encoders/qwen3_vision.py) against the reference `Qwen3OmniMoeVisionEncoder`.

Random tiny encoders (widths, heads, depths, DeepStack layer sets, position-table sizes), loaded from the
reference's state dict; fp32 outputs and every DeepStack feature compared for images and videos of several grid
shapes, one item and several items together. The real config builds on meta with the reference's names.
"""

import json

import pytest
import torch

from omnivox.encoders.qwen3_vision import Qwen3VisionConfig, Qwen3VisionEncoder

SHAPES = {
    "small": dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24, patch_size=4,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
    "deep": dict(depth=4, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=16, patch_size=2,
                 num_position_embeddings=36, deepstack_visual_indexes=[1, 3], temporal_patch_size=2),
    "one_stack": dict(depth=3, hidden_size=24, intermediate_size=24, num_heads=1, out_hidden_size=12, patch_size=4,
                      num_position_embeddings=100, deepstack_visual_indexes=[2], hidden_act="gelu"),
}
GRIDS = [[[1, 4, 6]], [[2, 6, 4]], [[1, 2, 2], [3, 4, 8], [1, 10, 2]], [[1, 16, 12]]]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    torch.manual_seed(len(request.param) + 10)
    cfg = Qwen3OmniMoeVisionEncoderConfig(**SHAPES[request.param])
    ref = Qwen3OmniMoeVisionEncoder._from_config(cfg, attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.7 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.2))
    ours = Qwen3VisionEncoder(Qwen3VisionConfig.from_dict(SHAPES[request.param])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("grids", GRIDS, ids=["image", "video", "mixed", "large"])
def test_tokens_and_deepstack_features_match_reference(pair, grids):
    ref, ours = pair
    cfg = ours.cfg
    grid = torch.tensor(grids)
    n = int(grid.prod(1).sum())
    pixels = torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                         generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = ref(pixels, grid_thw=grid)
    got, stack = ours.encode(pixels, grid)
    assert got.shape == (n // cfg.merge_unit, cfg.out_hidden_size)
    assert (got - want.pooler_output).abs().max().item() <= 1e-4
    assert len(stack) == len(want.deepstack_features) == len(cfg.deepstack_visual_indexes)
    for mine, theirs in zip(stack, want.deepstack_features):
        assert (mine - theirs).abs().max().item() <= 1e-4


def test_positions_are_resampled_per_grid(pair):
    """The learned table matters and is resampled to each grid: two items of different shapes are not a shift
    of one another."""
    _, ours = pair
    cfg = ours.cfg
    pixels = torch.zeros(4 * 6 + 6 * 4, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    both, _ = ours.encode(pixels, torch.tensor([[1, 4, 6], [1, 6, 4]]))
    assert (both[:6] - both[6:]).abs().max().item() > 1e-3


def test_bad_input_is_refused(pair):
    _, ours = pair
    cfg = ours.cfg
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours.encode(torch.zeros(8, dim + 1), torch.tensor([[1, 2, 4]]))
    with pytest.raises(ValueError, match="patch rows"):
        ours.encode(torch.zeros(9, dim), torch.tensor([[1, 2, 4]]))
    with pytest.raises(ValueError, match="divisible"):
        ours.encode(torch.zeros(6, dim), torch.tensor([[1, 3, 2]]))
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VisionConfig.from_dict({**SHAPES["small"], "deepstack_visual_indexes": [5]})
    with pytest.raises(ValueError, match="square"):
        Qwen3VisionConfig.from_dict({**SHAPES["small"], "num_position_embeddings": 50})


def test_real_config_builds_on_meta_with_the_reference_names_and_shapes():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    vision = json.load(open("/work/shared/configs/qwen3-omni-30b-a3b-instruct.config.json"))["thinker_config"][
        "vision_config"]
    with torch.device("meta"):
        ref = Qwen3OmniMoeVisionEncoder._from_config(Qwen3OmniMoeVisionEncoderConfig(**vision))
        ours = Qwen3VisionEncoder(Qwen3VisionConfig.from_dict(vision))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours.cfg.deepstack_visual_indexes == (8, 16, 24) and ours.cfg.grid_side == 48
