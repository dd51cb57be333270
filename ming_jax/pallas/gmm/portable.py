"""The portable implementation of the grouped matmuls: a loop over (expert, row chunk) steps, for CPU and GPU.

`jax.lax.ragged_dot` lowers densely off TPU (every row against every group: O(M x G x N) work and memory). This
path walks each expert's sorted rows in `tm`-row chunks that start at the expert's first row: step s multiplies one
chunk by the weights of its group and keeps only that group's rows (the last chunk of a group is partial). The loop is a
`lax.fori_loop` with the traced step count as its bound (a while loop), each step a plain [tm, K] x [K, N] dot on a
dynamic slice of the weights, and the outputs are updated in place on the loop carry.

    work        <= (ceil(M / tm) + G) * tm rows of matmul (useful rows + at most one partial chunk per group)
    temporaries  the [M, N] output, one [tm, K] tile and one [K, N] weight slice per step (gradients: the
                 [G, K, N] weight gradient plus one float32 [K, N] accumulator); nothing of size M x G. Caveat:
                 bf16 on XLA:CPU adds one 16-bit copy of the operands (see `_bits`).

A chunk that would run past row M is shifted back to end there (no padded copy of the rows); the rows it then
shares with the group's previous chunk are masked by the nominal chunk start, so every (row, group) pair is
computed exactly once. Rows at or past sum(group_sizes) are padding: outputs and input gradients there are 0.

Gradients are custom VJPs over the same loop (no autodiff of the loop, which would keep per-step residuals and
scatter full-size zeros into the weight gradient):
  gmm:     d_lhs rows = d_out @ rhs[g]^T;  d_rhs[g] = sum over g's tiles of lhs^T d_out (float32 per group, written
           in rhs.dtype once per step).
  gmm_glu: saves (x, w_gate, w_up); one backward loop recomputes gate and up per tile, forms
           d_gate = d_h * up * silu'(gate), d_up = d_h * silu(gate), and emits d_x and both weight gradients.
  rows=r (fused permute): each step gathers its tile's token rows x[r[tile]] itself (the sorted [M, D] copy never
           exists) and, backward, scatter-adds its d_x rows onto the T tokens (float32).
Cotangents are cast to the operand dtype before the matmuls, which accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ming_jax.pallas.gmm import kernel, metadata

# Rows per step (an upper bound; see `_tm`). benchmarks/gmm_cpu.py on the shared 2-core CPU (docs/benchmarks.md):
# 64 / 128 / 256 within the run-to-run noise at 256 rows per expert; 128 keeps the partial-chunk waste at ~1.25x
# there, where 256 computes ~1.5x the rows.
DEFAULT_TM = 128
MIN_TM = 8


def _tm(m: int, tm: int | None, num_groups: int) -> int:
    """Rows per step: `tm` if given, else about the mean rows per expert as a power of two in [MIN_TM, DEFAULT_TM].

    Every non-empty expert costs at least one step, so with few rows per expert (decode: M = batch x top-k rows over
    G experts) a large tile would multiply mostly-padding rows; there a step costs one read of the expert's weights.
    """
    if tm is None:
        mean = -(-m // max(num_groups, 1))
        tm = min(DEFAULT_TM, max(MIN_TM, 1 << (mean - 1).bit_length()))
    return max(1, min(int(tm), m))


class _Steps:
    """The step list for M rows: each group's rows in tm-row chunks starting at the group's first row.

    Chunks are aligned to their group, not to a global tile grid, so a group costs ceil(size / tm) steps and only its
    last chunk is partial: at most one partial chunk per group, sum over groups <= ceil(M / tm) + G steps. Steps are
    ordered by group; empty groups get none.
    """

    def __init__(self, group_sizes, m: int, tm: int):
        self.m, self.tm = m, tm
        self.offsets = metadata.group_offsets(group_sizes, m, tail_group=False)  # [G + 1], cut at m
        sizes = jnp.diff(self.offsets)
        chunks = (sizes + tm - 1) // tm  # [G]
        self.first_step = jnp.cumsum(chunks) - chunks
        self.count = jnp.sum(chunks).astype(jnp.int32)
        length = -(-m // tm) + group_sizes.shape[0]
        self.group_ids = jnp.repeat(jnp.arange(group_sizes.shape[0], dtype=jnp.int32), chunks,
                                    total_repeat_length=length)

    def at(self, s):
        """(group, first row of the slice, [tm] bool mask of the rows this step owns) for step s."""
        g = self.group_ids[s]
        nominal = self.offsets[g] + (s - self.first_step[g]) * self.tm
        start = jnp.minimum(nominal, self.m - self.tm)  # a chunk running past row M is shifted back to end there
        hi = jnp.minimum(self.offsets[g + 1], nominal + self.tm)
        r = start + jnp.arange(self.tm, dtype=jnp.int32)
        return g, start, (r >= nominal) & (r < hi)

    def new_group(self, s):
        """True at the first step of each group."""
        return s == self.first_step[self.group_ids[s]]


def _bits(x):
    """16-bit floats as uint16 (a free bitcast), other dtypes as they are.

    The loops slice and update their big operands through this view. XLA:CPU has no bf16 dot or select and rewrites
    bf16 ops to float32; on a bf16 loop operand that conversion lands on the whole array and is hoisted out of the
    loop (a float32 copy of every expert weight: 12 GiB at Ling-flash shapes) or re-run on the whole output every
    step. Integer slices and updates are left alone, so only the per-step tiles are converted. XLA:CPU (jax 0.10.2)
    still materializes the entry bitcast as one 16-bit copy of each operand: 1x the bf16 weights instead of 2x
    (measured in docs/benchmarks.md); float32 operands need no view and no copy.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1:  # float8 weights: the same
        return lax.bitcast_convert_type(x, jnp.uint8)
    return lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def _float(x, dtype):
    """Inverse of `_bits`."""
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _load(x, rows, start, tm, dtype):
    """The tile's [tm, K] rows of the sorted layout: x[start:start+tm], or x[rows[start:start+tm]] (x from _bits)."""
    if rows is None:
        return _float(lax.dynamic_slice_in_dim(x, start, tm, 0), dtype)
    return _float(jnp.take(x, lax.dynamic_slice_in_dim(rows, start, tm, 0), axis=0), dtype)


