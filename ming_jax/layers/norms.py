"""Norms: RMSNorm as BailingMoeV2 computes it (normalise in float32, cast back, then scale), LayerNorm with float32
statistics as whisper and the Qwen3-VL ViT compute it, and the L2 normalisation of the towers' outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.params import ones, param, read, zeros


def rms_norm(x, scale, eps: float):
    """x [..., D], scale [D]. Statistics in float32; the weight multiplies the input-dtype normalised value."""
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x):
        return rms_norm(x, read(self.scale), self.eps)


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||_2, eps) over the last axis (torch `F.normalize`), the norm taken in float32."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, eps)).astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
    """x [..., D], scale / bias [D] -> [..., D] in x's dtype.

    Everything (statistics, affine) runs in float32 and is cast back once at the end: whisper's LayerNorm upcasts its
    input, applies `nn.LayerNorm` in float32 and casts the result to the input dtype.
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x):
        return layer_norm(x, read(self.scale), read(self.bias), self.eps)
