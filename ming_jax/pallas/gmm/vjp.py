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

Implementations ("implementation=" argument, the fallback list of the kernel folder convention):
  "pallas": the Mosaic TPU kernels, or with `interpret` (True or a pltpu.InterpretParams) the same kernels run by a
            Pallas interpreter on any backend;
  "xla":    jax.lax.ragged_dot (portable; on TPU it lowers densely, so not for production sizes there);
  "auto":   chosen when lowering, per platform (lax.platform_dependent): the kernels when compiling for TPU,
            including ahead-of-time compiles for a TPU topology from a CPU host, XLA elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ming_jax.pallas.gmm import kernel, metadata
from ming_jax.pallas.gmm.kernel import BlockSizes, GmmTiling

IMPLEMENTATIONS = ("auto", "pallas", "xla")
_ONE = (((0, 0),),)  # one accumulator holding lhs0 @ rhs0
_GATE_UP = (((0, 0),), ((0, 1),))  # two accumulators: x @ w_gate, x @ w_up
_SUM_TWO = (((0, 0), (1, 1)),)  # one accumulator: lhs0 @ rhs0 + lhs1 @ rhs1


# --------------------------------------------------------------------------------------------------- gmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling: GmmTiling, interpret):
    (out,) = kernel.grouped_matmul(
        (lhs,), (rhs,), group_sizes, terms=_ONE, out_dtypes=(out_dtype,), block=tiling.fwd, interpret=interpret
    )
    return out


def _gmm_pallas_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret):
    return _gmm_pallas(lhs, rhs, group_sizes, out_dtype, tiling, interpret), (lhs, rhs, group_sizes)


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


_gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


def _clamped_sizes(group_sizes, m):
    # The kernels cut groups at M (see metadata.group_offsets); make the XLA path agree.
    return jnp.diff(metadata.group_offsets(group_sizes, m, tail_group=False))


def _gmm_xla(lhs, rhs, group_sizes, out_dtype):
    out = lax.ragged_dot(
        lhs, rhs, _clamped_sizes(group_sizes, lhs.shape[0]),
        precision=kernel._dot_precision(lhs.dtype), preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


def _check(lhs, weights, group_sizes, implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if lhs.ndim != 2 or lhs.shape[0] == 0:
        raise ValueError(f"lhs must be [M, K] with M >= 1, got shape {lhs.shape}")
    for name, w in weights.items():
        if w.ndim != 3 or w.shape[1] != lhs.shape[1]:
            raise ValueError(f"{name} must be [G, K={lhs.shape[1]}, N], got shape {w.shape}")
    num_groups = next(iter(weights.values())).shape[0]
    if group_sizes.shape != (num_groups,) or group_sizes.dtype != jnp.int32:
        raise ValueError(
            f"group_sizes must be int32 [{num_groups}] (one per expert), got {group_sizes.dtype} {group_sizes.shape}"
        )


def _dispatch(implementation, interpret, pallas_fn, xla_fn, *args):
    if implementation == "xla":
        return xla_fn(*args)
    if implementation == "pallas" or interpret:
        return pallas_fn(*args)
    return lax.platform_dependent(*args, tpu=pallas_fn, default=xla_fn)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling: BlockSizes | GmmTiling | None = None,
    interpret=False,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped matmul over expert-sorted rows: out[rows of g] = lhs[rows of g] @ rhs[g]; [M, K] x [G, K, N] -> [M, N].

    Group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])); rows at or past sum(group_sizes) are padding and
    come out as 0 (their gradients too). Sizes summing past M are cut at M. Output dtype: preferred_element_type, else
    lhs.dtype; accumulation is float32. `interpret` (True, or a pltpu.InterpretParams for TPU memory semantics) runs
    the Pallas kernels in an interpreter on any backend.
    """
    _check(lhs, {"rhs": rhs}, group_sizes, implementation)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tiling = GmmTiling.coerce(tiling)
    with jax.named_scope("gmm"):
        return _dispatch(
            implementation,
            interpret,
            lambda a, b, gs: _gmm_pallas(a, b, gs, out_dtype, tiling, interpret),
            lambda a, b, gs: _gmm_xla(a, b, gs, out_dtype),
            lhs, rhs, group_sizes,
        )


# --------------------------------------------------------------------------------------------------- gmm_glu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _glu_pallas(x, w_gate, w_up, group_sizes, rows, tiling: GmmTiling, interpret):
    (h,) = kernel.grouped_matmul(
        (x,), (w_gate, w_up), group_sizes, terms=_GATE_UP, epilogue=kernel.epilogue_glu, out_dtypes=(x.dtype,),
        block=tiling.fwd, interpret=interpret, transcendentals_per_out=1, lhs_rows=rows,
    )
    return h


def _glu_pallas_fwd(x, w_gate, w_up, group_sizes, rows, tiling, interpret):
    h = _glu_pallas(x, w_gate, w_up, group_sizes, rows, tiling, interpret)
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


_glu_pallas.defvjp(_glu_pallas_fwd, _glu_pallas_bwd)


def _glu_xla(x, w_gate, w_up, group_sizes):
    gate = _gmm_xla(x, w_gate, group_sizes, jnp.float32)
    up = _gmm_xla(x, w_up, group_sizes, jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[rows] with the kernels' index rule (values clamped to [0, T - 1]): the sorted [M, D] copy the fused
    kernels avoid, for the XLA path and as the reference."""
    return x[jnp.clip(rows, 0, x.shape[0] - 1)]


