"""int8 / fp8 weights compiled for TPU slices from this CPU host (libtpu, no TPU): a reduced Ling-flash's decode step
and generation loop with quantized weights, expert-parallel, on v5e-8 and v6e-4 meshes; the quantized Pallas kernels
are in the program and the weights take about half the bytes of bf16. The full 100B plans (docs/scaling.md) take
minutes each: `python -m ming_jax.aot --quantize int8 ...`, not CI."""

import re

import numpy as np
import pytest
from tpu_compile import need_libtpu

need_libtpu(module_level=True)

from ming_jax import quant  # noqa: E402
from ming_jax.aot import compile as aot  # noqa: E402
from ming_jax.config import LLMConfig  # noqa: E402
from ming_jax.config.runtime import Runtime  # noqa: E402
from ming_jax.models import llm  # noqa: E402

REDUCED = LLMConfig.ming_flash_omni_2(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=3,
                                      num_heads=4, num_kv_heads=2, head_dim=128, moe_intermediate_size=128,
                                      num_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                                      pad_token_id=0, eos_token_id=1, image_patch_token=2, video_patch_token=3,
                                      image_start_token=4, video_start_token=5)
RUNTIME = Runtime.bf16(remat=True, attention="xla")


def _weights(qtype):
    abstract = llm.create_abstract(REDUCED, RUNTIME)
    if qtype:
        quant.quantize_model(abstract, qtype)
    return sum(quant.weight_bytes(abstract).values())


@pytest.mark.parametrize("topology, mesh, step, qtype", [("v5e:2x4", "expert=8", "decode_step", "int8"),
                                                         ("v6e:2x2", "expert=4", "decode", "fp8")])
def test_quantized_decode_compiles_for_128gb_slices(topology, mesh, step, qtype):
    plan, compiled = aot.compile_step(REDUCED, topology, mesh, "ep_fsdp", step, batch=16, seq=512, runtime=RUNTIME,
                                      quantize=qtype, new_tokens=32)
    hlo = compiled.as_text()
    assert "ragged-all-to-all" in hlo and plan.fits and plan.weights == qtype
    kernels = set(re.findall(r"ming_gmm\w*", hlo))
    # the int8 / fp8 grouped matmuls (reading the layer scan's expert stacks in place: "_q_stacked")
    assert kernels and all(k.endswith(("_q", "_q_stacked")) for k in kernels), kernels
    chips = int(np.prod([int(d) for d in topology.split(":")[1].split("x")]))
    q_bytes, bf16_bytes = _weights(qtype), _weights(None)
    assert q_bytes < 0.6 * bf16_bytes
    # arguments: the quantized weights (split over the chips, small replicated norms) + the KV cache
    cache = 2 * REDUCED.num_layers * 16 * REDUCED.num_kv_heads * 512 * REDUCED.head_dim * 2 / chips
    assert q_bytes / chips <= plan.argument <= 1.25 * q_bytes / chips + cache + (1 << 20), plan
    assert plan.bytes_accessed > 0
