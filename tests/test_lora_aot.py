"""The LoRA / QLoRA train step compiled for TPU from this CPU host (libtpu's compiler): a reduced model on a 4-chip
v5p slice, its memory plan against full training's. The full-size plans (v5p-128) are in docs/training.md
(`python -m ming_jax.aot --step train --lora_rank 16 ...`), not CI."""

import pytest
from tpu_compile import need_libtpu

need_libtpu(module_level=True)

from ming_jax import lora, sharding  # noqa: E402
from ming_jax.aot import compile as aot  # noqa: E402
from ming_jax.aot.topology import topology_devices  # noqa: E402
from test_aot import REDUCED, RUNTIME  # noqa: E402

TOPOLOGY, MESH, RULES = "v5p:2x2x1", "fsdp=2,expert=2", "ep_fsdp"


@pytest.mark.slow
def test_qlora_train_step_compiles_with_a_fraction_of_full_trainings_state():
    lcfg = lora.LoraConfig(16, 16.0)
    plan, compiled = aot.compile_step(REDUCED, TOPOLOGY, MESH, RULES, "train", batch=8, seq=256, runtime=RUNTIME,
                                      quantize="int8", lora=lcfg)
    assert plan.fits and "tpu_custom_call" in compiled.as_text(), "the quantized Pallas grouped matmuls"
    mesh = sharding.make_mesh(MESH, topology_devices(TOPOLOGY))
    rules = sharding.ShardingRules.preset(RULES)
    full = aot.train_state_bytes(REDUCED, mesh, rules, runtime=RUNTIME)
    qlora = aot.train_state_bytes(REDUCED, mesh, rules, runtime=RUNTIME, quantize="int8", lora=lcfg)
    assert full["frozen"] < 1e4 and qlora["params"] < 0.1 * full["params"]  # full: everything but expert biases trains
    assert qlora["opt_state"] < 0.1 * full["opt_state"] and qlora["master"] < 0.1 * full["master"]
    # compiled arguments: int8 base + adapters + their AdamW state, against bf16 params + master + moments (7x bf16)
    assert plan.argument < 0.3 * (full["params"] + full["opt_state"] + full["master"])
    assert plan.alias >= 0.95 * plan.argument, "state donated, updated in place"
