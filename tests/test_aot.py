"""Ahead-of-time TPU compiles from this CPU host (libtpu's compiler, no TPU): a reduced-size model's train and decode
steps on small v5p and v6e topologies with expert parallelism, their memory plans, and multi-slice meshes.

The full 100B compiles take minutes each: `python -m ming_jax.aot ...` (docs/scaling.md), not CI.
"""

import json
import os
import subprocess
import sys

import pytest
from tpu_compile import need_libtpu

need_libtpu(module_level=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from ming_jax.aot import compile as aot  # noqa: E402
from ming_jax import sharding
from ming_jax.config import LLMConfig  # noqa: E402
from ming_jax.config.runtime import Runtime  # noqa: E402

# Reduced Ling-flash: every feature (dense + MoE layers, groups, MultiRouter, video rope), bf16, widths that tile
# on the MXU, 32 experts so that expert parallelism has several per chip.
REDUCED = LLMConfig.ming_flash_omni_2(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=3,
                                      num_heads=4, num_kv_heads=2, head_dim=128, moe_intermediate_size=128,
                                      num_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                                      pad_token_id=0, eos_token_id=1, image_patch_token=2, video_patch_token=3,
                                      image_start_token=4, video_start_token=5)
RUNTIME = Runtime.bf16(remat=True, attention="xla")


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_reduced_model_train_and_decode_compile_for_tpu_with_expert_parallelism(topology):
    chips = 4
    plans = {}
    for step, batch, seq in (("train", 8, 256), ("decode_step", 16, 512)):
        plan, compiled = aot.compile_step(REDUCED, topology, "fsdp=2,expert=2", "ep_fsdp", step, batch=batch,
                                          seq=seq, runtime=RUNTIME)
        hlo = compiled.as_text()
        assert "ragged-all-to-all" in hlo, "TPU gets the ragged exchange"
        assert "tpu_custom_call" in hlo, "and the compiled Pallas grouped matmuls"
        assert plan.fits and plan.capacity == aot.HBM_BYTES[aot.chip_of(topology)]
        plans[step] = plan
    params = sum(int(np.prod(s)) for s in _param_shapes()) * 2  # bf16
    # Train arguments: bf16 parameters + their float32 master copy + two float32 moments (2 + 4 + 8 bytes per
    # parameter: 7x the bf16 bytes), sharded 4 ways (a few replicated norms on top).
    per_chip = params * 7 / chips
    assert per_chip <= plans["train"].argument <= 1.3 * per_chip
    # Parameters and optimizer state are donated and come back in place.
    assert plans["train"].alias >= 0.95 * plans["train"].argument
    assert plans["decode_step"].argument >= params / chips
    # The KV cache (batch split 4 ways; layout chosen by the compiler) is donated and updated in place.
    cache = 2 * REDUCED.num_layers * 16 * REDUCED.num_kv_heads * 512 * REDUCED.head_dim * 2 / chips
    assert plans["decode_step"].alias >= cache


@pytest.mark.slow
def test_prefill_and_the_generation_loop_compile_for_tpu():
    """The programs users run: the prompt prefill, and the whole decode `while_loop` (token buffers, donated cache)
    of `ming_jax.gen.text`, not just one step; the loop's cache is donated."""
    prefill, compiled = aot.compile_step(REDUCED, "v5p:2x2x1", "fsdp=2,expert=2", "ep_fsdp", "prefill", batch=4,
                                         seq=256, runtime=RUNTIME, new_tokens=64)
    assert prefill.fits and "ragged-all-to-all" in compiled.as_text()
    loop, compiled = aot.compile_step(REDUCED, "v5p:2x2x1", "fsdp=2,expert=2", "ep_fsdp", "decode", batch=8,
                                      seq=512, runtime=RUNTIME, new_tokens=32)
    hlo = compiled.as_text()
    assert loop.fits and "while" in hlo and "ragged-all-to-all" in hlo
    cache = 2 * REDUCED.num_layers * 8 * REDUCED.num_kv_heads * 512 * REDUCED.head_dim * 2 / 4
    assert loop.alias >= cache, "the generation loop updates the donated cache in place"


def test_cli_exits_nonzero_when_a_mesh_fails(tmp_path):
    """A mesh that cannot compile is a failure (exit 1), also with --keep_going, which compiles the others."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "ming_jax.aot", "--preset", "tiny", "--dtype", "float32", "--topology",
            "v5p:2x2x1", "--step", "decode_step", "--batch", "4", "--seq", "64", "--attention_impl", "xla",
            "--mesh", "expert=3", "--mesh", "fsdp=4", "--json", str(tmp_path / "plans.json")]
    r = subprocess.run(base, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 1 and "expert=3: failed" in r.stdout and "fsdp=4" not in r.stdout.split("failed")[-1]
    r = subprocess.run(base + ["--keep_going"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 1 and "1 mesh(es) failed" in r.stdout, r.stdout + r.stderr
    assert [p["mesh"] for p in json.load(open(tmp_path / "plans.json"))] == ["fsdp=4"]


def _param_shapes():
    from flax import nnx

    from ming_jax.models import llm as model_lib

    return [v.shape for _, v in nnx.to_flat_state(nnx.state(model_lib.create_abstract(REDUCED), nnx.Param))]


def test_multi_slice_topology_gets_a_hybrid_mesh_with_data_across_slices():
    devices = aot.topology_devices("v5p:2x2x1", num_slices=2)
    mesh = sharding.make_mesh("fsdp=2,expert=2", devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    for i in range(2):  # each data index is one slice: only the gradient all-reduce crosses DCN
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}


def test_unknown_chip_is_named():
    with pytest.raises(ValueError, match="unknown chip 'v9x'"):
        aot.chip_of("v9x:2x2")
