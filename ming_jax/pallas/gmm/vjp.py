"""Differentiable grouped matmuls: custom VJPs over the Pallas kernels, and the public `gmm` / `gmm_glu`.

Backward passes (float32 accumulation throughout):
  gmm:     d_lhs = gmm(d_out, rhs^T) (transposed-weight kernel), d_rhs = tgmm(lhs, d_out).
  gmm_glu: saves only (x, w_gate, w_up); one kernel recomputes both pre-activations per tile and emits
           d_gate = d_h * up * silu'(gate), d_up = d_h * silu(gate) from its epilogue (the [M, F] pre-activations
           never reach HBM), then d_x = d_gate @ w_gate^T + d_up @ w_up^T in one kernel with one accumulator, and
           d_w_gate, d_w_up = tgmm(x, (d_gate, d_up)) in one kernel sharing each x tile.
  gmm_glu(x, ..., rows=r): the permute x[r] is fused into the loads of the kernels that read x (forward, recompute,
           tgmm), which gather token rows of the unsorted x themselves; the residual is the unsorted x. d_x leaves the
           input-gradient kernel in sorted order [M, D] and is summed onto the T tokens (float32 segment sum).
Cotangents are cast to the operand dtype before they enter the MXU (bf16 models backpropagate in bf16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ming_jax.pallas.gmm import kernel
from ming_jax.pallas.gmm.kernel import GmmTiling

_ONE = (((0, 0),),)  # one accumulator holding lhs0 @ rhs0
_GATE_UP = (((0, 0),), ((0, 1),))  # two accumulators: x @ w_gate, x @ w_up
_SUM_TWO = (((0, 0), (1, 1)),)  # one accumulator: lhs0 @ rhs0 + lhs1 @ rhs1


# --------------------------------------------------------------------------------------------------- gmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling: GmmTiling, interpret):
    (out,) = kernel.grouped_matmul(
        (lhs,), (rhs,), group_sizes, terms=_ONE, out_dtypes=(out_dtype,), block=tiling.fwd, interpret=interpret
    )
    return out


def _gmm_pallas_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret):
    return gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling, interpret), (lhs, rhs, group_sizes)


def _gmm_pallas_bwd(out_dtype, tiling, interpret, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)  # [M, N]
    (d_lhs,) = kernel.grouped_matmul(
        (d_out,), (rhs,), group_sizes, terms=_ONE, out_dtypes=(lhs.dtype,), transpose_rhs=True,
        block=tiling.dlhs, interpret=interpret,
    )  # [M, K]
    (d_rhs,) = kernel.transposed_grouped_matmul(
        lhs, (d_out,), group_sizes, out_dtype=rhs.dtype, block=tiling.drhs, interpret=interpret
    )  # [G, K, N]
    return d_lhs, d_rhs, None


gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


# --------------------------------------------------------------------------------------------------- gmm_glu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def glu_pallas(x, w_gate, w_up, group_sizes, rows, tiling: GmmTiling, interpret):
    (h,) = kernel.grouped_matmul(
        (x,), (w_gate, w_up), group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu, out_dtypes=(x.dtype,),
        block=tiling.fwd, interpret=interpret, transcendentals_per_out=1, lhs_rows=rows,
    )
    return h


def _glu_pallas_fwd(x, w_gate, w_up, group_sizes, rows, tiling, interpret):
    h = glu_pallas(x, w_gate, w_up, group_sizes, rows, tiling, interpret)
    return h, (x, w_gate, w_up, group_sizes, rows)  # with rows: the unsorted x, never a sorted copy


def _glu_pallas_bwd(tiling, interpret, residuals, d_h):
    x, w_gate, w_up, group_sizes, rows = residuals
    d_gate, d_up = kernel.grouped_matmul(
        (x,), (w_gate, w_up), group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu_bwd,
        extras=(d_h.astype(x.dtype),), out_dtypes=(x.dtype, x.dtype), block=tiling.fwd, interpret=interpret,
        transcendentals_per_out=1, lhs_rows=rows,
    )  # [M, F] each
    (d_x,) = kernel.grouped_matmul(
        (d_gate, d_up), (w_gate, w_up), group_sizes, terms=_SUM_TWO, out_dtypes=(x.dtype,), transpose_rhs=True,
        block=tiling.dlhs, interpret=interpret,
    )  # [M, D] in sorted order
    d_w_gate, d_w_up = kernel.transposed_grouped_matmul(
        x, (d_gate, d_up), group_sizes, out_dtype=w_gate.dtype, block=tiling.drhs, interpret=interpret,
        lhs_rows=rows,
    )  # [G, D, F] each
    if rows is not None:  # back to the unsorted rows: a token's copies sum (padding rows of d_x are exact zeros)
        t = x.shape[0]
        d_x = jax.ops.segment_sum(d_x.astype(jnp.float32), jnp.clip(rows, 0, t - 1), num_segments=t)
        d_x = d_x.astype(x.dtype)
    return d_x, d_w_gate, d_w_up, None, None


glu_pallas.defvjp(_glu_pallas_fwd, _glu_pallas_bwd)


# --------------------------------------------------------------------------------------------------- quantized weights
#
# Quantized weights (int8 / float8_e4m3fn values + float32 scales, `ming_jax.pallas.gmm.quant`) are constants: the
# VJPs give the input gradient only (what a frozen, e.g. QLoRA, base needs) and zero cotangents for the weights.
# d_x runs the transposed kernel on the quantized weights, each tile dequantised in VMEM ("tile" scale mode).


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def gmm_pallas_q(lhs, values, scale, group_sizes, out_dtype, tiling: GmmTiling, interpret):
    (out,) = kernel.grouped_matmul(
        (lhs,), (values,), group_sizes, terms=_ONE, out_dtypes=(out_dtype,), block=tiling.fwd, interpret=interpret,
        rhs_scales=(scale,),
    )
    return out


def _gmm_pallas_q_fwd(lhs, values, scale, group_sizes, out_dtype, tiling, interpret):
    out = gmm_pallas_q(lhs, values, scale, group_sizes, out_dtype, tiling, interpret)
    return out, (lhs, values, scale, group_sizes)


def _gmm_pallas_q_bwd(out_dtype, tiling, interpret, residuals, d_out):
    lhs, values, scale, group_sizes = residuals
    (d_lhs,) = kernel.grouped_matmul(
        (d_out.astype(lhs.dtype),), (values,), group_sizes, terms=_ONE, out_dtypes=(lhs.dtype,), transpose_rhs=True,
        block=tiling.dlhs, interpret=interpret, rhs_scales=(scale,),
    )
    return d_lhs, None, None, None


gmm_pallas_q.defvjp(_gmm_pallas_q_fwd, _gmm_pallas_q_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def glu_pallas_q(x, wg, sg, wu, su, group_sizes, rows, tiling: GmmTiling, interpret):
    (h,) = kernel.grouped_matmul(
        (x,), (wg, wu), group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu, out_dtypes=(x.dtype,),
        block=tiling.fwd, interpret=interpret, transcendentals_per_out=1, lhs_rows=rows, rhs_scales=(sg, su),
    )
    return h


def _glu_pallas_q_fwd(x, wg, sg, wu, su, group_sizes, rows, tiling, interpret):
    h = glu_pallas_q(x, wg, sg, wu, su, group_sizes, rows, tiling, interpret)
    return h, (x, wg, sg, wu, su, group_sizes, rows)


def _glu_pallas_q_bwd(tiling, interpret, residuals, d_h):
    x, wg, sg, wu, su, group_sizes, rows = residuals
    d_gate, d_up = kernel.grouped_matmul(
        (x,), (wg, wu), group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu_bwd,
        extras=(d_h.astype(x.dtype),), out_dtypes=(x.dtype, x.dtype), block=tiling.fwd, interpret=interpret,
        transcendentals_per_out=1, lhs_rows=rows, rhs_scales=(sg, su),
    )
    (d_x,) = kernel.grouped_matmul(
        (d_gate, d_up), (wg, wu), group_sizes, terms=_SUM_TWO, out_dtypes=(x.dtype,), transpose_rhs=True,
        block=tiling.dlhs, interpret=interpret, rhs_scales=(sg, su),
    )
    if rows is not None:
        t = x.shape[0]
        d_x = jax.ops.segment_sum(d_x.astype(jnp.float32), jnp.clip(rows, 0, t - 1), num_segments=t)
        d_x = d_x.astype(x.dtype)
    return d_x, None, None, None, None, None, None


glu_pallas_q.defvjp(_glu_pallas_q_fwd, _glu_pallas_q_bwd)


# --------------------------------------------------------------------------------------------------- in-place stacks
#
# The expert FFN reading layer `layer` of the [L, E, ...] weight stacks in place (`kernel.grouped_matmul(layer=)`):
# inside the layer scan the per-layer slice of a stack would otherwise be copied whole before a kernel can read it.
# Float weights: (w_gate, w_up, w_down) stacks; quantized: (values, scale) pairs of each.


def ffn_stacked(x, group_sizes, rows, layer, stacks, tiling: GmmTiling, interpret):
    """down(silu(gate(x)) * up(x)) on layer `layer` of the stacks -> [M, D] in x.dtype (no VJP of its own: see
    `ming_jax.pallas.gmm.api.grouped_glu`, which differentiates the per-layer path instead)."""
    wg, wu, wd = stacks
    quantized = isinstance(wg, tuple)
    gate_up = (wg[0], wu[0]) if quantized else (wg, wu)
    (h,) = kernel.grouped_matmul(
        (x,), gate_up, group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu, out_dtypes=(x.dtype,),
        block=tiling.fwd, interpret=interpret, transcendentals_per_out=1, lhs_rows=rows,
        rhs_scales=(wg[1], wu[1]) if quantized else None, layer=layer,
    )
    (y,) = kernel.grouped_matmul(
        (h,), (wd[0] if quantized else wd,), group_sizes, terms=_ONE, out_dtypes=(x.dtype,), block=tiling.fwd,
        interpret=interpret, rhs_scales=(wd[1],) if quantized else None, layer=layer,
    )
    return y
