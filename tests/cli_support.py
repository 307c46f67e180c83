"""The real CLI as a user runs it, for the tests that drive `omnivox ...` in a subprocess: `omnivox(*args)` runs it
offline with one thread, `assert_clean_error` checks the bad-input contract (exit 2, one stderr line, no traceback)."""

import os
import subprocess
import sys


def omnivox(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("OMNIVOX_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "omnivox", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
