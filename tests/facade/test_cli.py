"""`omnivox ask` end to end: greedy answers equal the reference's, JSON shape, and bad checkpoints give one clear
line on stderr with exit code 2 (never a traceback)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_support import assert_clean_error, omnivox


def reference_greedy(ref, path: Path, text: str, n: int) -> list[int]:
    from transformers import Qwen2_5OmniProcessor

    proc = Qwen2_5OmniProcessor.from_pretrained(str(path))
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = proc.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.thinker.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("variant", ["base", "gqa4_tied"])
def test_ask_json_greedy_matches_reference(tiny_checkpoint, variant):
    path, ref = tiny_checkpoint(variant)
    text = "Hello, world! What is in the picture?"
    r = omnivox("ask", "--model", str(path), "--text", text, "--greedy", "--no-audio", "--json",
                "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "timings"}
    assert set(out["timings"]) >= {"load_s", "first_token_ms", "total_ms", "tokens_per_s"}
    expected = reference_greedy(ref, path, text, 24)
    assert out["token_ids"] == expected
    assert out["finish_reason"] in ("stop", "length")


def test_ask_streams_plain_text(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    r = omnivox("ask", "--model", str(path), "--text", "Hi", "--greedy", "--no-audio", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    j = omnivox("ask", "--model", str(path), "--text", "Hi", "--greedy", "--no-audio", "--json",
                "--max-new-tokens", "12")
    assert r.stdout == json.loads(j.stdout)["text"] + "\n"


def test_ask_seeded_sampling_is_reproducible(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    args = ["ask", "--model", str(path), "--text", "Hi", "--no-audio", "--json", "--max-new-tokens", "16",
            "--seed", "7", "--temperature", "1.5", "--top-p", "0.95", "--top-k", "50"]
    a, b = omnivox(*args), omnivox(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_error_missing_directory(tmp_path):
    r = omnivox("ask", "--model", str(tmp_path / "nope"), "--text", "hi", "--no-audio")
    assert_clean_error(r, "does not exist")


def test_error_missing_config(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("base")
    d = copy_ckpt(path, tmp_path / "c")
    (d / "config.json").unlink()
    assert_clean_error(omnivox("ask", "--model", str(d), "--text", "hi", "--no-audio"), "config.json")


def test_error_wrong_model_type(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("base")
    d = copy_ckpt(path, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(omnivox("ask", "--model", str(d), "--text", "hi", "--no-audio"), "model_type", "llama")


def test_error_truncated_safetensors(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("base")
    d = copy_ckpt(path, tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_clean_error(omnivox("ask", "--model", str(d), "--text", "hi", "--no-audio"), "model.safetensors")


def test_error_missing_tensor(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = tiny_checkpoint("base")
    d = copy_ckpt(path, tmp_path / "c")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["thinker.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_error(omnivox("ask", "--model", str(d), "--text", "hi", "--no-audio"),
                       "thinker.model.layers.1.mlp.up_proj.weight")


def test_error_hub_id_offline(tmp_path):
    r = omnivox("ask", "--model", "Qwen/Qwen2.5-Omni-3B", "--text", "hi", "--no-audio",
                env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(r, "--model")


def test_error_bad_option_values(tiny_checkpoint):
    path, _ = tiny_checkpoint("base")
    r = omnivox("ask", "--model", str(path), "--text", "hi", "--no-audio", "--temperature", "0")
    assert_clean_error(r, "temperature")
    r = omnivox("ask", "--model", str(path), "--text", "hi", "--no-audio", "--max-new-tokens", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
