"""Ahead-of-time compile of the train step, the prefill and the generation loop for a TPU topology, from abstract
arrays only.

No weights are allocated: the model is `nnx.eval_shape`d, every argument is a `jax.ShapeDtypeStruct` carrying its
NamedSharding on a mesh of the topology's devices (`jax.experimental.topologies`, which works from a CPU host with
libtpu installed), and the real TPU compiler produces the per-chip memory plan. What "fits" means here: argument +
output + temporaries + code - donated (aliased) bytes <= the chip's HBM (Google's spec sheet: v5p 95 GB, v6e 32 GB).
XLA's plan is static; fragmentation and the runtime's own reservations are not in it, so keep some headroom.

  python -m ming_jax.aot --preset ming-flash-omni-2.0 --topology v5p:4x4x4 --mesh fsdp=16,expert=4 --step train
  python -m ming_jax.aot --topology v6e:8x8 --mesh expert=64 --rules ep_tp --step decode --batch 256 --seq 8192

Train step: bf16 parameters, optax AdamW with float32 first and second moments (the update is computed in float32
and rounded into the bf16 parameters), per-layer remat, token cross-entropy in sequence chunks (no [B, T, V]
logits); parameters and optimizer state donated. Prefill: a [batch, seq] prompt into a fresh cache. Decode: the
generation `while_loop` users run (`ming_jax.gen.text`), `--new_tokens` steps over a donated cache of `--seq`
slots; decode_step: one token of it. All run the MoE layers expert-parallel when the mesh has
an expert axis > 1 (ragged all-to-all and the compiled Pallas grouped matmuls on TPU).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ming_jax import sharding
from ming_jax.aot.memory_plan import MemoryPlan
from ming_jax.aot.topology import HBM_BYTES, chip_of, topology_devices
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen import text
from ming_jax.gen.sampling import SamplingConfig
from ming_jax.gen.steps import make_decode_step, make_prefill
from ming_jax.layers.kv_cache import KVCache, kv_cache_shardings
from ming_jax.models import llm as model_lib
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


STEPS = ("train", "prefill", "decode", "decode_step")


def lower_step(cfg: LLMConfig, mesh, rules: sharding.ShardingRules, step: str, *, batch: int, seq: int,
               cache_layout: str = "auto", runtime: Runtime | None = None, new_tokens: int = 256,
               train: TrainConfig | None = None):
    """The jitted step lowered for `mesh` from abstract, sharded arguments.

    step: "train" (`ming_jax.train.step`, seq = training length); "prefill" (`ming_jax.gen.steps.prefill` of a
    [batch, seq] prompt into a cache of seq + new_tokens slots); "decode" (the generation program users run:
    `ming_jax.gen.text`'s `lax.while_loop` of `new_tokens` steps with its token / position buffers, over a donated
    cache of seq slots); "decode_step" (one token against a cache of seq slots: the step body alone).
    cache_layout (decode_step): "auto" lets the compiler choose the KV cache's memory layout
    (`compiled.input_formats` then says which; allocate the cache in it, e.g. by jitting `KVCache.create` with
    that format as out_shardings); "default": row-major. With "default" the TPU compiler gives the layer loop's
    carried cache another tiled layout and copies the MoE stacks in and out of the loop (one cache-sized
    temporary). runtime: dtypes, kernels, remat, expert parallelism (default: `Runtime.bf16(remat=True)`, how the
    release trains). train: the train step's TrainConfig (default `TrainConfig()`: AdamW, clipping, bias balancing)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    abstract = model_lib.create_abstract(cfg, runtime)
    graphdef, params = nnx.split(abstract)
    p_shard = sharding.state_shardings(abstract, mesh, rules)
    a_params = _abstract(params, p_shard)
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.int32, sharding=sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (len(shape) - 1),
                                                           shape, what=f"batch of shape {shape}"))
    if step == "train":  # outside the mesh context: eager constants there would go to the (absent) TPU devices
        train = TrainConfig() if train is None else train
        t_graphdef, a_state, tx = train_step.abstract_state(abstract, train)
        s_shard = train_step.state_shardings(a_state, tx, mesh, rules)
        a_state = _abstract(a_state, s_shard)
        b_floats = lambda shape: _batched(mesh, rules, shape, jnp.float32)  # noqa: E731
        a_batch = dict(input_ids=tokens((batch, seq)), targets=tokens((batch, seq)),
                       loss_mask=b_floats((batch, seq)), segment_ids=tokens((batch, seq)),
                       positions=tokens((batch, seq)))
    with sharding.use_mesh(mesh, rules):
        if step == "train":  # exactly the step `python -m ming_jax.train` runs; the state donated
            fn = jax.jit(train_step.make_train_step(t_graphdef, train, tx), out_shardings=(s_shard, replicated),
                         donate_argnums=(0,))
            return fn.lower(a_state, a_batch)
        if step == "decode_step":
            cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, runtime.dtype))
            c_shard = kv_cache_shardings(mesh, rules, cache)
            if cache_layout == "auto":  # the compiler picks the cache's layout (in = out, so the donation holds)
                from jax.experimental.layout import Format, Layout

                c_shard = jax.tree.map(lambda s: Format(Layout.AUTO, s), c_shard)
            t = tokens((batch,))
            fn = jax.jit(make_decode_step(graphdef), in_shardings=(p_shard, c_shard, t.sharding, t.sharding),
                         out_shardings=(sharding.named_sharding(mesh, rules, ("batch", "act_vocab")), c_shard),
                         donate_argnums=(1,))
            return fn.lower(a_params, cache, t, t)
        if step == "prefill":
            fn = jax.jit(make_prefill(graphdef, seq + new_tokens))
            return fn.lower(a_params, tokens((batch, seq)), _batched(mesh, rules, (batch, seq), jnp.bool_),
                            jax.ShapeDtypeStruct((3, batch, seq), jnp.int32, sharding=sharding.named_sharding(
                                mesh, rules, (None, "batch", None), (3, batch, seq), what="positions")))
        if step == "decode":
            if new_tokens >= seq:
                raise ValueError(f"decode: the cache of {seq} slots must hold the prompt and {new_tokens} new tokens")
            cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, runtime.dtype))
            cache = _abstract(cache, kv_cache_shardings(mesh, rules, cache))
            logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32, sharding=sharding.named_sharding(
                mesh, rules, ("batch", "act_vocab"), (batch, cfg.vocab_size), what="logits"))
            key = jax.eval_shape(lambda: jax.random.key(0))
            key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
            return text._decode.lower(graphdef, a_params, logits, tokens((batch,)), cache, key,
                                      sampling=SamplingConfig(max_new_tokens=new_tokens), pad_id=0,
                                      return_logits=False)
    raise ValueError(f"step={step!r} (known: {', '.join(STEPS)})")


