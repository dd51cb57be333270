"""Device meshes and the logical-axis sharding rules that place parameters, inputs and activations on them.

Mesh axes, ordered from the least to the most communication-hungry (the order `mesh_utils` lays onto the torus):
  data    pure data parallelism: parameters replicated, batch split (across slices by default: DCN-friendly);
  fsdp    batch split and parameters sharded on their model dim (gathered per layer; ZeRO-3);
  expert  batch split outside the MoE, routed experts split inside it (`ming_jax.moe.expert_parallel`); dense
          weights may be ZeRO-sharded over it too;
  tensor  Megatron-style split of heads / MLP width / vocab; the batch is *not* split over it.

Every parameter carries logical axis names (`ming_jax.layers.params`). A `ShardingRules` maps each logical name to a
mesh axis, a tuple of axes or None (replicated); `logical_to_spec` turns one array's names into a `PartitionSpec`
and refuses a mesh axis used twice in that array. Presets (`ShardingRules.preset("ep_fsdp")`) cover the layouts we
use; `param_shardings(abstract_model, mesh, rules)` gives the NamedSharding of every parameter (the checkpoint
loader uses it), `init_sharded` builds a model directly in its sharded layout (never materialising it on one
device), and `use_mesh(mesh, rules)` activates both for tracing: `constrain` and the MoE block read them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Callable, Iterator, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ming_jax.layers.params import logical_axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Axes = Union[str, tuple[str, ...], None]


class ShardingError(ValueError):
    """A rules / mesh / array combination that cannot be placed (unknown name, axis used twice, uneven split)."""


# --- mesh -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the four mesh axes. `data` ... `tensor` are within one slice (ICI); `dcn_*` multiply them across
    slices (DCN). One size per group may be -1: it takes the remaining devices. With several slices and no `dcn_*`
    given, the slices go to `data` (the only axis whose traffic - one gradient all-reduce per step - suits DCN)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """"data=2,fsdp=-1,expert=8" (also "dp", "ep", "tp" as short names; "dcn_data=2" for slices)."""
        short = {"dp": "data", "ep": "expert", "tp": "tensor"}
        kw = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            m = re.fullmatch(r"([a-z_]+)\s*=\s*(-?\d+)", item)
            if not m:
                raise ShardingError(f"mesh spec item {item!r}: expected name=size (in {text!r})")
            name = short.get(m.group(1), m.group(1))
            if name not in {f.name for f in dataclasses.fields(cls)}:
                raise ShardingError(f"mesh spec {text!r}: unknown axis {m.group(1)!r} (axes: {', '.join(MESH_AXES)})")
            kw[name] = int(m.group(2))
        return cls(**kw)

    def resolve(self, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """-> (ICI shape, DCN shape), each ordered as MESH_AXES, products = devices per slice and slices."""
        if num_devices % num_slices:
            raise ShardingError(f"{num_devices} devices do not split into {num_slices} equal slices")
        ici = _fill([self.data, self.fsdp, self.expert, self.tensor], num_devices // num_slices, "per-slice")
        dcn = _fill([self.dcn_data, self.dcn_fsdp, self.dcn_expert, self.dcn_tensor], num_slices, "dcn")
        return ici, dcn

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, (self.data, self.fsdp, self.expert, self.tensor)))


def _fill(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"{what} mesh sizes {sizes}: sizes must be >= 1 with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if total % known:
            raise ShardingError(f"{what} mesh sizes {sizes} do not divide {total} devices")
        sizes[free[0]] = total // known
    if math.prod(sizes) != total:
        raise ShardingError(f"{what} mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
                            f"not the {total} available")
    return tuple(sizes)


def make_mesh(spec: MeshSpec | str, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES, laid out for the interconnect.

    Devices that report several `slice_index` values get a hybrid mesh (ICI shape inside each slice, DCN shape
    across slices); otherwise `mesh_utils.create_device_mesh` maps the axes onto the physical torus (on TPU) or
    simply reshapes (CPU / GPU).
    """
    spec = MeshSpec.parse(spec) if isinstance(spec, str) else spec
    devices = list(jax.devices() if devices is None else devices)
    slices = sorted({getattr(d, "slice_index", None) or 0 for d in devices})
    ici, dcn = spec.resolve(len(devices), len(slices))
    if len(slices) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --- rules ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis / tuple of mesh axes / None (replicated).

    Parameter names come from the modules; activation names (`batch`, `seq`, `act_*`, `cache_seq`) are used by
    inputs, caches and `constrain`. Activation dims get their own names so that, e.g., FSDP can shard weights on
    `embed` over `fsdp` while the batch uses `fsdp` too: one array never carries both.
    """

    # activations, inputs, caches
    batch: Axes = None
    seq: Axes = None
    act_embed: Axes = None
    act_heads: Axes = None
    act_vocab: Axes = None
    cache_seq: Axes = None
    # parameters
    layers: Axes = None
    vocab: Axes = None
    embed: Axes = None
    mlp: Axes = None
    heads: Axes = None
    kv_heads: Axes = None
    qkv: Axes = None
    head_dim: Axes = None
    experts: Axes = None
    expert_embed: Axes = None  # the model dim of routed-expert weights (embed minus whatever splits the experts)
    expert_mlp: Axes = None
    gates: Axes = None
    router_experts: Axes = None
    norm: Axes = None
    patch: Axes = None
    pos: Axes = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, f.name, v)
            ok = v is None or isinstance(v, str) or (isinstance(v, tuple) and all(isinstance(a, str) for a in v))
            if not ok:
                raise ShardingError(f"rule {f.name}={v!r}: expected a mesh axis name, a tuple of them, or None")
            axes = (v,) if isinstance(v, str) else (v or ())
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rule {f.name}={v!r} names a mesh axis twice")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def mesh_axes(self, name: str) -> tuple[str, ...]:
        """Mesh axes of one logical name, as a tuple (empty: replicated)."""
        if name not in self.names():
            raise ShardingError(f"no sharding rule for logical axis {name!r} (known: {', '.join(self.names())})")
        v = getattr(self, name)
        return (v,) if isinstance(v, str) else (v or ())

    def used_axes(self) -> set[str]:
        return {a for n in self.names() for a in self.mesh_axes(n)}

    def replace(self, **overrides) -> "ShardingRules":
        return dataclasses.replace(self, **overrides)

    def check_mesh(self, mesh) -> None:
        missing = sorted(self.used_axes() - set(mesh.axis_names))
        if missing:
            raise ShardingError(f"rules use mesh axes {missing} absent from the mesh {tuple(mesh.axis_names)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ShardingRules":
        if name not in PRESETS:
            raise ShardingError(f"unknown sharding preset {name!r} (known: {', '.join(PRESETS)})")
        return PRESETS[name].replace(**overrides)


# The batch is split over every axis that does not split weights along a contracted dim: data, fsdp and expert (the
# expert axis is data parallel outside the MoE layers). `tensor` never splits the batch. Dense weights are sharded
# (ZeRO-3) over fsdp and expert; routed-expert weights split E over expert where expert parallelism is on, so their
# model dim ("expert_embed") uses fsdp only.
_BATCH = ("data", "fsdp", "expert")
_ZERO = ("fsdp", "expert")
_TP = dict(vocab="tensor", mlp="tensor", heads="tensor", kv_heads="tensor", expert_mlp="tensor", act_heads="tensor",
           act_vocab="tensor")

PRESETS: dict[str, ShardingRules] = {
    # ZeRO-3: every weight split on its model dim, all-gathered per layer; no expert parallelism.
    "fsdp": ShardingRules(batch=_BATCH, embed=_ZERO, expert_embed=_ZERO),
    # FSDP + Megatron tensor parallelism on heads / MLP width / vocab.
    "fsdp_tp": ShardingRules(batch=_BATCH, embed=_ZERO, expert_embed=_ZERO, **_TP),
    # Experts split over `expert` (one shard_map exchange per MoE layer), FSDP + optional TP for everything else.
    "ep_fsdp": ShardingRules(batch=_BATCH, embed=_ZERO, expert_embed="fsdp", experts="expert", **_TP),
    # Decode-oriented: experts over `expert`, TP for the rest, no FSDP gathers per token (dense weights replicated
    # over data / fsdp / expert).
    "ep_tp": ShardingRules(batch=_BATCH, experts="expert", **_TP),
}


def logical_to_spec(names: Sequence[str | None], rules: ShardingRules, *, what: str = "array") -> PartitionSpec:
    """Logical names of one array's dims -> PartitionSpec. A mesh axis may appear at most once per array."""
    entries, seen = [], {}
    for dim, name in enumerate(names):
        axes = () if name is None else rules.mesh_axes(name)
        for a in axes:
            if a in seen:
                raise ShardingError(f"{what} {tuple(names)}: mesh axis {a!r} is used by dim {seen[a]} "
                                    f"({names[seen[a]]!r}) and dim {dim} ({name!r})")
            seen[a] = dim
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def named_sharding(mesh: Mesh, rules: ShardingRules, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   *, what: str = "array") -> NamedSharding:
    """NamedSharding of one array; with `shape`, also checks that each split dim divides evenly."""
    spec = logical_to_spec(names, rules, what=what)
    rules.check_mesh(mesh)
    if shape is not None:
        if len(shape) != len(names):
            raise ShardingError(f"{what}: shape {tuple(shape)} has {len(shape)} dims but {len(names)} logical names")
        for dim, entry in enumerate(spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            n = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % n:
                raise ShardingError(f"{what}: dim {dim} ({names[dim]!r}) of size {shape[dim]} does not split over "
                                    f"mesh axes {axes} of total size {n}")
    return NamedSharding(mesh, spec)


def _path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _variable_shardings(state, mesh: Mesh, rules: ShardingRules):
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(p, v):
        if isinstance(v, nnx.Param):
            sh = named_sharding(mesh, rules, logical_axes(v), v.get_value().shape, what=f"parameter {_path(p)}")
        else:
            sh = replicated
        return v.replace(sh)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_model, mesh: Mesh, rules: ShardingRules):
    """The NamedSharding of every parameter, as a pytree with exactly the structure of `nnx.state(model, nnx.Param)`
    (each Variable holds its NamedSharding as value): usable as jit in/out shardings, as a `jax.device_put` target,
    with `jax.tree.leaves`, or by path via `flat_param_shardings`.

    Raises ShardingError naming the parameter when a logical name has no rule, a mesh axis is used twice, or a split
    dim does not divide evenly.
    """
    return _variable_shardings(nnx.state(abstract_model, nnx.Param), mesh, rules)


