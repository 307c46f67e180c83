"""Qwen3-Omni Code2Wav: ours against the reference, chunked streaming against one-shot decoding, bad codes.

The reference init leaves the waveform tiny and most layers inert, so `tiny_qwen3.make_reference` re-draws the
Code2Wav weights fan-in scaled (the waveform is then O(0.1), never clamped in these tests) before both sides load
them.
"""

import json
import random

import pytest
import torch

import tiny_qwen3 as tq
from tiny_qwen3 import one_thread  # noqa: F401  (autouse)
from omnivox.talker.code2wav import Code2Wav, Code2WavConfig, Code2WavState, code2wav_stream

REAL_CONFIG = "/work/shared/configs/qwen3-omni-30b-a3b-instruct.config.json"


@pytest.fixture(scope="module", params=["base", "wide", "mha"])
def pair(request, tmp_path_factory):
    ref = tq.make_reference(request.param)
    tensors = tq.save(ref, tmp_path_factory.mktemp(f"q3_{request.param}"))
    cfg = Code2WavConfig.from_dict(json.loads(ref.config.to_json_string())["code2wav_config"])
    ours = Code2Wav(cfg).eval()
    ours.load_state_dict(tq.strip(tensors, "code2wav."), strict=True)
    return dict(ref=ref.code2wav, ours=ours, cfg=cfg, tensors=tensors)


def _codes(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, n), generator=g)


# ----------------------------------------------------------------------------------------------------------------
# config


def test_real_config_numbers_and_frame_arithmetic():
    d = json.load(open(REAL_CONFIG))["code2wav_config"]
    cfg = Code2WavConfig.from_dict(d)
    assert (cfg.codebook_size, cfg.num_quantizers, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
            cfg.head_dim, cfg.sliding_window, cfg.decoder_dim) == (2048, 16, 1024, 8, 16, 64, 72, 1536)
    assert cfg.rope_theta == 10000 and cfg.rms_norm_eps == 1e-5
    assert cfg.samples_per_frame == 1920  # 12.5 frames per second at 24 kHz
    # kernel-2r transposed convs each hold one input back: N frames give 1920 N - 555 samples
    assert [cfg.samples_for_frames(n) for n in (1, 2, 10)] == [1365, 3285, 18645]


def test_v4_key_spelling_reads_the_same():
    d = json.load(open(REAL_CONFIG))["code2wav_config"]
    v4 = {k: v for k, v in d.items() if k != "rope_parameters"}
    v4["rope_theta"] = d["rope_parameters"]["rope_theta"]
    v4["rope_scaling"] = None
    assert Code2WavConfig.from_dict(v4) == Code2WavConfig.from_dict(d)


