"""The Qwen3-Omni Thinker decoder (thinker/moe.py) against the reference's Qwen3OmniMoeThinkerTextModel.

Tiny random checkpoints from tests/tiny_qwen3.py (three variants: experts 4/8/6, top-k 2/3/1, renormalised router
weights or not, 4/8/2 heads, dense layers by `mlp_only_layers` and by `decoder_sparse_step`, 2/3/1 DeepStack
layers), loaded from the files `save_pretrained` wrote. Compared in fp32: logits at every position of a prompt,
the logits of every greedy decode step and the greedy tokens of the reference's `generate`, multimodal position
ids with DeepStack features added into the visual rows, chunked prefill against one call, and the hidden state
the Talker reads (`keep_layer`).
"""

import copy
import json

import pytest
import torch

import tiny_qwen3 as tq
from tiny_qwen3 import one_thread  # noqa: F401  (autouse)
from omnivox.thinker.config import MoEThinkerConfig
from omnivox.thinker.moe import Deepstack, MoEThinker, SparseMoE, allocate, decode_step, prefill

REAL_CONFIG = "/work/shared/configs/qwen3-omni-30b-a3b-instruct.config.json"
TOL = 1e-4


@pytest.fixture(scope="module", params=["base", "wide", "mha"])
def pair(request, tmp_path_factory):
    ref = tq.make_reference(request.param)
    tensors = tq.save(ref, tmp_path_factory.mktemp(f"q3thinker_{request.param}"))
    d = json.loads(ref.config.to_json_string())
    text = d["thinker_config"]["text_config"]
    ours = MoEThinker(MoEThinkerConfig.from_dict(text, d["thinker_config"].get("tie_word_embeddings"))).eval()
    saved = {k: v for k, v in tq.strip(tensors, "thinker.").items() if k.startswith(("model.", "lm_head."))}
    assert set(ours.state_dict()) == set(saved)           # exactly the checkpoint's names, nothing left over
    ours.load_state_dict(saved, strict=True)
    return dict(ref=ref, ours=ours, lm=ref.thinker.model.language_model, head=ref.thinker.lm_head,
                variant=tq.VARIANTS[request.param], cfg=ours.cfg)


def _ids(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 60, (1, n), generator=g)         # ordinary tokens only


def _text_positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).view(1, 1, -1).expand(3, 1, -1)  # (3, 1, T)


def _reference_logits(pair, embeds, positions, mask=None, deepstack=None, hidden_states=False):
    with torch.no_grad():
        out = pair["lm"](inputs_embeds=embeds, position_ids=positions, use_cache=False, visual_pos_masks=mask,
                         deepstack_visual_embeds=deepstack, output_hidden_states=hidden_states)
        return pair["head"](out.last_hidden_state)[0], out          # (T, V)


def test_config_reads_the_sparse_and_dense_layers(pair):
    v, cfg = pair["variant"], pair["cfg"]
    want = tuple(i not in v.thinker_mlp_only and (i + 1) % v.thinker_sparse_step == 0
                 for i in range(v.thinker_layers))
    assert cfg.sparse_layers == want
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.norm_topk_prob) == (v.thinker_experts, v.thinker_top_k,
                                                                            v.thinker_norm_topk_prob)
    for layer, ref_layer, sparse in zip(pair["ours"].model.layers, pair["lm"].layers, want):
        assert isinstance(layer.mlp, SparseMoE) == sparse == hasattr(ref_layer.mlp, "gate")


@pytest.mark.parametrize("seed", [0, 1])
def test_text_prompt_logits_at_every_position(pair, seed):
    ids = _ids(seed, 23)
    embeds = pair["ours"].model.embed_tokens(ids)
    cache = allocate(pair["ours"], 64)
    got, _, _ = prefill(pair["ours"], cache, embeds, _text_positions(0, 23), last_only=False)
    want, _ = _reference_logits(pair, embeds, _text_positions(0, 23))
    assert (got[0] - want).abs().max().item() <= TOL
    assert cache.length == 23


