"""Checkpoint reading: sharded/single files, strict name matching, dtype casts, corrupt files, speakers, hub ids."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tiny
from omnivox.checkpoint_files import resolve_model_path
from omnivox.config import OmniConfig
from omnivox.errors import CheckpointError, InputError
from omnivox.loading import Checkpoint, checkpoint_dtype, load_module, load_speakers


# A bare Thinker language model with the raw checkpoint names (no forward: only what loading needs).
class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c.hidden_size), RMSNorm(c.hidden_size)


class Rotary(nn.Module):
    """A computed table: non-persistent, rebuilt by reset_buffers after loading."""

    def __init__(self, c):
        super().__init__()
        self.head_dim, self.theta = c.head_dim, c.rope_theta
        self.register_buffer("inv_freq", self._table(), persistent=False)

    def _table(self):
        return 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def reset_buffers(self):
        self.inv_freq = self._table()


class TextModel(nn.Module):
    def __init__(self, c, layers=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers if layers is None else layers))
        self.norm = RMSNorm(c.hidden_size)
        self.norm.keep_fp32 = True
        self.rotary_emb = Rotary(c)


class Thinker(nn.Module):
    def __init__(self, c, layers=None):
        super().__init__()
        self.model = TextModel(c, layers)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)


def meta_thinker(path, layers=None):
    cfg = OmniConfig.from_dir(path)
    with torch.device("meta"):
        return Thinker(cfg.text, layers)


IGNORE = ("audio_tower.", "visual.")


def reference_thinker_tensors(model):
    """The reference Thinker LM's tensors under their raw checkpoint names (transformers 5 renames them in memory)."""
    out = {}
    for k, v in model.thinker.state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("lm_head."):
            out[k] = v
    return out


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("base")


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_reads_the_same_tensors_as_one_file(tiny_checkpoint, base):
    sharded_dir, _ = tiny_checkpoint(tiny.Variant(name="sharded", shard=True))
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    one, many = Checkpoint.open(base[0]), Checkpoint.open(sharded_dir)
    assert one.keys() == many.keys()
    for k in one.keys():
        assert many.shape(k) == one.shape(k)
        assert torch.equal(one.get(k), many.get(k)), k
        assert torch.equal(one.get(k), many.read(k)), k  # plain-read path == memory-mapped path


def test_shards_without_index_are_all_read(tiny_checkpoint, tmp_path):
    sharded_dir, _ = tiny_checkpoint(tiny.Variant(name="sharded", shard=True))
    d = copy_ckpt(sharded_dir, tmp_path / "noindex")
    (d / "model.safetensors.index.json").unlink()
    assert Checkpoint.open(d).keys() == Checkpoint.open(sharded_dir).keys()


def test_v4_config_reads_like_v5(tiny_checkpoint, base):
    v4_dir, _ = tiny_checkpoint(tiny.Variant(name="v4", v4_config=True))
    assert "rope_scaling" in (v4_dir / "config.json").read_text()
    v4, v5 = OmniConfig.from_dir(v4_dir), OmniConfig.from_dir(base[0])
    assert v4.text == v5.text and v4.tokens == v5.tokens


def test_load_module_fills_every_tensor_from_the_checkpoint(base):
    path, ref = base
    model = meta_thinker(path)
    load_module(model, Checkpoint.open(path), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)
    got = model.state_dict()
    expected = reference_thinker_tensors(ref)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert all(not p.is_meta and not p.requires_grad for p in model.parameters())
    rope = model.model.rotary_emb
    assert not rope.inv_freq.is_meta and torch.equal(rope.inv_freq, rope._table())  # rebuilt by reset_buffers
    assert "model.rotary_emb.inv_freq" not in got  # computed tables are not checkpoint tensors


