"""`omnivox doctor` and the first run without the weights: one line per check with its fix, the exit code says
whether this machine can run the model; a default model that is not downloaded is one clear line within seconds,
never a hang or a traceback."""

import shutil
import socket
import time

import pytest

from cli_support import assert_clean_error, omnivox
from omnivox.doctor import Check, cpu_flags, format_check

REQUIRED = ("python", "torch", "pyav", "checkpoint", "config", "weights", "tokenizer", "processor", "speakers",
            "memory")


def lines_by_name(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines()[:-1]:
        mark, _, rest = line.partition(" ")
        out[rest.split(":")[0]] = line
    return out


def no_hub(tmp_path, endpoint="http://127.0.0.1:9"):
    # an empty hub cache and a Hub that refuses connections: a first run on a machine without the weights
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "", "HF_ENDPOINT": endpoint}


@pytest.fixture
def silent_hub():
    """A Hub endpoint that accepts connections and never answers (a dead network's black hole, kept on loopback
    so no outside network decides the test)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections complete in the backlog; nothing ever reads or replies
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_doctor_passes_on_a_complete_checkpoint(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    r = omnivox("doctor", "--model", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = lines_by_name(r.stdout)
    for name in REQUIRED:
        assert lines[name].startswith("✓"), lines.get(name)
    for name in ("cpu", "cuda", "ffmpeg", "chromium"):
        assert name in lines  # informative lines are always printed
    assert "AVX2" in lines["cpu"] or "torch kernels" in lines["cpu"]
    assert r.stdout.splitlines()[-1] == "omnivox doctor: ready (all required checks pass)"


def test_doctor_names_the_missing_part_and_its_fix(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint()
    broken = tmp_path / "ckpt"
    shutil.copytree(path, broken)
    (broken / "spk_dict.pt").unlink()
    (broken / "tokenizer.json").unlink()
    for f in ("vocab.json", "merges.txt"):
        (broken / f).unlink(missing_ok=True)
    r = omnivox("doctor", "--model", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = lines_by_name(r.stdout)
    assert lines["speakers"].startswith("✗") and "spk_dict.pt" in lines["speakers"] and "fix:" in lines["speakers"]
    assert lines["tokenizer"].startswith("✗") and "fix:" in lines["tokenizer"]
    assert lines["weights"].startswith("✓")
    assert "2 required check(s) failed: tokenizer, speakers" in r.stdout.splitlines()[-1]


def test_doctor_on_a_missing_directory_says_how_to_get_one(tmp_path):
    r = omnivox("doctor", "--model", str(tmp_path / "nothing-here"))
    assert r.returncode == 1
    lines = lines_by_name(r.stdout)
    assert lines["checkpoint"].startswith("✗") and "does not exist" in lines["checkpoint"]
    assert "--model DIR" in lines["checkpoint"]


def test_doctor_without_the_default_model_and_without_network(tmp_path):
    t0 = time.monotonic()
    r = omnivox("doctor", env_extra=no_hub(tmp_path))
    took = time.monotonic() - t0
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    lines = lines_by_name(r.stdout)
    assert lines["checkpoint"].startswith("✗") and "download Qwen/Qwen2.5-Omni-3B" in lines["checkpoint"]
    assert lines["hub"].startswith("✗") and "cannot be reached" in lines["hub"]
    assert took < 60, took  # no download attempt; the probe has its own 5 s deadline


@pytest.mark.parametrize("hub, why", [("refused", "cannot be reached"), ("silent", "did not answer within 5 s")])
def test_first_run_without_the_weights_is_one_line_within_seconds(tmp_path, silent_hub, hub, why):
    # README command 1 on a fresh machine without the weights: a Hub that refuses at once, or one that never answers
    endpoint = silent_hub if hub == "silent" else "http://127.0.0.1:9"
    t0 = time.monotonic()
    r = omnivox("ask", "--text", "hi", env_extra=no_hub(tmp_path, endpoint))
    took = time.monotonic() - t0
    assert_clean_error(r, "Qwen/Qwen2.5-Omni-3B is neither a local directory nor downloaded", why,
                       "download Qwen/Qwen2.5-Omni-3B", "--model DIR")
    assert took < 30, took


def test_offline_mode_is_named_without_any_request(tmp_path, silent_hub):
    env = dict(no_hub(tmp_path, silent_hub), HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    r = omnivox("ask", "--text", "hi", env_extra=env)
    assert_clean_error(r, "offline mode is on (HF_HUB_OFFLINE)", "--model DIR")
    assert time.monotonic() - t0 < 20


def test_cpu_flags_read_x86_and_arm_cpuinfo():
    name, flags = cpu_flags("processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 amx_bf16\n"
                            "processor\t: 1\nmodel name\t: Example CPU\nflags\t\t: fpu\n")
    assert name == "Example CPU" and flags == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags("Features\t: fp asimd bf16\n")[1] == {"fp", "asimd", "bf16"}


def test_format_marks_required_and_informative_failures():
    assert format_check(Check("torch", True, "2.14")) == "✓ torch: 2.14"
    assert format_check(Check("pyav", False, "no av", "pip install av")) == "✗ pyav: no av — fix: pip install av"
    line = format_check(Check("chromium", False, "absent", "apt-get install chromium", required=False))
    assert line.endswith("(informative)")
