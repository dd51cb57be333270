"""Ahead-of-time compile of the train and decode steps for a TPU topology, from abstract arrays only.

No weights are allocated: the model is `nnx.eval_shape`d, every argument is a `jax.ShapeDtypeStruct` carrying its
NamedSharding on a mesh of the topology's devices (`jax.experimental.topologies`, which works from a CPU host with
libtpu installed), and the real TPU compiler produces the per-chip memory plan. What "fits" means here: argument +
output + temporaries + code - donated (aliased) bytes <= the chip's HBM (Google's spec sheet: v5p 95 GB, v6e 32 GB).
XLA's plan is static; fragmentation and the runtime's own reservations are not in it, so keep some headroom.

  python -m ming_jax.aot --preset ming-flash-omni-2.0 --topology v5p:4x4x4 --mesh fsdp=16,expert=4 --step train
  python -m ming_jax.aot --topology v6e:8x8 --mesh expert=64 --rules ep_tp --step decode --batch 256 --seq 8192

Train step: bf16 parameters, optax AdamW with float32 first and second moments (the update is computed in float32
and rounded into the bf16 parameters), per-layer remat, token cross-entropy in sequence chunks (no [B, T, V]
logits); parameters and optimizer state donated. Decode step: one token per sequence against a preallocated KV
cache of `--seq` slots (donated), logits of that token. Both run the MoE layers expert-parallel when the mesh has
an expert axis > 1 (ragged all-to-all and the compiled Pallas grouped matmuls on TPU).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ming_jax import sharding
from ming_jax.aot.memory_plan import MemoryPlan
from ming_jax.aot.topology import HBM_BYTES, chip_of, topology_devices
from ming_jax.config.llm import LLMConfig
from ming_jax.gen.steps import make_decode_step
from ming_jax.layers.kv_cache import KVCache, kv_cache_shardings
from ming_jax.models import llm as model_lib
from ming_jax.train.optimizer import f32, optimizer
from ming_jax.train.step import make_train_step


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def lower_step(cfg: LLMConfig, mesh, rules: sharding.ShardingRules, step: str, *, batch: int, seq: int,
               cache_layout: str = "auto"):
    """The jitted step lowered for `mesh` from abstract, sharded arguments. seq: training sequence length, or the
    KV-cache length for decode. cache_layout (decode): "auto" lets the compiler choose the KV cache's memory layout
    (`compiled.input_formats` then says which; allocate the cache in it, e.g. by jitting `KVCache.create` with
    that format as out_shardings); "default": row-major. With "default" the TPU compiler gives the layer loop's
    carried cache another tiled layout and copies the MoE stacks in and out of the loop (one cache-sized
    temporary)."""
    abstract = model_lib.create_abstract(cfg)
    graphdef, params = nnx.split(abstract)
    p_shard = sharding.state_shardings(abstract, mesh, rules)
    a_params = _abstract(params, p_shard)
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.int32, sharding=sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (len(shape) - 1),
                                                           shape, what=f"batch of shape {shape}"))
    if step == "train":  # outside the mesh context: eager constants there would go to the (absent) TPU devices
        tx = optimizer()
        a_opt = jax.eval_shape(lambda p: tx.init(f32(p)), params)
        o_shard = optax.tree_map_params(tx, lambda _, s: s, a_opt, p_shard, transform_non_params=lambda _: replicated)
        a_opt = _abstract(a_opt, o_shard)
    with sharding.use_mesh(mesh, rules):
        if step == "train":
            fn = jax.jit(make_train_step(graphdef, tx), out_shardings=(p_shard, o_shard, replicated),
                         donate_argnums=(0, 1))
            return fn.lower(a_params, a_opt, tokens((batch, seq)), tokens((batch, seq)))
        if step == "decode":
            cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq))
            c_shard = kv_cache_shardings(mesh, rules, cache)
            if cache_layout == "auto":  # the compiler picks the cache's layout (in = out, so the donation holds)
                from jax.experimental.layout import Format, Layout

                c_shard = jax.tree.map(lambda s: Format(Layout.AUTO, s), c_shard)
            t = tokens((batch,))
            fn = jax.jit(make_decode_step(graphdef), in_shardings=(p_shard, c_shard, t.sharding, t.sharding),
                         out_shardings=(sharding.named_sharding(mesh, rules, ("batch", "act_vocab")), c_shard),
                         donate_argnums=(1,))
            return fn.lower(a_params, cache, t, t)
    raise ValueError(f"step={step!r} (train or decode)")


def compile_step(cfg: LLMConfig, topology: str, mesh_spec: str, rules_name: str, step: str, *, batch: int, seq: int,
                 num_slices: int = 1, devices: Sequence | None = None,
                 cache_layout: str = "auto") -> tuple[MemoryPlan, object]:
    """Compile one step for a topology; -> (its memory plan, the compiled executable)."""
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.ShardingRules.preset(rules_name)
    t0 = time.perf_counter()
    compiled = lower_step(cfg, mesh, rules, step, batch=batch, seq=seq, cache_layout=cache_layout).compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), step, shape, rules_name, batch, seq,
                      int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0,
                      note=f"cache layout {cache_layout}" if step == "decode" else "",
                      attention=cfg.attention_impl, capacity_factor=cfg.moe_capacity_factor or 0.0)
    return plan, compiled


def _param_count(cfg: LLMConfig) -> int:
    return model_lib.param_count(model_lib.create_abstract(cfg))


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - informational only
        return "?"
