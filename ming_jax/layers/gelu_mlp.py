"""Two-layer GELU feed-forward with biases: out(gelu(in(x))), the MLP of whisper blocks and of ViT blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.params import fan_in_normal, param, zeros


def gelu_mlp(x, w_in, b_in, w_out, b_out, *, approximate: bool = False):
    """x [..., D], w_in [D, F], b_in [F], w_out [F, D], b_out [D].

    `approximate=False` is torch's default erf GELU (`nn.GELU()`, `F.gelu`); True is the tanh form
    (`gelu_pytorch_tanh`).
    """
    h = jnp.einsum("...d,df->...f", x, w_in) + b_in  # [..., F]
    h = jax.nn.gelu(h, approximate=approximate)
    return jnp.einsum("...f,fd->...d", h, w_out) + b_out


class GeluMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, approximate: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.approximate = approximate
        self.w_in = param(rngs, fan_in_normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.b_in = param(rngs, zeros, (hidden,), ("mlp",), param_dtype)
        self.w_out = param(rngs, fan_in_normal(), (hidden, dim), ("mlp", "embed"), param_dtype)
        self.b_out = param(rngs, zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x):
        dt = x.dtype
        return gelu_mlp(x, self.w_in[...].astype(dt), self.b_in[...].astype(dt), self.w_out[...].astype(dt),
                        self.b_out[...].astype(dt), approximate=self.approximate)