def test_config_errors_are_clear():
    d = json.load(open(REAL_CONFIG))["code2wav_config"]
    with pytest.raises(ValueError, match="lacks 'sliding_window'"):
        Code2WavConfig.from_dict({k: v for k, v in d.items() if k != "sliding_window"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Code2WavConfig.from_dict({**d, "num_key_value_heads": 5})


# ----------------------------------------------------------------------------------------------------------------
# names and parity


def test_state_dict_keys_equal_checkpoint_names(pair):
    saved = {k: tuple(v.shape) for k, v in tq.strip(pair["tensors"], "code2wav.").items()}
    ours = {k: tuple(v.shape) for k, v in pair["ours"].state_dict().items()}
    assert ours == saved
    assert Code2Wav.keep_fp32


@pytest.mark.parametrize("frames", [1, 2, 9, 40])
def test_waveform_matches_reference(pair, frames):
    codes = _codes(pair["cfg"], frames, seed=frames)
    with torch.no_grad():
        want = pair["ref"](codes)  # (1, 1, S)
        got = pair["ours"](codes)
    assert got.shape == want.shape == (1, 1, pair["cfg"].samples_for_frames(frames))
    assert want.abs().max() < 0.99 and want.std() > 1e-2  # a real signal, not clamped, not ~0
    assert (got - want).abs().max().item() <= 1e-4


def test_matches_reference_generate_decode(pair):
    """generate() decodes with chunked_decode(300, 25); up to 300 frames that is one pass."""
    codes = _codes(pair["cfg"], 33, seed=5)
    with torch.no_grad():
        want = pair["ref"].chunked_decode(codes, chunk_size=300, left_context_size=25)
        got = pair["ours"](codes)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# streaming


def _chunked(model, codes, sizes, dtype=torch.float32):
    state = Code2WavState()
    out, t = [], 0
    with torch.no_grad():
        while t < codes.shape[2]:
            n = sizes[len(out) % len(sizes)]
            out.append(model(codes[:, :, t:t + n], state))
            t += n
    return torch.cat(out, dim=-1), state


@pytest.mark.parametrize("sizes", [[1], [2], [3], [7], [1, 4, 2, 9]])
def test_chunked_equals_one_shot(pair, sizes):
    codes = _codes(pair["cfg"], 23, seed=1)
    with torch.no_grad():
        one = pair["ours"](codes)
    got, state = _chunked(pair["ours"], codes, sizes)
    assert got.shape == one.shape and state.frames == 23
    # the same arithmetic in a different GEMM blocking: fp32 rounding only
    assert (got - one).abs().max().item() <= 1e-6


def test_chunked_equals_one_shot_in_float64(pair):
    """In float64 the difference shrinks with the precision: the chunked math is the one-shot math."""
    model = Code2Wav(pair["cfg"]).double().eval()
    model.load_state_dict(pair["ours"].state_dict())
    codes = _codes(pair["cfg"], 19, seed=2)
    with torch.no_grad():
        one = model(codes)
    got, _ = _chunked(model, codes, [1, 3, 2])
    assert (got - one).abs().max().item() <= 1e-12


def test_first_frame_audio_before_second_frame_exists(pair):
    """Frame 0 alone yields its samples, and they are exactly the opening of any longer decode."""
    cfg, model = pair["cfg"], pair["ours"]
    codes = _codes(pair["cfg"], 12, seed=3)
    state = Code2WavState()
    with torch.no_grad():
        first = model(codes[:, :, :1], state)  # frame 1 does not exist yet
        one = model(codes)
    assert first.shape[-1] == cfg.samples_for_frames(1) > 0
    assert (first - one[..., :first.shape[-1]]).abs().max().item() <= 1e-6
    with torch.no_grad():
        second = model(codes[:, :, 1:2], state)
    assert second.shape[-1] == cfg.samples_per_frame


def test_stream_generator_and_reset(pair):
    codes = _codes(pair["cfg"], 10, seed=4)
    chunks = [codes[:, :, i:i + 3] for i in range(0, 10, 3)]
    state = Code2WavState()
    a = torch.cat(list(code2wav_stream(pair["ours"], chunks, state)))
    state.reset()
    b = torch.cat(list(code2wav_stream(pair["ours"], chunks, state)))
    with torch.no_grad():
        one = pair["ours"](codes)[0, 0]
    assert torch.equal(a, b)
    assert (a - one).abs().max().item() <= 1e-6


def test_random_chunkings_equal_one_shot(pair):
    rng = random.Random(7)
    codes = _codes(pair["cfg"], 30, seed=6)
    with torch.no_grad():
        one = pair["ours"](codes)
    for _ in range(3):
        got, _ = _chunked(pair["ours"], codes, [rng.randint(1, 6) for _ in range(12)])
        assert (got - one).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_codes_give_clear_errors(pair):
    cfg, model = pair["cfg"], pair["ours"]
    good = _codes(cfg, 3)
    with pytest.raises(ValueError, match=f"\\(1, {cfg.num_quantizers}, T\\)"):
        model(good[:, :-1])
    with pytest.raises(ValueError, match="batch 1"):
        model(good.expand(2, -1, -1))
    with pytest.raises(ValueError, match="codebook_size"):
        model(good.clone().fill_(cfg.codebook_size))
    with pytest.raises(ValueError, match="codebook_size"):
        model(good.clone().fill_(-1))
    with pytest.raises(ValueError, match="integer"):
        model(good.float())
    with pytest.raises(ValueError, match="no frame"):
        model(good[:, :, :0])
