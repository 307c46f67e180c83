"""Thinker decoder vs the reference (transformers' Qwen2.5-Omni thinker) on the tiny checkpoints.

fp32 parity: max abs diff <= 1e-4 and identical greedy sequences. Also: chunked prefill == one-shot prefill,
batch 2 == two batch-1 runs, KV-cache truncation == a fresh cache, bf16 runs and agrees on the top-1 choices.
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnivox.config import OmniConfig
from omnivox.thinker.model import (KVCache, Thinker, decode_step, embed, prefill, rope_cos_sin, text_positions)

VARIANTS = ["base", "gqa4_tied", "mha_wide"]
TOL = 1e-4
_LOADED: dict = {}


def thinker_state(path: Path) -> dict:
    """The checkpoint's thinker.model.* / thinker.lm_head.* tensors, keyed relative to `thinker.`."""
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return {k[len("thinker."):]: t for k, t in sd.items()
            if k.startswith("thinker.model.") or k.startswith("thinker.lm_head.")}


@pytest.fixture(params=VARIANTS)
def loaded(request, tiny_checkpoint):
    """(reference model, our Thinker with the checkpoint's weights, DecoderConfig, checkpoint dir)."""
    name = request.param
    if name not in _LOADED:
        path, ref = tiny_checkpoint(name)
        cfg = OmniConfig.from_dir(path).text
        ours = Thinker(cfg).eval()
        ours.load_state_dict(thinker_state(path), strict=True)
        _LOADED[name] = (ref, ours, cfg, path)
    return _LOADED[name]


