"""The real Qwen3-Omni-30B-A3B-Instruct config builds our Talker (+ code predictor) and Code2Wav on the meta
device with exactly the parameter names and shapes the checkpoint stores under `talker.*` and `code2wav.*`.

The reference's modules hold each layer's experts fused (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)); its checkpoints store them per expert (`experts.{e}.gate_proj.weight` ...), and `save_pretrained`
writes them that way too. `tiny_qwen3.stored_names` applies that rule; the tiny checkpoint test checks the rule against
the files save_pretrained actually writes.
"""

import copy
import json

import pytest
import torch

import tiny_qwen3 as tq
from tiny_qwen3 import one_thread  # noqa: F401  (autouse)
from omnivox.talker.code2wav import Code2Wav, Code2WavConfig
from omnivox.talker.qwen3_talker import Qwen3Talker, Qwen3TalkerConfig

REAL_CONFIG = "/work/shared/configs/qwen3-omni-30b-a3b-instruct.config.json"
def _shapes(module, prefix):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_config_builds_on_meta_with_the_reference_names_and_shapes():
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeCode2Wav, Qwen3OmniMoeTalkerForConditionalGeneration)

    d = json.load(open(REAL_CONFIG))
    ref_cfg = Qwen3OmniMoeConfig.from_dict(copy.deepcopy(d))
    with torch.device("meta"):
        ref_talker = Qwen3OmniMoeTalkerForConditionalGeneration._from_config(ref_cfg.talker_config)
        ref_c2w = Qwen3OmniMoeCode2Wav._from_config(ref_cfg.code2wav_config)
        talker = Qwen3Talker(Qwen3TalkerConfig.from_config(d))
        c2w = Code2Wav(Code2WavConfig.from_dict(d["code2wav_config"]))
    assert all(p.is_meta for p in talker.parameters()) and all(p.is_meta for p in c2w.parameters())
    want_talker = tq.stored_names(_shapes(ref_talker, "talker."))
    got_talker = _shapes(talker, "talker.")
    assert got_talker == want_talker, (sorted(set(got_talker) ^ set(want_talker))[:6])
    assert _shapes(c2w, "code2wav.") == _shapes(ref_c2w, "code2wav.")
    # the sizes the report gives: Talker 3.32B (code predictor included), Code2Wav 0.22B
    n_talker = sum(p.numel() for p in talker.parameters())
    n_c2w = sum(p.numel() for p in c2w.parameters())
    assert round(n_talker / 1e9, 2) == 3.32 and round(n_c2w / 1e9, 2) == 0.22
    assert n_talker == sum(p.numel() for p in ref_talker.parameters())
    assert n_c2w == sum(p.numel() for p in ref_c2w.parameters())


def test_real_talker_config_numbers():
    cfg = Qwen3TalkerConfig.from_config(json.load(open(REAL_CONFIG)))
    dec, moe, pred = cfg.decoder, cfg.moe, cfg.code_predictor
    assert (dec.num_layers, dec.hidden_size, dec.num_heads, dec.num_kv_heads, dec.head_dim, dec.vocab_size) == \
        (20, 1024, 16, 2, 128, 3072)
    assert dec.mrope_section == (24, 20, 20) and dec.rope_theta == 1e6
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.shared_intermediate_size,
            moe.norm_topk_prob) == (128, 6, 384, 768, True)
    assert (cfg.accept_hidden_layer, cfg.thinker_hidden_size, cfg.num_code_groups) == (24, 2048, 16)
    assert (pred.num_code_groups, pred.decoder.num_layers, pred.decoder.vocab_size, pred.decoder.mrope_section) == \
        (16, 5, 2048, None)
    assert cfg.speakers == {"aiden": 2303, "chelsie": 2301, "ethan": 2302}
    assert (cfg.codec_pad, cfg.codec_bos, cfg.codec_eos, cfg.codec_nothink, cfg.codec_think_bos,
            cfg.codec_think_eos) == (2148, 2149, 2150, 2155, 2156, 2157)
    assert (cfg.tts_pad, cfg.tts_bos, cfg.tts_eos, cfg.im_start, cfg.user, cfg.assistant) == \
        (151671, 151672, 151673, 151644, 872, 77091)
    assert (cfg.audio_token, cfg.image_token, cfg.video_token) == (151675, 151655, 151656)
    # the reference suppresses codec ids 2048..3071 except codec_eos
    assert cfg.suppress_ids[0] == 2048 and len(cfg.suppress_ids) == 1023 and 2150 not in cfg.suppress_ids


def test_v4_key_spelling_reads_the_same():
    d = json.load(open(REAL_CONFIG))
    v4 = copy.deepcopy(d)
    v4["torch_dtype"] = v4.pop("dtype")
    for sub in (v4["talker_config"]["text_config"], v4["talker_config"]["code_predictor_config"],
                v4["code2wav_config"]):
        params = sub.pop("rope_parameters")
        sub["rope_theta"] = params["rope_theta"]
        if "mrope_section" in params:
            sub["rope_scaling"] = {"type": "default", "mrope_section": params["mrope_section"],
                                   "interleaved": True}
    text = v4["talker_config"]["text_config"]
    text["num_experts"] = text.pop("num_local_experts")
    assert Qwen3TalkerConfig.from_config(v4) == Qwen3TalkerConfig.from_config(d)
    assert Code2WavConfig.from_dict(v4["code2wav_config"]) == Code2WavConfig.from_dict(d["code2wav_config"])


def test_config_errors_are_clear():
    d = json.load(open(REAL_CONFIG))
    bad = copy.deepcopy(d)
    del bad["talker_config"]["codec_bos_id"]
    with pytest.raises(ValueError, match="codec_bos_id"):
        Qwen3TalkerConfig.from_config(bad)
    bad = copy.deepcopy(d)
    bad["talker_config"]["code_predictor_config"]["num_code_groups"] = 8
    with pytest.raises(ValueError, match="num_code_groups"):
        Qwen3TalkerConfig.from_config(bad)
    with pytest.raises(ValueError, match="talker_config"):
        Qwen3TalkerConfig.from_config({"model_type": "qwen3_omni_moe"})
    with pytest.raises(ValueError, match="unknown speaker 'nobody'"):
        Qwen3TalkerConfig.from_config(d).speaker_code("nobody")


def test_tiny_checkpoint_files_hold_exactly_our_names(tmp_path):
    ref = tq.make_reference("wide")
    tensors = tq.save(ref, tmp_path)
    d = json.loads(ref.config.to_json_string())
    talker = Qwen3Talker(Qwen3TalkerConfig.from_config(d))
    c2w = Code2Wav(Code2WavConfig.from_dict(d["code2wav_config"]))
    saved = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(("talker.", "code2wav."))}
    ours = {**_shapes(talker, "talker."), **_shapes(c2w, "code2wav.")}
    assert ours == saved
    # and the per-expert rule above is what save_pretrained does
    ref_names = {**_shapes(ref.talker, "talker."), **_shapes(ref.code2wav, "code2wav.")}
    assert tq.stored_names(ref_names) == saved
