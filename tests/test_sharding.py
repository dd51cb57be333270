"""Meshes and sharding rules: mesh specs, the no-axis-twice check, every parameter of every model covered by every
preset, a reviewable layout of the key parameters per preset, sharded init, inputs, caches and constraints.

Needs 8 host devices: `tests/multidevice.py` asks for them on import, and runs this file again in a subprocess when
another module started jax first (a whole-suite run).
"""

import multidevice  # first: asks for 8 host devices before jax starts
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax.gen import omni
from ming_jax import sharding
from ming_jax.layers import kv_cache
from ming_jax.config import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.sharding import MeshSpec, ShardingError, ShardingRules

multi = multidevice.multi


test_suite_in_subprocess = multidevice.suite_in_subprocess(__file__)


# --- mesh specs ---------------------------------------------------------------------------------------------------


def test_mesh_spec_parse_and_resolve():
    assert MeshSpec.parse("dp=2,ep=4") == MeshSpec(data=2, fsdp=-1, expert=4)
    assert MeshSpec.parse("data=2, fsdp=-1, expert=2, tensor=2").resolve(16) == ((2, 2, 2, 2), (1, 1, 1, 1))
    assert MeshSpec.parse("fsdp=-1").resolve(64) == ((1, 64, 1, 1), (1, 1, 1, 1))
    # Several slices go to data by default; the per-slice shape is resolved against the devices of one slice.
    assert MeshSpec.parse("fsdp=-1,expert=4").resolve(64, num_slices=2) == ((1, 8, 4, 1), (2, 1, 1, 1))
    for bad, match in [("fsdp=3", "use 3 devices"), ("fsdp=-1,expert=-1", "at most one -1"), ("pipeline=2", "unknown"),
                       ("fsdp", "name=size"), ("fsdp=-1,expert=3", "do not divide")]:
        with pytest.raises(ShardingError, match=match):
            MeshSpec.parse(bad).resolve(8)


@multi
def test_make_mesh_axes_and_sizes():
    mesh = sharding.make_mesh("data=2,expert=4")
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert dict(sharding.make_mesh("tp=2", jax.devices()[:2]).shape)["tensor"] == 2


# --- rules --------------------------------------------------------------------------------------------------------


def test_a_mesh_axis_is_used_at_most_once_per_array():
    rules = ShardingRules(embed="fsdp", mlp=("tensor", "fsdp"))
    with pytest.raises(ShardingError, match="mesh axis 'fsdp' is used by dim 0 \\('embed'\\) and dim 1 \\('mlp'\\)"):
        sharding.logical_to_spec(("embed", "mlp"), rules, what="parameter w")
    with pytest.raises(ShardingError, match="twice"):
        ShardingRules(batch=("data", "data"))
    with pytest.raises(ShardingError, match="no sharding rule for logical axis 'bogus'"):
        sharding.logical_to_spec(("bogus",), rules)
    with pytest.raises(ShardingError, match="expected a mesh axis name"):
        ShardingRules(embed=3)
    assert sharding.logical_to_spec(("embed", None, "mlp"), ShardingRules(embed="fsdp", mlp=("tensor", "expert"))) \
        == P("fsdp", None, ("tensor", "expert"))
    assert sharding.logical_to_spec(("vocab", "embed"), ShardingRules(embed="fsdp")) == P(None, "fsdp")


def _abstract_models():
    yield "llm", model_lib.create_abstract(LLMConfig.ming_flash_omni_2())
    yield "omni", omni.create_abstract(OmniConfig.ming_flash_omni_2())


@pytest.mark.parametrize("preset", list(sharding.PRESETS))
def test_every_parameter_of_the_full_models_has_a_spec_under_every_preset(preset):
    rules = ShardingRules.preset(preset)
    assert rules.used_axes() <= set(sharding.MESH_AXES)
    for name, model in _abstract_models():
        n = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        rows = sharding.sharding_table(model, rules)  # raises on an unknown name or an axis used twice
        assert len(rows) == n, name
        # Activations and caches too.
        for names in (kv_cache.KV_CACHE_AXES, ("batch", "seq", "act_embed"), ("batch", "seq", "act_vocab"),
                      ("batch", "cache_seq")):
            sharding.logical_to_spec(names, rules)