@pytest.mark.parametrize("seed", [0, 3])
def test_greedy_decode_matches_reference_generate_and_its_logits_per_step(pair, seed):
    ids = _ids(seed, 11)
    n_new = 12
    with torch.no_grad():
        ref_out = pair["ref"].thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                               output_logits=True, return_dict_in_generate=True,
                                               repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)
    want_tokens = ref_out.sequences[0, ids.shape[1]:].tolist()
    ours, cache = pair["ours"], allocate(pair["ours"], 64)
    logits, _, _ = prefill(ours, cache, ours.model.embed_tokens(ids), _text_positions(0, ids.shape[1]))
    tokens, steps = [], [logits[0]]
    for i in range(n_new):
        tok = int(steps[-1].argmax())
        tokens.append(tok)
        if i + 1 < n_new:
            logits, _, _ = decode_step(ours, cache, torch.tensor([tok]), _text_positions(cache.length, 1))
            steps.append(logits[0])
    assert tokens == want_tokens
    for mine, theirs in zip(steps, ref_out.logits):
        assert (mine - theirs[0]).abs().max().item() <= TOL


def _multimodal(pair, seed: int):
    """A prompt with a 'visual' block: (embeds (1, T, H), positions (3, 1, T), visual rows (T,), DeepStack
    features (one (Nv, H) per DeepStack layer)). Positions follow the interleaved-mrope layout of a 2x3 grid
    over two frames: the three axes differ inside the block."""
    g = torch.Generator().manual_seed(seed)
    h = pair["cfg"].decoder.hidden_size
    before, frames, gh, gw, after = 5, 2, 2, 3, 6
    nv = frames * gh * gw
    t = before + nv + after
    embeds = torch.randn(1, t, h, generator=g)
    pos = torch.zeros(3, 1, t, dtype=torch.long)
    pos[:, 0, :before] = torch.arange(before)
    tt, hh, ww = torch.meshgrid(torch.arange(frames) * 3, torch.arange(gh), torch.arange(gw), indexing="ij")
    for axis, grid in enumerate((tt, hh, ww)):
        pos[axis, 0, before:before + nv] = before + grid.reshape(-1)
    nxt = int(pos[:, 0, :before + nv].max()) + 1
    pos[:, 0, before + nv:] = torch.arange(nxt, nxt + after)
    mask = torch.zeros(t, dtype=torch.bool)
    mask[before:before + nv] = True
    feats = [torch.randn(nv, h, generator=g) for _ in pair["variant"].deepstack_indexes]
    return embeds, pos, mask, feats


def test_multimodal_positions_and_deepstack_match_reference(pair):
    embeds, pos, mask, feats = _multimodal(pair, 5)
    cache = allocate(pair["ours"], 64)
    got, _, _ = prefill(pair["ours"], cache, embeds, pos, last_only=False, deepstack=Deepstack(mask, feats))
    want, _ = _reference_logits(pair, embeds, pos, mask[None], feats)
    assert (got[0] - want).abs().max().item() <= TOL
    # DeepStack matters: without it the visual rows and everything after them change
    plain, _ = _reference_logits(pair, embeds, pos)
    assert (plain - want)[mask].abs().max().item() > 1e-2


def test_chunked_prefill_equals_one_call(pair):
    embeds, pos, mask, feats = _multimodal(pair, 6)
    whole_cache = allocate(pair["ours"], 64)
    whole, hidden, _ = prefill(pair["ours"], whole_cache, embeds, pos, last_only=False,
                               deepstack=Deepstack(mask, feats))
    cache, parts, seen = allocate(pair["ours"], 64), [], 0
    for a, b in [(0, 4), (4, 9), (9, 20), (20, mask.shape[0])]:            # cuts inside the visual block
        rows = mask[a:b]
        chunk_feats = [f[seen:seen + int(rows.sum())] for f in feats]
        seen += int(rows.sum())
        logits, _, _ = prefill(pair["ours"], cache, embeds[:, a:b], pos[:, :, a:b], last_only=False,
                               deepstack=Deepstack(rows, chunk_feats))
        parts.append(logits)
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= 1e-5
    assert torch.allclose(cache.k[:, :, :, :cache.length], whole_cache.k[:, :, :, :whole_cache.length], atol=1e-5)


def test_kept_hidden_state_is_the_reference_layer_output(pair):
    embeds, pos, mask, feats = _multimodal(pair, 7)
    _, out = _reference_logits(pair, embeds, pos, mask[None], feats, hidden_states=True)
    layers = pair["cfg"].decoder.num_layers
    for k in range(layers):
        cache = allocate(pair["ours"], 64)
        _, _, kept = prefill(pair["ours"], cache, embeds, pos, deepstack=Deepstack(mask, feats), keep_layer=k)
        assert (kept[0] - out.hidden_states[k][0]).abs().max().item() <= TOL, k


