"""Logical axis names -> mesh axes: one typed rules object, its presets, and the PartitionSpec of one array."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ming_jax.sharding.mesh import Axes, ShardingError

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
    conv_in: Axes = None  # input / output channels of the image VAE's convolutions (replicated: ~84M parameters)
    conv_out: Axes = None
    lora_rank: Axes = None  # the rank axis of LoRA factors (`ming_jax.lora`): a few to a few dozen, replicated

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