def _weight(w_bits, g, dtype, layer=None):
    """Group g's [K, N] weights of w_bits [G, K, N], or of layer `layer` of a stack [L, G, K, N] (read in place)."""
    if layer is None:
        return _float(lax.dynamic_index_in_dim(w_bits, g, 0, keepdims=False), dtype)
    k, n = w_bits.shape[2:]
    z = jnp.zeros((), jnp.int32)
    at = (jnp.asarray(layer, jnp.int32), jnp.asarray(g, jnp.int32), z, z)
    return _float(lax.dynamic_slice(w_bits, at, (1, 1, k, n)).reshape(k, n), dtype)


def _dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), precision=kernel._dot_precision(a.dtype),
                           preferred_element_type=jnp.float32)


_NN = ((1,), (0,))  # [tm, K] x [K, N]
_NT = ((1,), (1,))  # [tm, N] x [K, N] -> [tm, K]
_TN = ((0,), (0,))  # [tm, K] x [tm, N] -> [K, N]


def _masked_write(out, start, mask, tile, dtype):
    """out (from _bits) rows [start, start + tm) = tile where mask, in dtype."""
    old = _float(lax.dynamic_slice_in_dim(out, start, tile.shape[0], 0), dtype)
    merged = jnp.where(mask[:, None], tile.astype(dtype), old)
    return lax.dynamic_update_slice_in_dim(out, _bits(merged), start, 0)


def _write_group(d_w, acc, g, dtype):
    """d_w[g] = acc (the group's float32 running sum so far) in dtype; d_w from _bits."""
    return lax.dynamic_update_index_in_dim(d_w, _bits(acc.astype(dtype)), g, 0)


def _zeros(shape, dtype):
    return _bits(jnp.zeros(shape, dtype))


