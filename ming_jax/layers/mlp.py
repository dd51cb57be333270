"""Gated (SwiGLU) feed-forward: down(silu(gate(x)) * up(x)), the dense MLP and the shared expert of BailingMoeV2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.params import fan_in_normal, param


def glu(x, w_gate, w_up, w_down):
    """x [..., D], w_gate / w_up [D, F], w_down [F, D]."""
    h = jax.nn.silu(jnp.einsum("...d,df->...f", x, w_gate)) * jnp.einsum("...d,df->...f", x, w_up)
    return jnp.einsum("...f,fd->...d", h, w_down)


class GatedMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate = param(rngs, fan_in_normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, fan_in_normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, fan_in_normal(), (hidden, dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x):
        dt = x.dtype
        return glu(x, self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt))
