"""The XLA implementation of the grouped matmuls: `jax.lax.ragged_dot` on the expert-sorted rows.

Portable and differentiable by autodiff. XLA:TPU lowers ragged_dot natively; other backends may lower it densely
(O(rows x groups x width) work and memory), which is what the portable grouped matmul issue replaces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from jax import lax

from ming_jax.pallas.gmm import kernel, metadata


def _clamped_sizes(group_sizes, m):
    # The kernels cut groups at M (see metadata.group_offsets); make the XLA path agree.
    return jnp.diff(metadata.group_offsets(group_sizes, m, tail_group=False))


def gmm(lhs, rhs, group_sizes, out_dtype):
    out = lax.ragged_dot(
        lhs, rhs, _clamped_sizes(group_sizes, lhs.shape[0]),
        precision=kernel._dot_precision(lhs.dtype), preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


def gmm_glu(x, w_gate, w_up, group_sizes):
    gate = gmm(x, w_gate, group_sizes, jnp.float32)
    up = gmm(x, w_up, group_sizes, jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[rows] with the kernels' index rule (values clamped to [0, T - 1]): the sorted [M, D] copy the fused
    kernels avoid, for the XLA path and as the reference."""
    return x[jnp.clip(rows, 0, x.shape[0] - 1)]


# --- quantized weights: qwix.ragged_dot (weight-only QArray rhs; XLA:TPU lowers it natively, elsewhere densely) ---


def gmm_q(lhs, w, group_sizes, out_dtype):
    """lhs [M, K] x a quantized `qwix.QArray` [G, K, N] -> [M, N]: qwix's ragged_dot (the int8 / fp8 values in the
    ragged dot, the per-channel scale applied to its output, sub-channel blocks as a batch axis summed after)."""
    out = qwix.ragged_dot(lhs, w, _clamped_sizes(group_sizes, lhs.shape[0]),
                          precision=kernel._dot_precision(lhs.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def gmm_glu_q(x, w_gate, w_up, group_sizes):
    gate = gmm_q(x, w_gate, group_sizes, jnp.float32)
    up = gmm_q(x, w_up, group_sizes, jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)
