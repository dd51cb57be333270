"""Golden parity of the backbone (every tensor of the llm_backbone case) and the parity tool's exit statuses."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ming_jax.parity import numerics, run as parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ming_jax.parity", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_llm_backbone_golden_parity(golden_dir):
    rows = parity.run_case(str(golden_dir / "llm_backbone"))
    print(numerics.report(rows))
    outputs = load_file(str(golden_dir / "llm_backbone" / "outputs.safetensors"))
    assert {r.name for r in rows} == set(outputs)  # every tensor of the case is compared
    assert numerics.all_ok(rows), [r.row() for r in rows if not r.ok]


def test_tool_exit_status_1_when_a_tensor_is_off(golden_dir, tmp_path):
    case = tmp_path / "llm_backbone"
    shutil.copytree(golden_dir / "llm_backbone", case)
    outputs = load_file(str(case / "outputs.safetensors"))
    outputs["layer_1_output"] = outputs["layer_1_output"] * np.float32(1.001)  # 1e-3 relative: over the bar
    (case / "outputs.safetensors").chmod(0o644)
    save_file(outputs, str(case / "outputs.safetensors"))
    r = _tool(case)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "layer_1_output" in r.stdout and "FAIL" in r.stdout and "69 passed, 1 failed" in r.stdout


def test_tool_exit_status_2_for_unknown_kind(tmp_path):
    case = tmp_path / "talker_flow"
    case.mkdir()
    r = _tool(case)
    assert r.returncode == 2 and "talker_flow" in r.stderr


@pytest.mark.parametrize("missing", ["weights.safetensors"])
def test_tool_names_missing_case_files(golden_dir, tmp_path, missing):
    case = tmp_path / "llm_backbone"
    shutil.copytree(golden_dir / "llm_backbone", case)
    (case / missing).unlink()
    r = _tool(case)
    assert r.returncode != 0 and missing in r.stderr
