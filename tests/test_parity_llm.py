"""Golden parity of the backbone (every tensor of the llm_backbone case) and the parity tool's exit statuses."""

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ming_jax.models import inputs as multimodal
from ming_jax.parity import golden, numerics, run as parity
from ming_jax.parity.cases import llm_backbone

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
    _save_outputs(case, outputs)
    r = _tool(case)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _status(r.stdout, "layer_1_output") == "FAIL"
    assert f"{len(outputs) - 1} passed, 1 failed" in r.stdout  # every other tensor of the case still compared


def test_tool_exit_status_1_for_a_tensor_no_runner_produces(golden_dir, tmp_path):
    """An outputs tensor the runner does not know is "not compared", which is a failure, not a silent pass."""
    case = tmp_path / "llm_backbone"
    shutil.copytree(golden_dir / "llm_backbone", case)
    outputs = load_file(str(case / "outputs.safetensors"))
    n_real = len(outputs)
    outputs["layer_1_mystery_tensor"] = np.zeros((1, 91, 4), np.float32)
    _save_outputs(case, outputs)
    r = _tool(case)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _status(r.stdout, "layer_1_mystery_tensor") == "FAIL" and "not compared" in r.stdout
    assert f"{n_real} passed, 1 failed" in r.stdout


def _save_outputs(case, outputs):
    (case / "outputs.safetensors").chmod(0o644)  # copied from a read-only golden tree
    save_file(outputs, str(case / "outputs.safetensors"))


def _status(stdout: str, name: str) -> str:
    """The status column ("ok" / "FAIL") of tensor `name` in the tool's report."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, stdout
    return "FAIL" if "FAIL" in rows[0] else rows[0][-1]


# ---------------------------------------------------------------------------------------------------------------
# The comparisons themselves: integers are integers, top-k pairs are a set, decode positions are what was fed


def test_integer_reference_needs_integer_output():
    ref = np.array([3, 5], np.int64)
    assert numerics.compare("ids", np.array([3, 5], np.int32), ref).ok
    assert numerics.compare("mask", np.array([True, False]), np.array([1, 0], np.int64)).ok
    c = numerics.compare("ids", np.array([3.7, 5.0], np.float32), ref)  # used to pass: cast to int64 gives [3, 5]
    assert not c.ok and "float32" in c.note and "integer" in c.note and "FAIL" in c.row()
    assert not numerics.compare("ids", np.array([3.0, 5.0]), ref).ok  # even when the values are whole
    c = numerics.compare("ids", np.array([3, 6], np.int64), ref)
    assert not c.ok and c.note == "1 differ"
    big = np.array([2**40 + 1], np.int64)  # no wrap-around through a narrow cast
    assert not numerics.compare("ids", np.array([1], np.int32), big).ok


def test_topk_compared_as_sets_of_pairs():
    idx = np.array([[3, 1, 7, 0]], np.int64)
    w = np.array([[0.3, 0.1, 0.7, 0.0]], np.float32)
    perm = [2, 0, 3, 1]
    want = {"g_topk_idx": idx[:, perm], "g_topk_weight": w[:, perm]}  # the reference in another order
    assert all(r.ok for r in llm_backbone.topk_rows("g", idx, w, want))
    swapped = w.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # same ids, weights on the wrong experts
    rows = llm_backbone.topk_rows("g", idx, swapped, want)
    assert [r.ok for r in rows] == [True, False]
    rows = llm_backbone.topk_rows("g", idx.reshape(4, 1), w.reshape(4, 1), want)  # a shape bug still shows
    assert not any(r.ok for r in rows)


def test_decode_positions_are_compared_as_fed(golden_dir, monkeypatch):
    """A decode that feeds the rotary embedding wrong h / w rows fails `mm_decode_position_ids`, although the
    generation loop's own [B, N] position record (what the comparison used to broadcast to three rows) is right."""
    from ming_jax.gen import steps

    case = golden.load_case(str(golden_dir / "llm_backbone"))
    model = llm_backbone.load_model(case)
    prep = multimodal.prepare(model.cfg, case.inputs["input_ids"], mm=llm_backbone.multimodal_inputs(case.inputs))
    rows = {r.name: r for r in llm_backbone.decode_rows(model, prep, "mm_", case.outputs)}
    assert rows["mm_decode_position_ids"].ok, rows["mm_decode_position_ids"].row()

    def shifted_hw(model, tokens, positions, cache, presliced=None):  # rows h / w one ahead of t: what video rope
        b = tokens.shape[0]                                              # must not do
        pos3 = jnp.broadcast_to(positions[None, :, None], (3, b, 1)) + jnp.array([0, 1, 1])[:, None, None]
        out = model(model.embed_tokens(tokens[:, None]), pos3, cache=cache, logits_at=jnp.zeros((b,), jnp.int32),
                    presliced=presliced)
        return out.logits, out.cache

    monkeypatch.setattr(steps, "decode_step", shifted_hw)
    rows = {r.name: r for r in llm_backbone.decode_rows(model, prep, "mm_", case.outputs)}
    assert not rows["mm_decode_position_ids"].ok


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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llm_backbone", "vision_encoder", "audio_encoder", "full_mm_forward"])
def test_bf16_run_against_the_float32_golden(golden_dir, kind):
    """Backbone, towers and the omni forward with bfloat16 parameters and compute, judged by the stated bar
    `numerics.BF16_MODEL` against the float32 official outputs (every tensor of the case compared)."""
    rows = parity.run_case(str(golden_dir / kind), dtype="bfloat16")
    print(numerics.report(rows))
    assert {r.name for r in rows} == set(load_file(str(golden_dir / kind / "outputs.safetensors")))
    assert numerics.all_ok(rows), [r.row() for r in rows if not r.ok]
    if kind == "llm_backbone":  # greedy continuations were compared, not emptied by the near-tie rule
        tokens = {r.name: r for r in rows if r.name.endswith("decode_tokens")}
        assert tokens and all(r.exact for r in tokens.values())


def test_bf16_bar_fails_what_it_should():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 10)).astype(np.float32)
    assert numerics.compare("logits", ref * 1.01, ref, dtype=numerics.MODEL_BF16).ok
    assert not numerics.compare("logits", ref * 1.3, ref, dtype=numerics.MODEL_BF16).ok  # rel L2 0.3
    flipped = ref.copy()
    top = ref.argmax(-1)
    flipped[np.arange(50)[:10], top[:10]] -= 10.0  # 20% of rows change their top-1, tiny L2 change is not the point
    assert "top-1" in numerics.compare("logits", flipped, ref, dtype=numerics.MODEL_BF16).note
    assert not numerics.compare("logits", flipped, ref, dtype=numerics.MODEL_BF16, tol=None).ok
    ids = rng.integers(0, 8, (20, 4))
    wrong = ids.copy()
    wrong[:5] += 1
    assert not numerics.compare("layer_1_topk_idx", wrong, ids, dtype=numerics.MODEL_BF16).ok  # 75% agree
    assert not numerics.compare("position_ids", ids + (ids == 0), ids, dtype=numerics.MODEL_BF16).ok  # exact
    assert not numerics.compare("layer_1_topk_idx", ids.astype(np.float32), ids, dtype=numerics.MODEL_BF16).ok
    # A greedy decode is compared up to each row's first near-tie: row 0 ties at step 2, row 1 never.
    logits = np.zeros((2, 4, 3), np.float32)
    logits[:, :, 0] = 1.0
    logits[0, 2, 1] = 0.99
    np.testing.assert_array_equal(numerics.tie_free_prefix(logits, 0.02), [2, 4])