def test_bf16_load_casts_except_keep_fp32_modules(base):
    path, ref = base
    model = meta_thinker(path)
    load_module(model, Checkpoint.open(path), "thinker.", dtype=torch.bfloat16, ignore_prefixes=IGNORE)
    expected = reference_thinker_tensors(ref)
    for name, p in model.named_parameters():
        want = torch.float32 if name.startswith("model.norm.") else torch.bfloat16
        assert p.dtype == want, name
        assert torch.equal(p, expected[name].to(want)), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_tied_weights_share_one_parameter(tiny_checkpoint):
    path, ref = tiny_checkpoint("gqa4_tied")
    ckpt = Checkpoint.open(path)
    assert "thinker.lm_head.weight" not in ckpt
    model = meta_thinker(path)
    with pytest.raises(CheckpointError, match=r"1 missing: thinker\.lm_head\.weight"):
        load_module(model, ckpt, "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)
    model = meta_thinker(path)
    load_module(model, ckpt, "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE,
                tied={"lm_head.weight": "model.embed_tokens.weight"})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, ref.thinker.lm_head.weight)


def _rewrite(path, edit):
    """Rewrite model.safetensors through `edit(tensors) -> tensors`."""
    file = path / "model.safetensors"
    tensors = edit(load_file(str(file)))
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(base, tmp_path):
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    _rewrite(d, lambda t: {k: v for k, v in t.items() if k != "thinker.model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"1 missing: thinker\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_module(meta_thinker(d), Checkpoint.open(d), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)


def test_unexpected_tensor_is_an_error_unless_ignored(base, tmp_path):
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    _rewrite(d, lambda t: {**t, "thinker.model.extra_scale": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected: thinker\.model\.extra_scale"):
        load_module(meta_thinker(d), Checkpoint.open(d), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)
    # without ignore_prefixes the encoders' tensors are unexpected too: the message counts them and shows a few
    with pytest.raises(CheckpointError, match=r"unexpected: .*\.\.\. \(\d+ in all\)"):
        load_module(meta_thinker(d), Checkpoint.open(d), "thinker.", dtype=torch.float32)
    load_module(meta_thinker(d), Checkpoint.open(d), "thinker.", dtype=torch.float32,
                ignore_prefixes=IGNORE + ("model.extra_scale",))


def test_shape_mismatch_is_named_with_both_shapes(base, tmp_path):
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    name = "thinker.model.layers.0.self_attn.k_proj.bias"
    _rewrite(d, lambda t: {**t, name: torch.zeros(t[name].numel() + 1)})
    n = Checkpoint.open(d).shape(name)[0]
    with pytest.raises(CheckpointError, match=rf"another shape: {name} \(checkpoint \[{n}\], model \[{n - 1}\]\)"):
        load_module(meta_thinker(d), Checkpoint.open(d), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)


def test_wrong_model_size_fails_before_loading_anything(base):
    path, _ = base
    model = meta_thinker(path, layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected: thinker\.model\.layers\.1\."):
        load_module(model, Checkpoint.open(path), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("keep", [4, 100, 0.5, 0.999])
def test_truncated_safetensors_names_the_file(base, tmp_path, keep):
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    file = d / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        Checkpoint.open(d)


def test_corrupt_header_names_the_file(base, tmp_path):
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    file = d / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        Checkpoint.open(d)


def test_missing_weights_and_missing_shards_are_checkpoint_errors(tiny_checkpoint, base, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(base[0] / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        Checkpoint.open(d)
    sharded_dir, _ = tiny_checkpoint(tiny.Variant(name="sharded", shard=True))
    d = copy_ckpt(sharded_dir, tmp_path / "sharded")
    lost = sorted(d.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=rf"missing file\(s\): {lost.name}"):
        Checkpoint.open(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


def test_get_of_an_unknown_tensor_is_a_checkpoint_error(base):
    with pytest.raises(CheckpointError, match="holds no tensor thinker.nope"):
        Checkpoint.open(base[0]).get("thinker.nope")


def test_non_persistent_buffer_without_reset_buffers_is_reported(base):
    class NoReset(Thinker):
        def __init__(self, c):
            super().__init__(c)
            self.model.register_buffer("table", torch.zeros(3), persistent=False)

    path, _ = base
    with torch.device("meta"):
        model = NoReset(OmniConfig.from_dir(path).text)
    with pytest.raises(CheckpointError, match=r"model\.table are still on the meta device"):
        load_module(model, Checkpoint.open(path), "thinker.", dtype=torch.float32, ignore_prefixes=IGNORE)


def test_speakers_load_with_their_shapes(base):
    path, ref = base
    speakers = load_speakers(path)
    assert sorted(speakers) == ["Chelsie", "Ethan"]
    raw = torch.load(path / "spk_dict.pt", weights_only=True)
    for name, spk in speakers.items():
        assert spk["bos_token"] == raw[name]["bos_token"] and isinstance(spk["bos_token"], int)
        assert spk["cond"].shape == (1, ref.config.token2wav_config.dit_config.enc_emb_dim)
        assert spk["ref_mel"].shape == (1, 400, ref.config.token2wav_config.dit_config.mel_dim)
        assert torch.equal(spk["ref_mel"], raw[name]["ref_mel"])
    assert load_speakers(path / "spk_dict.pt").keys() == speakers.keys()


class _NotAWeight:
    pass


def test_bad_speaker_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_speakers(tmp_path)
    f = tmp_path / "spk_dict.pt"
    f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable speaker file"):
        load_speakers(f)
    torch.save({"Ethan": {"bos_token": 1, "cond": torch.zeros(1, 4), "ref_mel": _NotAWeight()}}, f)
    with pytest.raises(CheckpointError, match="not a readable speaker file"):  # weights_only refuses objects
        load_speakers(f)
    torch.save({"Ethan": {"bos_token": 1, "cond": torch.zeros(4), "ref_mel": torch.zeros(1, 5, 80)}}, f)
    with pytest.raises(CheckpointError, match=r"'Ethan': cond must be a \(1, D\) tensor, got \(4,\)"):
        load_speakers(f)
    torch.save({"Ethan": {"cond": torch.zeros(1, 4), "ref_mel": torch.zeros(1, 5, 80)}}, f)
    with pytest.raises(CheckpointError, match="no integer bos_token"):
        load_speakers(f)


def test_resolve_model_path(base, tmp_path, monkeypatch):
    assert resolve_model_path(str(base[0])) == base[0]
    with pytest.raises(CheckpointError, match=r"model directory \./no/such/dir does not exist"):
        resolve_model_path("./no/such/dir")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(str(base[0] / "config.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("Qwen/Qwen2.5-Omni-3B")
    msg = str(err.value)
    assert "Qwen/Qwen2.5-Omni-3B is neither a local directory nor downloaded" in msg and "HF_HUB_OFFLINE" in msg
    assert "download Qwen/Qwen2.5-Omni-3B`" in msg and "--model DIR" in msg


def test_checkpoint_dtype():
    assert checkpoint_dtype("bfloat16") is torch.bfloat16
    assert checkpoint_dtype("float16") is torch.float16
    assert checkpoint_dtype("float32") is torch.float32
    assert checkpoint_dtype("torch.float32") is torch.float32
    assert checkpoint_dtype("auto") is torch.bfloat16
    assert checkpoint_dtype("auto", saved="float32") is torch.float32
    assert checkpoint_dtype(torch.float16) is torch.float16
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        checkpoint_dtype("int8")
    with pytest.raises(InputError, match="float64"):
        checkpoint_dtype("auto", saved="float64")


def test_header_sizes_are_checked_against_shapes(base, tmp_path):
    # a header that claims more data than its shape holds is corrupt, even when the file is long enough
    d = copy_ckpt(base[0], tmp_path / "ckpt")
    file = d / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [math.prod(header[name]["shape"]) + 1]
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is truncated or corrupt .*{name}"):
        Checkpoint.open(d)