def state_shardings(abstract_model, mesh: Mesh, rules: ShardingRules):
    """Like `param_shardings` for the model's whole state (`nnx.state(model)`): parameters by rule, any other
    variable replicated."""
    return _variable_shardings(nnx.state(abstract_model), mesh, rules)


def flat_param_shardings(abstract_model, mesh: Mesh, rules: ShardingRules) -> dict[str, NamedSharding]:
    """{dotted parameter path ("moe_layers.moe.w_gate", as in `ming_jax.weights`): NamedSharding}."""
    return {".".join(map(str, p)): v.get_value()
            for p, v in nnx.to_flat_state(param_shardings(abstract_model, mesh, rules))}


def sharding_table(abstract_model, rules: ShardingRules) -> list[str]:
    """One line per parameter, "path shape (logical names) -> PartitionSpec": a reviewable dump of a layout."""
    rows = []
    for p, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
        path = ".".join(map(str, p))
        names = logical_axes(v)
        rows.append(f"{path} {tuple(v.get_value().shape)} {names} -> "
                    f"{logical_to_spec(names, rules, what=f'parameter {path}')}")
    return rows


# --- placement --------------------------------------------------------------------------------------------------------


def shard_inputs(tree, mesh: Mesh, rules: ShardingRules, *, batch_dim: int = 0):
    """Put host arrays on the mesh, dim `batch_dim` of each split by the `batch` rule (scalars replicated).

    For other layouts build the sharding with `named_sharding` and `jax.device_put` directly.
    """

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        names = [None] * x.ndim
        names[batch_dim] = "batch"
        return jax.device_put(x, named_sharding(mesh, rules, names, x.shape, what=f"input of shape {x.shape}"))

    return jax.tree.map(one, tree)


