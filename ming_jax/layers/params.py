"""Parameter creation with logical sharding axis names.

Every parameter carries a tuple of logical axis names (`("embed", "mlp")`, ...). `ming_jax.sharding` maps those to
mesh axes with a rules object; nothing here knows about meshes. Parameters are created unsharded
(`eager_sharding=False`): placement happens at jitted init or at checkpoint restore, from the same names.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} given {len(axes)} axis names {tuple(axes)}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def fan_in_normal(fan_in_axes: Sequence[int] = (0,), scale: float = 1.0) -> Init:
    """N(0, scale^2 / fan_in) where fan_in is the product of `fan_in_axes` of the shape."""

    def init(key, shape, dtype):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        return (scale / fan_in**0.5) * jax.random.normal(key, shape, dtype)

    return init


def normal(stddev: float) -> Init:
    def init(key, shape, dtype):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform_fan_in(axis: int = 0) -> Init:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = shape[axis] (torch's default Linear init)."""

    def init(key, shape, dtype):
        bound = 1.0 / shape[axis] ** 0.5
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