def _batched(mesh, rules, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(
        mesh, rules, ("batch",) + (None,) * (len(shape) - 1), shape, what=f"batch of shape {shape}"))


def compile_step(cfg: LLMConfig, topology: str, mesh_spec: str, rules_name: str, step: str, *, batch: int, seq: int,
                 num_slices: int = 1, devices: Sequence | None = None, cache_layout: str = "auto",
                 runtime: Runtime | None = None, new_tokens: int = 256,
                 train: TrainConfig | None = None) -> tuple[MemoryPlan, object]:
    """Compile one step for a topology; -> (its memory plan, the compiled executable)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.ShardingRules.preset(rules_name)
    t0 = time.perf_counter()
    compiled = lower_step(cfg, mesh, rules, step, batch=batch, seq=seq, cache_layout=cache_layout,
                          runtime=runtime, new_tokens=new_tokens, train=train).compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), step, shape, rules_name, batch, seq,
                      int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0,
                      note=(f"cache layout {cache_layout}" if step == "decode_step" else
                            f"{new_tokens} new tokens" if step in ("decode", "prefill") else ""),
                      attention=runtime.attention, capacity_factor=runtime.capacity_factor or 0.0)
    return plan, compiled


def _param_count(cfg: LLMConfig) -> int:
    return model_lib.param_count(model_lib.create_abstract(cfg))


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - informational only
        return "?"