def kv_cache_shardings(mesh: Mesh, rules: ShardingRules, cache):
    """NamedShardings for a `ming_jax.model.KVCache` (concrete or abstract): stacks by KV_CACHE_AXES."""
    from ming_jax.model import KV_CACHE_AXES, KVCache

    stack = lambda a, w: named_sharding(mesh, rules, KV_CACHE_AXES, a.shape, what=f"kv cache {w}")  # noqa: E731
    return KVCache(stack(cache.k_dense, "k_dense"), stack(cache.v_dense, "v_dense"), stack(cache.k_moe, "k_moe"),
                   stack(cache.v_moe, "v_moe"),
                   named_sharding(mesh, rules, ("batch", "cache_seq"), cache.valid.shape, what="kv cache valid"),
                   NamedSharding(mesh, PartitionSpec()))


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: ShardingRules) -> nnx.Module:
    """Build `make()` with every variable created directly in its shard (one jitted init with `out_shardings`).

    `make` must be deterministic (it is traced twice: once abstractly for the shapes, once inside the init).
    """
    abstract = nnx.eval_shape(make)
    graphdef, _ = nnx.split(abstract)
    shardings = state_shardings(abstract, mesh, rules)

    def init():
        return nnx.state(make())

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# --- activation context ---------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar("ming_jax_sharding",
                                                                                            default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules) -> Iterator[Mesh]:
    """Make `mesh` the context mesh and `rules` the active rules (read by `constrain` and the MoE block).

    A mesh of this process's devices is set with `jax.set_mesh` (jit then places uncommitted inputs on it). A mesh
    of devices that cannot run here - a TPU topology compiled for from a CPU host (`ming_jax.aot`) - only sets the
    abstract mesh, so that eager constants made while tracing stay on the default device. The rules are read at
    trace time: a function jitted under one set of rules keeps them in its cache entry for the same mesh.
    """
    rules.check_mesh(mesh)
    live = set(jax.devices())
    ctx = (jax.set_mesh(mesh) if all(d in live for d in mesh.devices.flat)
           else jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    token = _ACTIVE.set((mesh, rules))
    try:
        with ctx:
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Any, ShardingRules, Mesh | None] | None:
    """(abstract mesh, rules, concrete mesh or None) of the current trace, or None when no mesh is set.

    A mesh set with `jax.set_mesh` alone (no `use_mesh`) gets the `ep_fsdp` preset rules.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    ctx = _ACTIVE.get()
    if ctx is not None and tuple(ctx[0].shape.items()) == tuple(mesh.shape.items()):
        return mesh, ctx[1], ctx[0]
    return mesh, PRESETS["ep_fsdp"], None


def constrain(x, names: Sequence[str | None]):
    """`with_sharding_constraint` of an activation by logical names under the active mesh; identity without one."""
    act = active()
    if act is None:
        return x
    mesh, rules, _ = act
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
