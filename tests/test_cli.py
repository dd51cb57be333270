"""The generation CLI runs end to end with no checkpoint (tiny preset, random weights) and says so."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_cli_without_checkpoint():
    """Also: with libtpu installed (tools/setup_env.sh installs it for the TPU compile tests) and JAX_PLATFORMS
    unset, a CPU host initialises no TPU backend (no libtpu errors; the lock file stays free for other programs)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--prompt", "hi", "--prompt", "a longer one",
                        "--max_new_tokens", "4", "--temperature", "0.7", "--top_k", "20"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "decoding 4/4" in r.stderr
    assert r.stdout.count("+++ ") == 2
    assert "TPU_WORKER_HOSTNAMES" not in r.stderr and "backend 'tpu'" not in r.stderr, r.stderr[:2000]


def test_generate_cli_rejects_full_preset_without_checkpoint():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--preset", "ming-flash-omni-2.0"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "needs --checkpoint" in r.stderr


def _bf16_release(folder):
    """A tiny LLM-only release folder as the release ships: bfloat16 tensors, `torch_dtype: bfloat16`."""
    import json

    import ml_dtypes
    import numpy as np

    from ming_jax import weights
    from ming_jax.checkpoint.safetensors import OutTensor, write_sharded
    from ming_jax.config import LLMConfig
    from ming_jax.models import llm
    from ming_jax.weights.llm import llm_table

    cfg = LLMConfig.tiny()
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in
          weights.export_state_dict(llm.create(cfg, seed=1), llm_table(cfg)).items()}
    tensors = [OutTensor(k, np.dtype(ml_dtypes.bfloat16), v.shape) for k, v in sd.items()]
    folder.mkdir(parents=True)
    write_sharded(str(folder), tensors, lambda t: sd[t.name], 1 << 20)
    (folder / "config.json").write_text(json.dumps(dict(cfg.to_official(), torch_dtype="bfloat16")))
    return folder


@pytest.mark.slow
def test_generate_cli_keeps_a_bf16_release_in_bf16(tmp_path):
    """Parameters stay in the checkpoint's dtype (not float32 on the host) and compute runs in it by default; with
    --dtype float32 both are float32."""
    src = _bf16_release(tmp_path / "release")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "ming_jax.generate", "--checkpoint", str(src), "--prompt_ids", "1,2,3",
            "--max_new_tokens", "2"]
    r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "parameters (" in x)
    assert line.split("parameters (")[1].startswith("bfloat16") and "compute dtype bfloat16" in line, line
    r = subprocess.run(base + ["--dtype", "float32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "parameters (" in x)
    assert "bfloat16" not in line and "compute dtype float32" in line, line


@pytest.mark.slow
def test_generate_cli_applies_the_chat_template_and_reads_conversations(tmp_path):
    """Text prompts get the release's chat template by default (--raw: not); a JSON conversation (system, several
    turns) is one prompt; a bad role is a clear error."""
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    base = [sys.executable, "-m", "ming_jax.generate", "--max_new_tokens", "2"]
    r = subprocess.run(base + ["--conversation", str(tmp_path / "conv.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "1 prompt(s) with the release's chat template" in r.stderr and "conversation 0 (3 turns)" in r.stdout
    r = subprocess.run(base + ["--prompt", "hi", "--raw"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "1 prompt(s) with raw text: 2 tokens" in r.stderr, r.stderr
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "x"}]))
    r = subprocess.run(base + ["--conversation", str(tmp_path / "bad.json")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "role 'robot'" in r.stderr
    r = subprocess.run(base + ["--conversation", str(tmp_path / "conv.json"), "--prompt", "hi"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "not both" in r.stderr  # a prompt is never ignored silently
