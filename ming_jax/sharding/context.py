"""The active mesh and rules while tracing: `use_mesh` sets them, `active()` reads them, `constrain` applies them."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from ming_jax.sharding.rules import PRESETS, ShardingRules, logical_to_spec


class Active(NamedTuple):
    """What a trace under a mesh sees: the abstract mesh, the rules, and the concrete mesh (None when the mesh was
    set with `jax.set_mesh` alone, or its devices cannot run here)."""

    mesh: Any
    rules: ShardingRules
    concrete: Mesh | None


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


def active() -> Active | None:
    """(abstract mesh, rules, concrete mesh or None) of the current trace, or None when no mesh is set.

    A mesh set with `jax.set_mesh` alone (no `use_mesh`) gets the `ep_fsdp` preset rules.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    ctx = _ACTIVE.get()
    if ctx is not None and tuple(ctx[0].shape.items()) == tuple(mesh.shape.items()):
        return Active(mesh, ctx[1], ctx[0])
    return Active(mesh, PRESETS["ep_fsdp"], None)


def constrain(x, names: Sequence[str | None]):
    """`with_sharding_constraint` of an activation by logical names under the active mesh; identity without one."""
    act = active()
    if act is None:
        return x
    mesh, rules, _ = act
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def constrain_even(x, names: Sequence[str | None]):
    """`constrain`, with every dim whose mesh axes do not divide it evenly left unsplit (e.g. a tower's rows when
    the images do not divide the batch axes); identity without an active mesh."""
    act = active()
    if act is None:
        return x
    mesh, rules, _ = act
    even = []
    for size, name in zip(x.shape, names):
        axes = () if name is None else rules.mesh_axes(name)
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        even.append(name if size % n == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(even, rules)))
