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

import dataclasses
import json
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ming_jax import sharding
from ming_jax.config.llm import PRESETS, LLMConfig

# HBM per chip (one JAX device per chip on these generations), bytes, from Google's spec sheets.
HBM_BYTES = {"v4": 32e9, "v5p": 95e9, "v5e": 16e9, "v6e": 32e9}


def chip_of(topology: str) -> str:
    """"v5p:4x4x4" -> "v5p"."""
    chip = topology.split(":")[0].strip().lower()
    if chip not in HBM_BYTES:
        raise ValueError(f"topology {topology!r}: unknown chip {chip!r} (known: {', '.join(HBM_BYTES)})")
    return chip


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology such as "v5p:4x4x4" (all slices), for compiling only.

    Needs libtpu (`pip install "jax[tpu]"`). Several processes may compile at once: libtpu's single-user lock file is
    for owning real chips, so it is disabled here (ALLOW_MULTIPLE_LIBTPU_LOAD) unless the caller set it.
    """
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip_of(topology)
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)


# --- steps --------------------------------------------------------------------------------------------------------


def optimizer(learning_rate: float = 1e-4) -> optax.GradientTransformation:
    """AdamW; its state is initialised from float32 views of the parameters, so both moments are float32."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def chunked_cross_entropy(w_head, h, labels, chunk: int = 512):
    """Mean token cross-entropy of the logits h @ w_head without materialising [B, T, V] logits.

    h [B, T, D], w_head [D, V], labels [B, T]. The sequence is cut into chunks of `chunk` tokens (every batch row at
    once, so each device works on its own rows); each chunk's float32 logits are built, reduced and dropped, and
    rebuilt in the backward pass (checkpointed). At Ling-flash's 157k vocab a 4096-token row would otherwise hold
    ~7 GB of logits and their gradients per chip. The weight is re-constrained to its parameter layout inside the
    loop so that its gradient accumulates sharded.
    """
    b, t, d = h.shape
    chunk = math.gcd(t, chunk)
    hc = h.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    lc = labels.reshape(b, t // chunk, chunk).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def one(total, xs):
        w = sharding.constrain(w_head, ("embed", "vocab"))
        logits = jnp.einsum("bcd,dv->bcv", xs[0], w.astype(xs[0].dtype), preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))  # [B, c, V]
        return total + optax.softmax_cross_entropy_with_integer_labels(logits, xs[1]).sum(), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (hc, lc))
    return total / (b * t)


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """(params, opt_state, input_ids [B, T], labels [B, T]) -> (params, opt_state, loss)."""

    def step(params, opt_state, input_ids, labels):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            b, t = input_ids.shape
            x = sharding.constrain(model.embed_tokens(input_ids), ("batch", "seq", "act_embed"))
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, None], (3, b, t))
            h = model(x, positions).hidden  # the model's full logits are dead code here: XLA drops them
            w_head = model.embed[...].T if model.lm_head is None else model.lm_head[...]  # as model.head
            return chunked_cross_entropy(w_head, h, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)  # float32 moments promote the arithmetic
        params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)
        return params, opt_state, loss

    return step


def make_decode_step(graphdef):
    """(params, cache, tokens [B], positions [B]) -> (logits [B, V] float32, cache)."""

    def step(params, cache, tokens, positions):
        model = nnx.merge(graphdef, params)
        b = tokens.shape[0]
        x = model.embed_tokens(tokens[:, None])
        pos3 = jnp.broadcast_to(positions[None, :, None], (3, b, 1))
        out = model(x, pos3, cache=cache, logits_at=jnp.zeros((b,), jnp.int32))
        return out.logits, out.cache

    return step


