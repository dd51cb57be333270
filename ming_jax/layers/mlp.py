"""Feed-forward blocks: the gated (SwiGLU) MLP down(silu(gate(x)) * up(x)) of BailingMoeV2 (dense layers, shared
expert), and the two-layer GELU MLP with biases out(gelu(in(x))) of whisper and ViT blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.params import fan_in_normal, param, read, zeros


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
        return glu(x, read(self.gate, dt), read(self.up, dt), read(self.down, dt))


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
        return gelu_mlp(x, read(self.w_in, dt), read(self.b_in, dt), read(self.w_out, dt),
                        read(self.b_out, dt), approximate=self.approximate)