def _check_rows(x, rows):
    """rows gathers the sorted layout out of an unsorted x [T, D]: int32 [M], M >= 1."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"with rows, x must be the unsorted [T, D] with T >= 1, got shape {x.shape}")
    if not hasattr(rows, "dtype") or rows.dtype != jnp.int32 or rows.ndim != 1 or rows.shape[0] == 0:
        got = f"{rows.dtype} {rows.shape}" if hasattr(rows, "dtype") else type(rows).__name__
        raise ValueError(
            "rows must be a 1-D int32 [M] array (M >= 1 rows of the expert-sorted layout, row r = x[rows[r]]; "
            f"group_sizes partition those M rows), got {got}"
        )


def gmm_glu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    *,
    rows: jax.Array | None = None,
    tiling: BlockSizes | GmmTiling | None = None,
    interpret=False,
    implementation: str = "auto",
) -> jax.Array:
    """Fused MoE expert input projection: h = silu(x @ w_gate[g]) * (x @ w_up[g]); [M, D] -> [M, F] in x.dtype.

    Same row/group contract as `gmm` (padding rows give 0). The SiLU-times-up epilogue runs on the float32
    accumulators inside the kernel, so the gate and up pre-activations are never written to HBM.

    rows: optional int32 [M] fused permute. x is then the unsorted [T, D] (e.g. the tokens) and row r of the
    expert-sorted layout is x[rows[r]] (values clamped to [0, T - 1]; a token may appear in several rows, e.g. once
    per routed expert); the result is [M, F] in sorted order. The Pallas kernels copy those rows out of x themselves
    (forward, backward recompute and weight gradient), so the sorted [M, D] copy of x never exists; d_x comes out of
    the input-gradient kernel in sorted order and is summed back onto the T rows (float32). The XLA path gathers
    x[rows] first, so both agree. With the Pallas kernels D must be a multiple of the k tile (or fit one k tile).
    """
    if rows is not None:
        _check_rows(x, rows)
        m = rows.shape[0]
    else:
        m = None
    _check(x if m is None else jax.ShapeDtypeStruct((m, x.shape[1]), x.dtype), {"w_gate": w_gate, "w_up": w_up},
           group_sizes, implementation)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have the same [G, D, F] shape")
    tiling = GmmTiling.coerce(tiling)
    with jax.named_scope("gmm_glu"):
        if rows is None:
            return _dispatch(
                implementation,
                interpret,
                lambda a, wg, wu, gs: _glu_pallas(a, wg, wu, gs, None, tiling, interpret),
                _glu_xla,
                x, w_gate, w_up, group_sizes,
            )
        return _dispatch(
            implementation,
            interpret,
            lambda a, wg, wu, gs, r: _glu_pallas(a, wg, wu, gs, r, tiling, interpret),
            lambda a, wg, wu, gs, r: _glu_xla(gather_rows(a, r), wg, wu, gs),
            x, w_gate, w_up, group_sizes, rows,
        )