# --- compile ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-chip bytes of one compiled step (XLA's static memory plan)."""

    topology: str
    step: str
    mesh: str
    rules: str
    batch: int
    seq: int
    argument: int
    output: int
    temp: int
    alias: int
    code: int
    capacity: float
    compile_s: float
    note: str = ""
    attention: str = "xla"
    capacity_factor: float = 0.0  # 0: dropless

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp + self.code - self.alias

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def row(self) -> str:
        g = lambda b: f"{b / 1e9:7.2f}"  # noqa: E731
        return (f"{self.topology:<11} {self.step:<6} {self.mesh:<34} {self.rules:<8} {g(self.argument)} "
                f"{g(self.temp)} {g(self.output)} {g(self.alias)} {g(self.total)} / {self.capacity / 1e9:4.0f} GB  "
                f"{'fits' if self.fits else 'DOES NOT FIT'}  ({self.compile_s:.0f}s)")

    @property
    def chips(self) -> int:
        """64 for "v5p:4x4x4"; times the slices for "v5p:4x4x4 x2"."""
        topo, _, slices = self.topology.partition(" x")
        return math.prod(int(d) for d in topo.split(":")[1].split("x")) * (int(slices) if slices else 1)

    def markdown(self) -> str:
        g = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
        cf = f"{self.capacity_factor:g}" if self.capacity_factor else "dropless"
        rules = self.rules + (" (row-major cache)" if self.note == "cache layout default" else "")
        return (f"| {self.topology} | {self.chips} | {self.step} | {self.batch} x {self.seq} | {self.mesh} | "
                f"{rules} | {self.attention} | {cf} | {g(self.argument)} | {g(self.temp)} | {g(self.total)} | "
                f"{self.capacity / 1e9:.0f} | {'yes' if self.fits else '**no**'} |")

    MARKDOWN_HEADER = ("| topology | chips | step | batch x seq | mesh | rules | attention | experts | args | temp | "
                       "total | HBM | fits |\n|---|---:|---|---|---|---|---|---|---:|---:|---:|---:|---|")

    @classmethod
    def load(cls, path: str) -> list["MemoryPlan"]:
        """Plans written by `--json` (derived keys dropped, fields added since default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        with open(path) as fh:
            return [cls(**{k: v for k, v in d.items() if k in names}) for d in json.load(fh)]

    @staticmethod
    def header() -> str:
        return (f"{'topology':<11} {'step':<6} {'mesh':<34} {'rules':<8} {'args':>7} {'temp':>7} {'output':>7} "
                f"{'alias':>7} {'total':>7}   (GB per chip)")


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
    from ming_jax import model as model_lib

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
        a_opt = jax.eval_shape(lambda p: tx.init(_f32(p)), params)
        o_shard = optax.tree_map_params(tx, lambda _, s: s, a_opt, p_shard, transform_non_params=lambda _: replicated)
        a_opt = _abstract(a_opt, o_shard)
    with sharding.use_mesh(mesh, rules):
        if step == "train":
            fn = jax.jit(make_train_step(graphdef, tx), out_shardings=(p_shard, o_shard, replicated),
                         donate_argnums=(0, 1))
            return fn.lower(a_params, a_opt, tokens((batch, seq)), tokens((batch, seq)))
        if step == "decode":
            cache = jax.eval_shape(lambda: model_lib.KVCache.create(cfg, batch, seq))
            c_shard = sharding.kv_cache_shardings(mesh, rules, cache)
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


# --- CLI ----------------------------------------------------------------------------------------------------------


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    if f.table:  # render earlier --json results, compile nothing
        print(MemoryPlan.MARKDOWN_HEADER)
        for path in f.table:
            for plan in MemoryPlan.load(path):
                print(plan.markdown())
        return 0
    overrides = dict(remat=True, attention_impl=f.attention_impl)
    if f.layers:
        overrides["num_layers"] = f.layers
    if f.capacity_factor:
        overrides["moe_capacity_factor"] = f.capacity_factor
    cfg = PRESETS[f.preset](**overrides)
    devices = topology_devices(f.topology, f.num_slices)
    n = len(devices)
    batch = f.batch or (n if f.step == "train" else 4 * n)
    seq = f.seq or (4096 if f.step == "train" else 8192)
    print(f"{cfg.__class__.__name__} {f.preset}: {_param_count(cfg) / 1e9:.1f}B parameters; {f.topology} "
          f"x{f.num_slices} = {n} chips; step={f.step} batch={batch} {'seq' if f.step == 'train' else 'max_len'}="
          f"{seq}; jax {jax.__version__}, libtpu {_libtpu_version()}", flush=True)
    plans = []
    print(MemoryPlan.header(), flush=True)
    for mesh_spec in f.mesh:
        try:
            plan, _ = compile_step(cfg, f.topology, mesh_spec, f.rules, f.step, batch=batch, seq=seq,
                                   num_slices=f.num_slices, devices=devices, cache_layout=f.cache_layout)
        except Exception as e:  # one bad mesh must not hide the others' results
            print(f"{mesh_spec}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        plans.append(plan)
        print(plan.row(), flush=True)
    if f.json:
        with open(f.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(p), total=p.total, fits=p.fits) for p in plans], fh, indent=1)
    return 0 if plans and all(p.fits for p in plans) else 1


def _param_count(cfg: LLMConfig) -> int:
    from ming_jax import model as model_lib

    return model_lib.param_count(model_lib.create_abstract(cfg))


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def _define_flags():
    from absl import flags

    flags.DEFINE_enum("preset", "ming-flash-omni-2.0", list(PRESETS), "LLM config preset.")
    flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4 (64 chips), v6e:16x16.")
    flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice: DCN between them).")
    flags.DEFINE_multi_string("mesh", ["fsdp=-1"], "Mesh spec(s) (sharding.MeshSpec), e.g. fsdp=16,expert=4; "
                              "repeat to compare several.")
    flags.DEFINE_enum("rules", "ep_fsdp", list(sharding.PRESETS), "Sharding rules preset.")
    flags.DEFINE_enum("step", "train", ["train", "decode"], "Which step to compile.")
    flags.DEFINE_integer("batch", 0, "Global batch (default: 1 sequence per chip for train, 4 for decode).")
    flags.DEFINE_integer("seq", 0, "Train sequence length / decode KV-cache length (default 4096 / 8192).")
    flags.DEFINE_integer("layers", 0, "Override the number of layers (0: the preset's).")
    flags.DEFINE_float("capacity_factor", 0.0, "Expert capacity factor (0: dropless).")
    flags.DEFINE_enum("attention_impl", "auto", ["xla", "auto", "splash"],
                      "Attention backend: 'auto' compiles the splash kernel for TPU (in a shard_map under the mesh; "
                      "decode steps against the cache use XLA attention), 'xla' the reference everywhere.")
    flags.DEFINE_enum("cache_layout", "auto", ["auto", "default"],
                      "Decode: KV cache memory layout chosen by the compiler ('auto') or row-major ('default').")
    flags.DEFINE_string("json", "", "Write the memory plans here as JSON.")
    flags.DEFINE_multi_string("table", [], "Print the plans of these --json files as a markdown table and exit.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: main(argv))