# The reviewed layout of the key parameters (a golden dump: a rules change shows up here).
Z = ("fsdp", "expert")  # ZeRO axes of dense weights
EXPECTED = {
    "fsdp": {"embed": P(None, Z), "lm_head": P(Z), "moe_layers.attn.qkv": P(None, Z),
             "moe_layers.moe.w_gate": P(None, None, Z), "moe_layers.moe.w_down": P(None, None, None, Z),
             "moe_layers.moe.router.kernel": P(None, None, Z), "moe_layers.moe.router.expert_bias": P()},
    "fsdp_tp": {"embed": P("tensor", Z), "lm_head": P(Z, "tensor"), "moe_layers.attn.qkv": P(None, Z, "tensor"),
                "moe_layers.attn.out": P(None, "tensor", None, Z), "moe_layers.moe.w_gate": P(None, None, Z, "tensor"),
                "moe_layers.moe.w_down": P(None, None, "tensor", Z), "dense_layers.0.mlp.down": P("tensor", Z)},
    "ep_fsdp": {"embed": P("tensor", Z), "moe_layers.moe.w_gate": P(None, "expert", "fsdp", "tensor"),
                "moe_layers.moe.w_up": P(None, "expert", "fsdp", "tensor"),
                "moe_layers.moe.w_down": P(None, "expert", "tensor", "fsdp"),
                "moe_layers.moe.shared.gate": P(None, Z, "tensor"), "moe_layers.input_norm.scale": P(None, Z)},
    "ep_tp": {"embed": P("tensor"), "moe_layers.moe.w_gate": P(None, "expert", None, "tensor"),
              "moe_layers.moe.w_down": P(None, "expert", "tensor"), "moe_layers.attn.qkv": P(None, None, "tensor")},
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_key_parameter_layouts_per_preset(preset):
    rows = {r.split(" ")[0]: r.split(" -> ")[1]
            for r in sharding.sharding_table(model_lib.create_abstract(LLMConfig.tiny()), ShardingRules.preset(preset))}
    for path, spec in EXPECTED[preset].items():
        assert rows[path] == str(spec), f"{preset}: {path} is {rows[path]}, expected {spec}"


@multi
def test_param_shardings_match_the_state_and_name_uneven_splits():
    cfg = LLMConfig.tiny(num_layers=2)
    abstract = model_lib.create_abstract(cfg)
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    rules = ShardingRules.preset("ep_fsdp")
    sh = sharding.param_shardings(abstract, mesh, rules)
    assert jax.tree.structure(sh) == jax.tree.structure(nnx.state(abstract, nnx.Param))
    flat = sharding.flat_param_shardings(abstract, mesh, rules)
    assert flat["moe_layers.moe.w_gate"].spec == P(None, "expert", "fsdp", "tensor")
    assert set(flat) == {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    # tiny has 2 KV heads: tensor=4 cannot split them, and the error names the parameter.
    with pytest.raises(ShardingError, match=r"parameter dense_layers\.0\.attn\.qkv: dim 1 \('kv_heads'\) of size 2"):
        sharding.param_shardings(abstract, sharding.make_mesh("fsdp=2,tensor=4"), rules)
    with pytest.raises(ShardingError, match="absent from the mesh"):
        sharding.param_shardings(abstract, jax.sharding.Mesh(np.array(jax.devices()), ("x",)), rules)


@multi
def test_full_omni_model_shards_evenly_on_an_8_device_mesh():
    """Every parameter of the released sizes divides on (fsdp=2, expert=2, tensor=2) under every preset."""
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    model = omni.create_abstract(OmniConfig.ming_flash_omni_2())
    for preset in sharding.PRESETS:
        sharding.param_shardings(model, mesh, ShardingRules.preset(preset))


@multi
def test_init_sharded_places_each_parameter_in_its_shard_with_the_plain_values():
    cfg = LLMConfig.tiny(num_layers=2)
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    rules = ShardingRules.preset("ep_fsdp")
    model = sharding.init_sharded(lambda: model_lib.BailingMoeV2(cfg, rngs=nnx.Rngs(4)), mesh, rules)
    ref = model_lib.create(cfg, seed=4)
    want = sharding.flat_param_shardings(model, mesh, rules)
    for (p, v), (_, r) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(ref, nnx.Param))):
        path = ".".join(map(str, p))
        assert v[...].sharding.is_equivalent_to(want[path], v[...].ndim), path
        numerics.assert_close(path, v[...], r[...])


@multi
def test_inputs_caches_and_activation_constraints():
    cfg = LLMConfig.tiny()
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    rules = ShardingRules.preset("ep_fsdp")
    ids = sharding.shard_inputs(np.zeros((8, 5), np.int32), mesh, rules)
    assert ids.sharding.spec == P(("data", "fsdp", "expert"))
    with pytest.raises(ShardingError, match="dim 0 \\('batch'\\) of size 6"):
        sharding.shard_inputs(np.zeros((6, 5), np.int32), mesh, rules)
    cache = jax.eval_shape(lambda: model_lib.KVCache.create(cfg, 8, 32))
    cs = kv_cache.kv_cache_shardings(mesh, rules, cache)
    assert cs.k_moe.spec == P(None, ("data", "fsdp", "expert"), "tensor")  # [L, B, K, S, hd]
    assert cs.valid.spec == P(("data", "fsdp", "expert")) and cs.length.spec == P()

    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "seq", "act_embed")) is x  # no mesh: identity

    def f(x):
        return sharding.constrain(x * 2, ("batch", "seq", "act_embed"))

    with sharding.use_mesh(mesh, rules):
        y = jax.jit(f)(x)
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"))), 3)
    assert not y.sharding.is_fully_replicated
    with pytest.raises(ShardingError, match="absent from the mesh"):
        with sharding.use_mesh(jax.sharding.Mesh(np.array(jax.devices()), ("x",)), rules):
            pass
