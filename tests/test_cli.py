"""The generation CLI runs end to end with no checkpoint (tiny preset, random weights) and says so."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_cli_without_checkpoint():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--prompt", "hi", "--prompt", "a longer one",
                        "--max_new_tokens", "4", "--temperature", "0.7", "--top_k", "20"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "decoding 4/4" in r.stderr
    assert r.stdout.count("+++ ") == 2


def test_generate_cli_rejects_full_preset_without_checkpoint():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--preset", "ming-flash-omni-2.0"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "needs --checkpoint" in r.stderr