def _clip_rows(x, rows):
    return None if rows is None else jnp.clip(rows, 0, x.shape[0] - 1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------- gmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(lhs, rhs, group_sizes, out_dtype, tm=None):
    """[M, K] x [G, K, N] -> [M, N] out_dtype; see the module docstring."""
    return _gmm_fwd_loop(lhs, rhs, group_sizes, jnp.dtype(out_dtype), _tm(lhs.shape[0], tm, rhs.shape[0]))


def _gmm_fwd_loop(lhs, rhs, group_sizes, out_dtype, tm, layer=None):
    """rhs [G, K, N], or with `layer` a stack [L, G, K, N] read in place at that layer."""
    m = lhs.shape[0]
    steps = _Steps(group_sizes, m, tm)
    lhs_b, rhs_b = _bits(lhs), _bits(rhs)

    def body(s, out):
        g, start, mask = steps.at(s)
        y = _dot(_load(lhs_b, None, start, tm, lhs.dtype), _weight(rhs_b, g, rhs.dtype, layer), _NN)
        return _masked_write(out, start, mask, y, out_dtype)

    out = lax.fori_loop(0, steps.count, body, _zeros((m, rhs.shape[-1]), out_dtype))
    return _float(out, out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tm):
    return gmm(lhs, rhs, group_sizes, out_dtype, tm), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tm, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    m = lhs.shape[0]
    tm = _tm(m, tm, rhs.shape[0])
    steps = _Steps(group_sizes, m, tm)
    dt = lhs.dtype
    lhs_b, rhs_b, d_out_b = _bits(lhs), _bits(rhs), _bits(d_out.astype(dt))

    def body(s, carry):
        d_lhs, d_rhs, acc = carry
        g, start, mask = steps.at(s)
        w = _weight(rhs_b, g, rhs.dtype)
        dy = jnp.where(mask[:, None], _load(d_out_b, None, start, tm, dt), 0)  # [tm, N], other groups' rows zeroed
        d_lhs = _masked_write(d_lhs, start, mask, _dot(dy, w, _NT), dt)
        acc = jnp.where(steps.new_group(s), 0.0, acc) + _dot(_load(lhs_b, None, start, tm, dt), dy, _TN)
        return d_lhs, _write_group(d_rhs, acc, g, rhs.dtype), acc

    init = (_zeros(lhs.shape, dt), _zeros(rhs.shape, rhs.dtype), jnp.zeros(rhs.shape[1:], jnp.float32))
    d_lhs, d_rhs, _ = lax.fori_loop(0, steps.count, body, init)
    return _float(d_lhs, dt), _float(d_rhs, rhs.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


# --------------------------------------------------------------------------------------------------- gmm_glu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gmm_glu(x, w_gate, w_up, group_sizes, rows=None, tm=None):
    """h = silu(x @ w_gate[g]) * (x @ w_up[g]) -> [M, F] in x.dtype; with rows [M] int32, sorted row r is x[rows[r]]."""
    rows = _clip_rows(x, rows)
    m = x.shape[0] if rows is None else rows.shape[0]
    return _glu_fwd_loop(x, w_gate, w_up, group_sizes, rows, _tm(m, tm, w_gate.shape[0]))


def _glu_fwd_loop(x, w_gate, w_up, group_sizes, rows, tm, layer=None):
    """rows already clipped; w_gate / w_up [G, D, F], or with `layer` stacks [L, G, D, F] read in place."""
    m = x.shape[0] if rows is None else rows.shape[0]
    steps = _Steps(group_sizes, m, tm)
    dt = x.dtype
    x_b, wg_b, wu_b = _bits(x), _bits(w_gate), _bits(w_up)

    def body(s, h):
        g, start, mask = steps.at(s)
        a = _load(x_b, rows, start, tm, dt)
        gate = _dot(a, _weight(wg_b, g, w_gate.dtype, layer), _NN)
        up = _dot(a, _weight(wu_b, g, w_up.dtype, layer), _NN)
        return _masked_write(h, start, mask, jax.nn.silu(gate) * up, dt)

    h = lax.fori_loop(0, steps.count, body, _zeros((m, w_gate.shape[-1]), dt))
    return _float(h, dt)


def _glu_fwd(x, w_gate, w_up, group_sizes, rows, tm):
    return gmm_glu(x, w_gate, w_up, group_sizes, rows, tm), (x, w_gate, w_up, group_sizes, rows)


def _glu_bwd(tm, residuals, d_h):
    x, w_gate, w_up, group_sizes, rows = residuals
    rows_c = _clip_rows(x, rows)
    m = x.shape[0] if rows is None else rows.shape[0]
    tm = _tm(m, tm, w_gate.shape[0])
    steps = _Steps(group_sizes, m, tm)
    dt = x.dtype
    x_b, wg_b, wu_b, d_h_b = _bits(x), _bits(w_gate), _bits(w_up), _bits(d_h.astype(dt))

    def body(s, carry):
        d_x, d_wg, d_wu, acc_g, acc_u = carry
        g, start, mask = steps.at(s)
        a = _load(x_b, rows_c, start, tm, dt)  # [tm, D]
        wg, wu = _weight(wg_b, g, w_gate.dtype), _weight(wu_b, g, w_up.dtype)
        gate, up = _dot(a, wg, _NN), _dot(a, wu, _NN)  # [tm, F] float32, recomputed
        dh = jnp.where(mask[:, None], _load(d_h_b, None, start, tm, dt).astype(jnp.float32), 0.0)
        sig = jax.nn.sigmoid(gate)
        d_gate = (dh * up * sig * (1.0 + gate * (1.0 - sig))).astype(dt)
        d_up = (dh * gate * sig).astype(dt)
        dx_tile = _dot(d_gate, wg, _NT) + _dot(d_up, wu, _NT)  # [tm, D] float32, zero off the mask
        if rows_c is None:
            d_x = _masked_write(d_x, start, mask, dx_tile, dt)
        else:  # float32 sum onto the tokens; rows this step does not own add exact zeros
            d_x = d_x.at[lax.dynamic_slice_in_dim(rows_c, start, tm, 0)].add(dx_tile)
        fresh = steps.new_group(s)
        acc_g = jnp.where(fresh, 0.0, acc_g) + _dot(a, d_gate, _TN)
        acc_u = jnp.where(fresh, 0.0, acc_u) + _dot(a, d_up, _TN)
        d_wg, d_wu = _write_group(d_wg, acc_g, g, w_gate.dtype), _write_group(d_wu, acc_u, g, w_up.dtype)
        return d_x, d_wg, d_wu, acc_g, acc_u

    d_x0 = _zeros(x.shape, dt) if rows_c is None else jnp.zeros(x.shape, jnp.float32)
    acc = jnp.zeros(w_gate.shape[1:], jnp.float32)
    init = (d_x0, _zeros(w_gate.shape, w_gate.dtype), _zeros(w_up.shape, w_up.dtype), acc, acc)
    d_x, d_wg, d_wu, _, _ = lax.fori_loop(0, steps.count, body, init)
    d_x = _float(d_x, dt) if rows_c is None else d_x.astype(dt)
    return d_x, _float(d_wg, w_gate.dtype), _float(d_wu, w_up.dtype), None, None


gmm_glu.defvjp(_glu_fwd, _glu_bwd)


# --------------------------------------------------------------------------------------------------- grouped_glu


def grouped_glu(x, group_sizes, w_gate, w_up, w_down, rows=None, stacked=None, tm=None):
    """The expert FFN down_g(silu(gate_g(x)) * up_g(x)) -> [M, D] in x.dtype, sorted order (rows: fused permute).

    stacked: None, or (layer, w_gate_all, w_up_all, w_down_all), the stacks [L, E, ...] of every MoE layer that
    w_gate / w_up / w_down are layer `layer` of. Inside a scan over layers, the per-layer weights are a dynamic slice
    of the stacks, which XLA materializes as a copy of the whole layer's experts before the loops here can use it:
    at batch 1 decode that copy (every expert, written and read again) costs several times the work of the 8 experts a
    token uses. With `stacked`, the undifferentiated forward reads each step's expert out of the stacks in place and
    the per-layer slices go unused (XLA removes them). Under differentiation the same function runs on the per-layer
    weights (`gmm_glu` then `gmm` and their VJPs), so gradients reach the slices, whose cotangents the layer scan
    stacks, and the stacks get none (they enter through `stop_gradient`).
    """
    if stacked is None:
        h = gmm_glu(x, w_gate, w_up, group_sizes, rows, tm)
        return gmm(h, w_down, group_sizes, x.dtype, tm)
    layer, *stacks = stacked
    for w, s in zip((w_gate, w_up, w_down), stacks):
        if s.ndim != 4 or s.shape[1:] != w.shape or s.dtype != w.dtype:
            raise ValueError(f"stacked weights must be [L, {', '.join(map(str, w.shape))}] {w.dtype} stacks of the "
                             f"per-layer weights, got {s.dtype} {s.shape}")
    stacks = [lax.stop_gradient(s) for s in stacks]
    return _ffn_in_place(x, group_sizes, rows, w_gate, w_up, w_down, jnp.asarray(layer, jnp.int32), *stacks, tm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _ffn_in_place(x, group_sizes, rows, w_gate, w_up, w_down, layer, s_gate, s_up, s_down, tm):
    del w_gate, w_up, w_down  # the forward reads the stacks (see `grouped_glu`)
    rows = _clip_rows(x, rows)
    m = x.shape[0] if rows is None else rows.shape[0]
    tm = _tm(m, tm, s_gate.shape[1])
    h = _glu_fwd_loop(x, s_gate, s_up, group_sizes, rows, tm, layer)
    return _gmm_fwd_loop(h, s_down, group_sizes, x.dtype, tm, layer)


def _ffn_in_place_fwd(x, group_sizes, rows, w_gate, w_up, w_down, layer, s_gate, s_up, s_down, tm):
    def sliced(x, w_gate, w_up, w_down):
        return grouped_glu(x, group_sizes, w_gate, w_up, w_down, rows, None, tm)

    return jax.vjp(sliced, x, w_gate, w_up, w_down)  # (output, pullback as the residual)


def _ffn_in_place_bwd(tm, pullback, d_y):
    d_x, d_wg, d_wu, d_wd = pullback(d_y)
    return d_x, None, None, d_wg, d_wu, d_wd, None, None, None, None


_ffn_in_place.defvjp(_ffn_in_place_fwd, _ffn_in_place_bwd)


# --------------------------------------------------------------------------------------------------- quantized weights
#
# The same loops over int8 / float8_e4m3fn weights [G, K, N] with float32 scales (`ming_jax.pallas.gmm.quant`).
# Each step slices ONE expert's stored values (1 byte per element: the full-size weights are never converted),
#   per-channel scale [G, 1, N]:   y = (x @ values[g]) * scale[g]        the values are exact in bf16 / float32;
#   sub-channel scale [G, Kb, N]:  y = sum_b (x[:, block b] @ values[g, block b]) * scale[g, b]   (one batched dot)
# in float32. The weights are constants: the VJPs give d_x (from the expert's dequantised slice) and no weight
# cotangents (QLoRA-style frozen bases).


def _q_dot(a, values, scale, g, dtype, vdtype):
    """a [tm, K] @ dequant(values[g]) -> [tm, N] float32 (see the section comment); values from _bits."""
    w = _float(lax.dynamic_index_in_dim(values, g, 0, keepdims=False), vdtype)  # [K, N] stored dtype
    s = lax.dynamic_index_in_dim(scale, g, 0, keepdims=False)  # [Kb, N] float32
    if s.shape[0] == 1:
        return _dot(a, w.astype(dtype), _NN) * s
    kb, (k, n) = s.shape[0], w.shape
    parts = lax.dot_general(a.reshape(a.shape[0], kb, k // kb), w.astype(dtype).reshape(kb, k // kb, n),
                            (((2,), (1,)), ((1,), (0,))), precision=kernel._dot_precision(a.dtype),
                            preferred_element_type=jnp.float32)  # [Kb, tm, N]
    return jnp.sum(parts * s[:, None, :], axis=0)


def _q_weight(values, scale, g, dtype, vdtype):
    """The expert's dequantised [K, N] slice in dtype (for the input-gradient products); values from _bits."""
    w = _float(lax.dynamic_index_in_dim(values, g, 0, keepdims=False), vdtype).astype(jnp.float32)
    s = lax.dynamic_index_in_dim(scale, g, 0, keepdims=False)
    kb, (k, n) = s.shape[0], w.shape
    return (w.reshape(kb, k // kb, n) * s[:, None, :]).reshape(k, n).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gmm_q(lhs, values, scale, group_sizes, out_dtype, tm=None):
    """[M, K] x quantized [G, K, N] -> [M, N] out_dtype."""
    m = lhs.shape[0]
    tm = _tm(m, tm, values.shape[0])
    steps = _Steps(group_sizes, m, tm)
    out_dtype = jnp.dtype(out_dtype)
    lhs_b, v_b = _bits(lhs), _bits(values)

    def body(s, out):
        g, start, mask = steps.at(s)
        y = _q_dot(_load(lhs_b, None, start, tm, lhs.dtype), v_b, scale, g, lhs.dtype, values.dtype)
        return _masked_write(out, start, mask, y, out_dtype)

    out = lax.fori_loop(0, steps.count, body, _zeros((m, values.shape[2]), out_dtype))
    return _float(out, out_dtype)


def _gmm_q_fwd(lhs, values, scale, group_sizes, out_dtype, tm):
    return gmm_q(lhs, values, scale, group_sizes, out_dtype, tm), (lhs, values, scale, group_sizes)


def _gmm_q_bwd(out_dtype, tm, residuals, d_out):
    lhs, values, scale, group_sizes = residuals
    m = lhs.shape[0]
    tm = _tm(m, tm, values.shape[0])
    steps = _Steps(group_sizes, m, tm)
    dt = lhs.dtype
    d_out_b, v_b = _bits(d_out.astype(dt)), _bits(values)

    def body(s, d_lhs):
        g, start, mask = steps.at(s)
        dy = _load(d_out_b, None, start, tm, dt)
        return _masked_write(d_lhs, start, mask, _dot(dy, _q_weight(v_b, scale, g, dt, values.dtype), _NT), dt)

    d_lhs = lax.fori_loop(0, steps.count, body, _zeros(lhs.shape, dt))
    return _float(d_lhs, dt), None, None, None


gmm_q.defvjp(_gmm_q_fwd, _gmm_q_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def gmm_glu_q(x, wg, sg, wu, su, group_sizes, rows=None, tm=None):
    """h = silu(x @ dequant(wg)[g]) * (x @ dequant(wu)[g]) -> [M, F] in x.dtype; rows: the fused permute."""
    rows = _clip_rows(x, rows)
    m = x.shape[0] if rows is None else rows.shape[0]
    tm = _tm(m, tm, wg.shape[0])
    steps = _Steps(group_sizes, m, tm)
    dt = x.dtype
    x_b, wg_b, wu_b = _bits(x), _bits(wg), _bits(wu)

    def body(s, h):
        g, start, mask = steps.at(s)
        a = _load(x_b, rows, start, tm, dt)
        gate, up = _q_dot(a, wg_b, sg, g, dt, wg.dtype), _q_dot(a, wu_b, su, g, dt, wu.dtype)
        return _masked_write(h, start, mask, jax.nn.silu(gate) * up, dt)

    h = lax.fori_loop(0, steps.count, body, _zeros((m, wg.shape[2]), dt))
    return _float(h, dt)


def _glu_q_fwd(x, wg, sg, wu, su, group_sizes, rows, tm):
    return gmm_glu_q(x, wg, sg, wu, su, group_sizes, rows, tm), (x, wg, sg, wu, su, group_sizes, rows)


def _glu_q_bwd(tm, residuals, d_h):
    x, wg, sg, wu, su, group_sizes, rows = residuals
    rows_c = _clip_rows(x, rows)
    m = x.shape[0] if rows is None else rows.shape[0]
    tm = _tm(m, tm, wg.shape[0])
    steps = _Steps(group_sizes, m, tm)
    dt = x.dtype
    x_b, d_h_b, wg_b, wu_b = _bits(x), _bits(d_h.astype(dt)), _bits(wg), _bits(wu)

    def body(s, d_x):
        g, start, mask = steps.at(s)
        a = _load(x_b, rows_c, start, tm, dt)
        w_g, w_u = _q_weight(wg_b, sg, g, dt, wg.dtype), _q_weight(wu_b, su, g, dt, wu.dtype)
        gate, up = _dot(a, w_g, _NN), _dot(a, w_u, _NN)
        dh = jnp.where(mask[:, None], _load(d_h_b, None, start, tm, dt).astype(jnp.float32), 0.0)
        sig = jax.nn.sigmoid(gate)
        d_gate = (dh * up * sig * (1.0 + gate * (1.0 - sig))).astype(dt)
        d_up = (dh * gate * sig).astype(dt)
        dx_tile = _dot(d_gate, w_g, _NT) + _dot(d_up, w_u, _NT)
        if rows_c is None:
            return _masked_write(d_x, start, mask, dx_tile, dt)
        return d_x.at[lax.dynamic_slice_in_dim(rows_c, start, tm, 0)].add(dx_tile)

    d_x0 = _zeros(x.shape, dt) if rows_c is None else jnp.zeros(x.shape, jnp.float32)
    d_x = lax.fori_loop(0, steps.count, body, d_x0)
    d_x = _float(d_x, dt) if rows_c is None else d_x.astype(dt)
    return d_x, None, None, None, None, None, None


gmm_glu_q.defvjp(_glu_q_fwd, _glu_q_bwd)