def prompt(cfg, length=11, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def greedy(ours, cfg, ids, steps, max_len=128, dtype=torch.float32):
    """Prefill + `steps` greedy decode steps -> (tokens (B, steps), logits per step [(B, V)])."""
    b, t = ids.shape
    cache = KVCache.allocate(cfg, b, max_len, "cpu", dtype)
    logits, _ = prefill(ours, cache, embed(ours, ids), text_positions(0, t, b))
    tokens, all_logits = [], [logits]
    for i in range(steps):
        tok = logits.argmax(-1)  # (B,)
        tokens.append(tok)
        if i == steps - 1:
            break
        logits, _ = decode_step(ours, cache, tok, text_positions(t + i, 1, b))
        all_logits.append(logits)
    return torch.stack(tokens, 1), all_logits


# ------------------------------------------------------------------------------------------------ reference parity


def test_checkpoint_keys_load_strictly_and_round_trip(loaded):
    ref, ours, cfg, path = loaded
    assert set(ours.state_dict()) == set(thinker_state(path))
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_prefill_logits_match_reference(loaded):
    ref, ours, cfg, _ = loaded
    ids = prompt(cfg, 13)
    with torch.no_grad():
        expected = ref.thinker(input_ids=ids).logits  # (1, T, V)
    cache = KVCache.allocate(cfg, 1, 32, "cpu", torch.float32)
    logits, hidden = prefill(ours, cache, embed(ours, ids), text_positions(0, 13), last_only=False)
    assert logits.shape == expected.shape and hidden.shape == (1, 13, cfg.hidden_size)
    assert (logits - expected).abs().max().item() <= TOL
    assert cache.length == 13
    last, _ = prefill(ours, KVCache.allocate(cfg, 1, 32, "cpu", torch.float32), embed(ours, ids),
                      text_positions(0, 13))
    assert (last - expected[:, -1]).abs().max().item() <= TOL


def test_multimodal_positions_match_reference(loaded):
    """Distinct (t, h, w) ids exercise the mrope split; compared against the reference text model."""
    ref, ours, cfg, _ = loaded
    t = 12
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 40, (3, 1, t), generator=g)  # (3, B, T)
    ids = prompt(cfg, t, seed=4)
    lm = ref.thinker.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens(ids)
        expected = lm(inputs_embeds=emb, position_ids=pos).last_hidden_state  # (1, T, H)
        ref_cos, ref_sin = lm.rotary_emb(emb, pos)
    cos, sin = rope_cos_sin(ours.model.inv_freq, cfg.mrope_section, pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    cache = KVCache.allocate(cfg, 1, 16, "cpu", torch.float32)
    _, hidden = prefill(ours, cache, embed(ours, ids), pos, last_only=False)
    assert (hidden - expected).abs().max().item() <= TOL


def test_every_decode_step_matches_reference_cache(loaded):
    ref, ours, cfg, _ = loaded
    ids = prompt(cfg, 9, seed=1)
    tokens, logits = greedy(ours, cfg, ids, 32)
    with torch.no_grad():
        out = ref.thinker(input_ids=ids, use_cache=True)
        past = out.past_key_values
        assert (logits[0] - out.logits[:, -1]).abs().max().item() <= TOL
        for i in range(1, 32):
            pos = torch.full((3, 1, 1), 9 + i - 1, dtype=torch.long)
            out = ref.thinker(input_ids=tokens[:, i - 1:i], past_key_values=past, position_ids=pos, use_cache=True)
            past = out.past_key_values
            assert (logits[i] - out.logits[:, -1]).abs().max().item() <= TOL, f"step {i}"
            assert torch.equal(out.logits[:, -1].argmax(-1), tokens[:, i])


def test_greedy_sequence_matches_reference_generate(loaded):
    ref, ours, cfg, _ = loaded
    ids = prompt(cfg, 10, seed=2)
    tokens, _ = greedy(ours, cfg, ids, 32)
    # an EOS id our sequence never produces, so the reference cannot stop early while it agrees with us
    eos = next(i for i in range(cfg.vocab_size) if i not in set(tokens[0].tolist()))
    with torch.no_grad():
        out = ref.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert out[:, ids.shape[1]:].tolist() == tokens.tolist()


# ------------------------------------------------------------------------------------------------ cache behaviour


def test_chunked_prefill_equals_one_shot(loaded):
    _, ours, cfg, _ = loaded
    ids = prompt(cfg, 17, seed=5)
    one = KVCache.allocate(cfg, 1, 64, "cpu", torch.float32)
    full_logits, full_hidden = prefill(ours, one, embed(ours, ids), text_positions(0, 17), last_only=False)

    chunked = KVCache.allocate(cfg, 1, 64, "cpu", torch.float32)
    hiddens, logits = [], None
    for a, b in [(0, 5), (5, 6), (6, 17)]:
        logits, h = prefill(ours, chunked, embed(ours, ids[:, a:b]), text_positions(a, b - a))
        hiddens.append(h)
    assert chunked.length == 17
    assert (torch.cat(hiddens, 1) - full_hidden).abs().max().item() <= 1e-5
    assert (logits - full_logits[:, -1]).abs().max().item() <= 1e-5

    def continue_greedy(cache, logits, n=8):
        out = []
        for i in range(n):
            tok = logits.argmax(-1)
            out.append(tok.item())
            logits, _ = decode_step(ours, cache, tok, text_positions(17 + i, 1))
        return out

    assert continue_greedy(chunked, logits) == continue_greedy(one, full_logits[:, -1])


def test_batch_of_two_equals_two_single_runs(loaded):
    _, ours, cfg, _ = loaded
    ids = prompt(cfg, 10, batch=2, seed=6)
    tokens, logits = greedy(ours, cfg, ids, 8)
    for row in range(2):
        single_tokens, single_logits = greedy(ours, cfg, ids[row:row + 1], 8)
        assert torch.equal(tokens[row], single_tokens[0])
        for step, (lb, ls) in enumerate(zip(logits, single_logits)):
            assert (lb[row] - ls[0]).abs().max().item() <= 1e-5, f"row {row} step {step}"


def test_truncate_then_reprefill_equals_fresh_cache(loaded):
    _, ours, cfg, _ = loaded
    a, b, c = prompt(cfg, 7, seed=7), prompt(cfg, 5, seed=8), prompt(cfg, 6, seed=9)
    cache = KVCache.allocate(cfg, 1, 32, "cpu", torch.float32)
    prefill(ours, cache, embed(ours, a), text_positions(0, 7))
    prefill(ours, cache, embed(ours, b), text_positions(7, 5))
    decode_step(ours, cache, torch.tensor([3]), text_positions(12, 1))
    cache.truncate(7)
    assert cache.length == 7
    edited, _ = prefill(ours, cache, embed(ours, c), text_positions(7, 6))

    fresh = KVCache.allocate(cfg, 1, 32, "cpu", torch.float32)
    prefill(ours, fresh, embed(ours, a), text_positions(0, 7))
    expected, _ = prefill(ours, fresh, embed(ours, c), text_positions(7, 6))
    assert torch.equal(edited, expected)

    cache.reset()
    assert cache.length == 0
    again, _ = prefill(ours, cache, embed(ours, torch.cat([a, c], 1)), text_positions(0, 13))
    assert (again - expected).abs().max().item() <= 1e-5


def test_bf16_runs_and_agrees_on_top1(loaded):
    ref, ours, cfg, _ = loaded
    ids = prompt(cfg, 16, seed=10)
    with torch.no_grad():
        expected = ref.thinker(input_ids=ids).logits[0]  # (T, V)
    half = copy.deepcopy(ours).to(torch.bfloat16)
    assert half.model.inv_freq.dtype == torch.float32
    if cfg.tie_word_embeddings:
        assert half.lm_head.weight is half.model.embed_tokens.weight
    cache = KVCache.allocate(cfg, 1, 32, "cpu", torch.bfloat16)
    logits, _ = prefill(half, cache, embed(half, ids), text_positions(0, 16), last_only=False)
    assert logits.dtype == torch.bfloat16
    logits = logits[0].float()
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9
    assert (logits - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    tokens, _ = greedy(half, cfg, ids, 4, dtype=torch.bfloat16)
    assert tokens.shape == (1, 4)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(loaded):
    _, ours, cfg, _ = loaded
    cache = KVCache.allocate(cfg, 1, 8, "cpu", torch.float32)
    ids = prompt(cfg, 6)
    with pytest.raises(ValueError, match="position_ids"):
        prefill(ours, cache, embed(ours, ids), text_positions(0, 6)[:1])
    with pytest.raises(ValueError, match="batch"):
        prefill(ours, cache, embed(ours, prompt(cfg, 6, batch=2)), text_positions(0, 6, 2))
    prefill(ours, cache, embed(ours, ids), text_positions(0, 6))
    with pytest.raises(ValueError, match="KV cache full"):
        prefill(ours, cache, embed(ours, ids), text_positions(6, 6))
    assert cache.length == 6
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(7)
    with pytest.raises(ValueError, match="token_ids"):
        decode_step(ours, cache, torch.tensor([[1]]), text_positions(6, 1))


def test_fused_projections_follow_moves_assignments_and_reloads(loaded):
    """q/k/v and gate/up run as one GEMM over views of a fused tensor; every way of changing weights is seen."""
    _, ours, cfg, path = loaded
    ids = prompt(cfg, 8, seed=11)

    def run(model, dtype=torch.float32):
        cache = KVCache.allocate(cfg, 1, 16, "cpu", dtype)
        return prefill(model, cache, embed(model, ids), text_positions(0, 8))[0].float()

    expected = run(ours)
    attn = ours.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn._qkv[0][cfg.num_heads * cfg.head_dim:].data_ptr()

    model = Thinker(cfg).eval()
    model.load_state_dict(thinker_state(path), strict=True, assign=True)
    assert (run(model) - expected).abs().max().item() <= 1e-5
    model.load_state_dict(thinker_state(path), strict=True)
    assert (run(model) - expected).abs().max().item() <= 1e-5

    moved = copy.deepcopy(model).to(torch.float64)
    assert moved.model.layers[0].mlp._gate_up[0].dtype == torch.float64
    assert (run(moved, torch.float64) - expected).abs().max().item() <= TOL

    layer = model.model.layers[-1]
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(0.5)  # in place: lands in the fused tensor
    halved = run(model)
    assert (halved - expected).abs().max().item() > 1e-3
    layer.mlp.up_proj.weight = torch.nn.Parameter(layer.mlp.up_proj.weight * 2)  # replaced: rebuilt
    assert (run(model) - expected).abs().max().item() <= 1e-5
    layer.self_attn.v_proj.weight = torch.nn.Parameter(torch.zeros_like(layer.self_attn.v_proj.weight))
    assert (run(model) - expected).abs().max().item() > 1e-3


def test_tied_config_rejects_a_distinct_lm_head(loaded):
    _, _, cfg, path = loaded
    state = thinker_state(path)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
        with pytest.raises(RuntimeError, match="tie_word_embeddings"):
            Thinker(cfg).load_state_dict(state)
    else:
        tied_cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
        with pytest.raises(RuntimeError, match="tie_word_embeddings"):
            Thinker(tied_cfg).load_state_dict(state)


def test_meta_build_then_assigned_parameters_and_reset_buffers(loaded):
    """The loader's contract: build on meta, assign every parameter, call reset_buffers() on every module."""
    ref, ours, cfg, path = loaded
    with torch.device("meta"):
        model = Thinker(cfg).eval()
    state = thinker_state(path)
    for name, mod in model.named_modules():
        for attr in list(mod._parameters):
            key = f"{name}.{attr}" if name else attr
            if key in state:
                mod._parameters[attr] = torch.nn.Parameter(state[key].to(torch.bfloat16), requires_grad=False)
    if cfg.tie_word_embeddings:
        model.lm_head._parameters["weight"] = model.model.embed_tokens.weight
    with torch.device("cpu"):
        for mod in model.modules():
            if callable(getattr(mod, "reset_buffers", None)):
                mod.reset_buffers()
    assert not [n for n, b in model.named_buffers() if b.is_meta]
    assert model.model.inv_freq.dtype == torch.float32
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.fused("_qkv")[0].data_ptr()
    ids = prompt(cfg, 10, seed=12)
    with torch.no_grad():
        expected = ref.thinker(input_ids=ids).logits[0, -1]
    cache = KVCache.allocate(cfg, 1, 16, "cpu", torch.bfloat16)
    logits, _ = prefill(model, cache, embed(model, ids), text_positions(0, 10))
    assert logits[0].float().argmax() == expected.argmax()
