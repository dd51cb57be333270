"""Plain-jnp references for the grouped matmuls: a per-group masked loop, float32 accumulation at HIGHEST precision.

Deliberately unlike the kernels (no tiles, no schedule, no ragged_dot): every group multiplies all rows and keeps its
own, so the tests compare two independent constructions. O(G * M * K * N): for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ming_jax.pallas.gmm import metadata


def _group_matmul_f32(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N] float32; row r uses rhs[g(r)], rows past sum(group_sizes) are 0."""
    m = lhs.shape[0]
    offsets = metadata.group_offsets(group_sizes, m, tail_group=False)  # [G + 1]
    rows = jnp.arange(m)
    x = lhs.astype(jnp.float32)

    def add_group(g, out):
        own = (rows >= offsets[g]) & (rows < offsets[g + 1])  # [M]
        y = jnp.einsum("mk,kn->mn", x, rhs[g].astype(jnp.float32), precision=lax.Precision.HIGHEST)
        return out + jnp.where(own[:, None], y, 0.0)

    return lax.fori_loop(0, rhs.shape[0], add_group, jnp.zeros((m, rhs.shape[2]), jnp.float32))


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None) -> jax.Array:
    """out[rows of g] = lhs[rows of g] @ rhs[g]; [M, K] x [G, K, N] -> [M, N]."""
    out_dtype = preferred_element_type or lhs.dtype
    return _group_matmul_f32(lhs, rhs, group_sizes).astype(out_dtype)


def gmm_glu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """h = silu(x @ w_gate[g]) * (x @ w_up[g]) per row's group g; [M, D] -> [M, F] in x.dtype."""
    gate = _group_matmul_f32(x, w_gate, group_sizes)
    up = _group_matmul_f32(x, w_up, group_sizes)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def grouped_glu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array) -> jax.Array:
    """The experts' SwiGLU FFN, per group: down_g(silu(gate_g(x)) * up_g(x)); [M, D] -> [M, D] in xs.dtype."""
    h = gmm_glu(xs, w_gate, w_up, group_sizes)
    return gmm(h, w_down, group_sizes, preferred_element_type=xs.dtype)