def test_moe_block_matches_the_reference_block(pair):
    i = pair["cfg"].sparse_layers.index(True)
    x = torch.randn(1, 29, pair["cfg"].decoder.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pair["lm"].layers[i].mlp(x)[0]
        got = pair["ours"].model.layers[i].mlp(x[0])
    assert (got - want).abs().max().item() <= 1e-5


def test_bad_input_gives_clear_errors(pair):
    ours, cache = pair["ours"], allocate(pair["ours"], 8)
    h = pair["cfg"].decoder.hidden_size
    with pytest.raises(ValueError, match="KV cache full"):
        prefill(ours, cache, torch.zeros(1, 9, h), _text_positions(0, 9))
    with pytest.raises(ValueError, match="position_ids"):
        prefill(ours, cache, torch.zeros(1, 3, h), _text_positions(0, 4))
    with pytest.raises(ValueError, match="visual_rows"):
        prefill(ours, cache, torch.zeros(1, 3, h), _text_positions(0, 3), deepstack=Deepstack(torch.ones(4) > 0, []))
    with pytest.raises(ValueError, match="DeepStack feature"):
        prefill(ours, cache, torch.zeros(1, 3, h), _text_positions(0, 3),
                deepstack=Deepstack(torch.tensor([True, False, True]), [torch.zeros(1, h)]))
    with pytest.raises(ValueError, match="keep_layer"):
        prefill(ours, cache, torch.zeros(1, 3, h), _text_positions(0, 3), keep_layer=99)
    assert cache.length == 0                                             # nothing was written by a refusal


# ----------------------------------------------------------------------------------------------------------------
# the real config


def test_real_config_builds_on_meta_with_the_reference_names_and_shapes():
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel

    d = json.load(open(REAL_CONFIG))
    ref_cfg = Qwen3OmniMoeConfig.from_dict(copy.deepcopy(d))
    text = d["thinker_config"]["text_config"]
    with torch.device("meta"):
        ref = Qwen3OmniMoeThinkerTextModel._from_config(ref_cfg.thinker_config.text_config)
        ours = MoEThinker(MoEThinkerConfig.from_dict(text, d["thinker_config"]["tie_word_embeddings"]))
    want = tq.stored_names({"model." + k: tuple(v.shape) for k, v in ref.state_dict().items()})
    want["lm_head.weight"] = (text["vocab_size"], text["hidden_size"])
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want, sorted(set(got) ^ set(want))[:6]
    cfg = ours.cfg
    assert (cfg.decoder.num_layers, cfg.decoder.num_heads, cfg.decoder.num_kv_heads, cfg.decoder.head_dim) == \
        (48, 32, 4, 128)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size) == (128, 8, 768)
    assert all(cfg.sparse_layers) and cfg.decoder.mrope_section == (24, 20, 20)
    # ~30B parameters in all, ~3B active per token (the name's "A3B", encoders not counted here)
    total = sum(p.numel() for p in ours.parameters())
    expert = 3 * text["moe_intermediate_size"] * text["hidden_size"]
    active = total - 48 * (128 - 8) * expert
    assert 29e9 < total < 31.5e9 and 2.5e9 < active < 3.5e9, (total, active)


def test_v4_spelling_and_config_errors():
    d = json.load(open(REAL_CONFIG))
    text = d["thinker_config"]["text_config"]
    v4 = copy.deepcopy(text)
    rope = v4.pop("rope_parameters")
    v4["rope_theta"] = rope["rope_theta"]
    v4["rope_scaling"] = {"type": "default", "mrope_section": rope["mrope_section"], "interleaved": True}
    assert MoEThinkerConfig.from_dict(v4) == MoEThinkerConfig.from_dict(text)
    for key, value, message in [("num_experts_per_tok", 200, "num_experts_per_tok"),
                                ("shared_expert_intermediate_size", 512, "no shared expert"),
                                ("use_qk_norm", False, "use_qk_norm")]:
        bad = {**copy.deepcopy(text), key: value}
        with pytest.raises(ValueError, match=message):
            MoEThinkerConfig.from_dict(bad)
    bad = copy.deepcopy(text)
    del bad["moe_intermediate_size"]
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        MoEThinkerConfig.from_dict(bad)
