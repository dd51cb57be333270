"""Run by tests/test_convert.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag
must be set before jax is imported, hence a process of its own).

    python tests/convert_multidevice.py CONVERTED_LLM_DIR GOLDEN_LLM_CASE_DIR

Restores a converted LLM checkpoint onto 8 CPU devices twice - with `ming_jax.sharding.param_shardings` (ep_fsdp
preset on a fsdp=2 x expert=4 mesh) and with hand-made NamedShardings - and checks every parameter's placement,
that each device holds only its shard, the values, and the golden logits of a forward pass on the sharded model.
"""

import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ming_jax.checkpoint import restore as checkpoint
from ming_jax.parity import golden, numerics
from ming_jax.models import llm as model_lib, inputs as multimodal
from ming_jax import sharding, weights
from ming_jax.config.llm import LLMConfig
from ming_jax.parity.cases import llm_backbone
from ming_jax.weights.llm import llm_table


def check(model, shardings, reference):
    flat_sh = dict(nnx.to_flat_state(shardings))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var.get_value()
        want = flat_sh[path]
        want = want.get_value() if isinstance(want, nnx.Variable) else want
        key = ".".join(map(str, path))
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (key, arr.sharding, want)
        shard_shape = want.shard_shape(arr.shape)
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards), key
        np.testing.assert_array_equal(np.asarray(arr), reference[key], err_msg=key)


def main(ckpt_dir, case_dir):
    assert jax.device_count() == 8, jax.devices()
    case = golden.load_case(case_dir)
    cfg = LLMConfig.from_official(case.config)
    reference = weights.load_arrays(llm_table(cfg), case.weights, weights.param_shapes(model_lib.create_abstract(cfg)))

    mesh = sharding.make_mesh("data=1,fsdp=2,expert=4,tensor=1")
    rules = sharding.ShardingRules.preset("ep_fsdp")
    model = checkpoint.load_llm(ckpt_dir, mesh=mesh, rules=rules)
    check(model, sharding.param_shardings(model_lib.create_abstract(cfg), mesh, rules), reference)
    sharded = sum(1 for v in jax.tree.leaves(nnx.state(model, nnx.Param)) if not v.sharding.is_fully_replicated)
    assert sharded > 5, sharded

    # Hand-made shardings: the first axis divisible by 8 is split over all devices, the rest replicated.
    flat_mesh = Mesh(np.array(jax.devices()), ("x",))

    def simple(v):
        shape = v.get_value().shape
        spec = [None] * len(shape)
        for i, n in enumerate(shape):
            if n % 8 == 0:
                spec[i] = "x"
                break
        return NamedSharding(flat_mesh, PartitionSpec(*spec))

    abstract = model_lib.create_abstract(cfg)
    own = jax.tree.map(simple, nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    model = checkpoint.load_llm(ckpt_dir, shardings=own)
    check(model, own, reference)

    x = case.inputs
    mm = llm_backbone.multimodal_inputs(x)
    rows = llm_backbone.forward_rows(model, multimodal.prepare(cfg, x["input_ids"], mm=mm), "", case.outputs)
    logits = [r for r in rows if r.name == "logits"]
    assert logits and all(r.ok for r in rows), numerics.report(rows)
    print(f"OK: {len(reference)} parameters restored sharded on {jax.device_count()} devices; logits rel "
          f"{logits[0].rel:.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
