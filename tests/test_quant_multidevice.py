"""Quantized weights on 8 host devices: expert parallelism over int8 / fp8 expert stacks (values and scales through
the shard_map, FSDP gathers, tensor-parallel expert_mlp) matches the single-device model, and quantized checkpoints
load sharded: as stored, and quantized at load from a float checkpoint (each device's shard made from the float
region it needs), both the same bytes as on one device.

Needs 8 host devices: `tests/multidevice.py` asks for them on import, and runs this file again in a subprocess when
another module started jax first (a whole-suite run).
"""

import multidevice  # first: asks for 8 host devices before jax starts
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax import quant, sharding
from ming_jax.checkpoint import convert, restore
from ming_jax.config import LLMConfig
from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics

multi = multidevice.multi
RULES = sharding.ShardingRules.preset("ep_fsdp")
test_suite_in_subprocess = multidevice.suite_in_subprocess(__file__)


@multi
@pytest.mark.parametrize("qtype, spec", [("int8", "expert=8"), ("fp8:64", "fsdp=2,expert=2,tensor=2")])
def test_expert_parallel_quantized_model_matches_single_device(qtype, spec):
    cfg = LLMConfig.tiny(num_layers=2)
    model = quant.quantize_model(model_lib.create(cfg, seed=3), qtype)
    b, t = 8, 16
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t))
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(st, i, p):
        m = nnx.merge(graphdef, st)
        return m(m.embed_tokens(i), p).logits

    ref = logits(state, ids, pos)
    mesh = sharding.make_mesh(spec)
    with sharding.use_mesh(mesh, RULES):
        out = logits(jax.device_put(state, sharding.state_shardings(model, mesh, RULES)),
                     sharding.shard_inputs(ids, mesh, RULES), sharding.shard_inputs(pos, mesh, RULES, batch_dim=1))
    numerics.assert_close(f"{qtype} {spec}", np.asarray(out), np.asarray(ref))


@multi
def test_quantized_checkpoints_load_sharded(golden_dir, tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / "llm_backbone" / f, src / f)
    quiet = dict(progress=False, log=lambda m: None)
    f32, q8 = str(tmp_path / "f32"), str(tmp_path / "q8")
    convert.convert(str(src), f32, **quiet)
    convert.convert(str(src), q8, dtype="int8", **quiet)
    one = restore.load(q8).llm
    mesh = sharding.make_mesh("fsdp=2,expert=4")  # expert_embed over fsdp: the contracted D of w_gate is split
    for loaded in (restore.load(q8, mesh=mesh, rules=RULES).llm,
                   restore.load(f32, mesh=mesh, rules=RULES, quantize="int8").llm):
        want = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(one, nnx.Param))}
        leaves = restore.quantized_leaves(loaded)
        assert len(leaves) == 28  # 14 quantized weights
        for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
            name, a = ".".join(map(str, p)), v.get_value()
            if name not in leaves:
                continue
            assert len(a.sharding.device_set) == 8, name
            if name.endswith("moe.w_gate.qvalue"):
                assert a.sharding.spec[2] == "fsdp" and a.sharding.spec[1] == "expert", a.sharding.spec
            got, exp = np.asarray(a), np.asarray(want[name])
            assert np.array_equal(got.view(np.uint8) if got.dtype.itemsize == 1 else got,
                                  exp.view(np.uint8) if exp.dtype.itemsize == 1 else exp), name
