"""Placing trees on a mesh: the NamedSharding of every parameter (from its logical axis names), of inputs, of any
tree whose leaves carry axis names (caches, optimizer state), and sharded initialisation."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ming_jax.sharding.context import use_mesh
from ming_jax.sharding.rules import ShardingRules, logical_to_spec, named_sharding


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a parameter was created with (`ming_jax.layers.params.param`); None per dim if none."""
    meta = variable.get_metadata()
    axes = meta.get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * variable.get_value().ndim


def tree_shardings(tree, axes, mesh: Mesh, rules: ShardingRules, *, what: str = "tree"):
    """NamedShardings for `tree` (arrays or ShapeDtypeStructs) whose leaves' logical names are the matching leaves
    of `axes` (tuples of names; `()` for a replicated scalar). Each split dim is checked to divide evenly."""
    def one(names, a):
        return named_sharding(mesh, rules, names, a.shape, what=f"{what} leaf {tuple(names)}")

    return jax.tree.map(one, axes, tree, is_leaf=lambda x: isinstance(x, tuple))


def _path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def variable_shardings(state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings for any nnx State (a whole model's or a subset, e.g. the trainable parameters): parameters by
    rule, other variables replicated; same structure as `state`."""
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
    return variable_shardings(nnx.state(abstract_model, nnx.Param), mesh, rules)


def state_shardings(abstract_model, mesh: Mesh, rules: ShardingRules):
    """Like `param_shardings` for the model's whole state (`nnx.state(model)`): parameters by rule, any other
    variable replicated."""
    return variable_shardings(nnx.state(abstract_model), mesh, rules)


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
