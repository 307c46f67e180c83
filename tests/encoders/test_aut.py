"""Qwen3-Omni's AuT audio encoder (encoders/aut.py) against the reference `Qwen3OmniMoeAudioEncoder`.

Random tiny encoders built by the reference (several widths, layer and head counts, mel bins, n_window_infer),
loaded from their state dicts; fp32 outputs compared for audios shorter than a chunk, exactly a chunk, across
several attention windows, and several audios encoded together (the reference's per-call padding rule).
"""

import pytest
import torch

from omnivox.encoders.aut import AuTConfig, AuTEncoder, num_aut_tokens

SHAPES = {
    "small": dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                  output_dim=24, downsample_hidden_size=8, n_window=50, n_window_infer=800),
    "narrow_window": dict(num_mel_bins=80, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=48,
                          d_model=32, output_dim=16, downsample_hidden_size=6, n_window=50, n_window_infer=200),
    "deep": dict(num_mel_bins=128, encoder_layers=3, encoder_attention_heads=1, encoder_ffn_dim=20, d_model=12,
                 output_dim=20, downsample_hidden_size=4, n_window=50, n_window_infer=400, conv_chunksize=3),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    torch.manual_seed(len(request.param))
    cfg = Qwen3OmniMoeAudioEncoderConfig(**SHAPES[request.param])
    ref = Qwen3OmniMoeAudioEncoder._from_config(cfg, attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for p in ref.parameters():                     # a real spread, so every layer matters
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
    ours = AuTEncoder(AuTConfig.from_dict(SHAPES[request.param])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, SHAPES[request.param]


def _reference(ref, feats: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        x = torch.cat(feats, dim=1)                                       # (M, sum L)
        lens = torch.tensor([f.shape[1] for f in feats])
        return ref(x, feature_lens=lens).last_hidden_state             # (N, out)


def _features(shape, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape["num_mel_bins"], n, generator=g) for n in lengths]


@pytest.mark.parametrize("lengths", [[37], [100], [250], [913], [1601], [37, 250], [60, 40], [913, 100, 7]])
def test_encoder_matches_reference(pair, lengths):
    ref, ours, shape = pair
    feats = _features(shape, lengths, seed=sum(lengths))
    want = _reference(ref, feats)
    got = ours.encode(feats)
    assert [g.shape[0] for g in got] == [num_aut_tokens(n, shape["n_window"]) for n in lengths]
    assert (torch.cat(got) - want).abs().max().item() <= 1e-4


def test_token_counts_follow_the_reference_rule():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    for n in [1, 2, 7, 8, 9, 99, 100, 101, 199, 200, 1234, 3000]:
        assert num_aut_tokens(n) == int(_get_feat_extract_output_lengths(torch.tensor(n))), n
    assert num_aut_tokens(100) == 13                                      # 12.5 Hz: 13 tokens per second


def test_a_short_audio_depends_on_its_batch_as_in_the_reference(pair):
    """Padded to the longest chunk of the call: a sub-second audio alone differs from one beside a longer one."""
    ref, ours, shape = pair
    short, long = _features(shape, [37, 150], seed=3)   # odd: its last conv rows read past its end
    alone = ours.encode([short])[0]
    beside = ours.encode([short, long])[0]
    assert (alone - _reference(ref, [short])).abs().max().item() <= 1e-4
    assert (beside - _reference(ref, [short, long])[:alone.shape[0]]).abs().max().item() <= 1e-4
    assert (alone - beside).abs().max().item() > 1e-6                    # small (conv biases), but there


def test_windows_are_independent_so_a_stream_can_encode_window_by_window(pair):
    """Attention never crosses an n_window_infer window: encoding the first windows alone gives their tokens."""
    ref, ours, shape = pair
    (feats,) = _features(shape, [1750], seed=4)
    whole = ours.encode([feats])[0]
    w = shape["n_window_infer"]
    first = ours.encode([feats[:, :w]])[0]
    assert torch.allclose(first, whole[:first.shape[0]], atol=1e-5)


def test_bad_input_is_refused(pair):
    _, ours, shape = pair
    with pytest.raises(ValueError, match="n_mels"):
        ours.encode([torch.zeros(shape["num_mel_bins"] + 1, 10)])
    with pytest.raises(ValueError, match="frames >= 1"):
        ours.encode([torch.zeros(shape["num_mel_bins"], 0)])
    with pytest.raises(ValueError, match="divisible"):
        AuTConfig.from_dict({**shape, "encoder_attention_heads": 5})


def test_real_config_builds_on_meta_with_the_reference_names_and_shapes():
    import json

    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    d = json.load(open("/work/shared/configs/qwen3-omni-30b-a3b-instruct.config.json"))["thinker_config"]
    audio = d["audio_config"]
    with torch.device("meta"):
        ref = Qwen3OmniMoeAudioEncoder._from_config(Qwen3OmniMoeAudioEncoderConfig(**audio))
        ours = AuTEncoder(AuTConfig.from_dict(audio))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    n = sum(p.numel() for p in ours.parameters())
    assert 0.6e9 < n < 0.7e9, n                                           # the report's ~650M AuT encoder
