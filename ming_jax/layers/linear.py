"""Dense layer with bias (the encoders' and projectors' nn.Linear), kernel stored [in, out]."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.params import fan_in_normal, param, read, zeros


class Linear(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, axes: tuple[str | None, str | None], *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.kernel = param(rngs, fan_in_normal(), (in_dim, out_dim), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_dim,), (axes[1],), param_dtype)

    def __call__(self, x):  # [..., in] -> [..., out]
        dt = x.dtype
        return jnp.einsum("...i,io->...o", x, read(self.kernel, dt)) + read(self.bias, dt)
