"""The grouped matmuls of the MoE experts: the only entry of this folder, and the only place a backend is chosen.

    gmm(lhs, rhs, group_sizes)                         out[rows of g] = lhs[rows of g] @ rhs[g]
    gmm_glu(x, w_gate, w_up, group_sizes, rows=)       h = silu(x @ w_gate[g]) * (x @ w_up[g]), permute optionally fused
    grouped_glu(x, group_sizes, w_gate, w_up, w_down)  the expert FFN: gmm(gmm_glu(x), w_down)

Implementations (`implementation=`):
  "portable" `portable.py`: a loop over (row tile, expert) steps with plain dots and custom VJPs; useful work plus
            at most one straddled tile per expert, temporaries O(rows x width): the CPU and GPU path;
  "xla"     `xla.py`: jax.lax.ragged_dot (differentiated by autodiff); native on XLA:TPU, but lowered densely
            elsewhere (O(rows x experts x width) work and memory), so kept by name only;
  "pallas"  `kernel.py` + `vjp.py`: the Mosaic TPU kernels with their custom VJPs;
  "auto"    "pallas" when the program is lowered for TPU, "portable" otherwise.
The choice is made when lowering (`lax.platform_dependent`), never from the host's backend, so an ahead-of-time
compile for a TPU topology from a CPU host gets the compiled kernels, and the same jitted function serves every
platform. `interpret`: None (default) runs a "pallas" request compiled on TPU and in the Pallas interpreter
elsewhere (tests); True (or a `pltpu.InterpretParams`) always interprets; False always compiles the kernels.
Reference implementations for tests (per-group loops, no ragged_dot) are in `reference.py`.

Quantized weights: every weight argument may instead be a `qwix.QArray` of int8 / float8_e4m3fn values with float32
scales, per output channel [G, 1, N] or sub-channel [G, K / block, N] (`quant.py`). Every implementation then reads
the stored 1-byte values and applies the scales itself: "pallas" streams int8 / fp8 tiles into VMEM and applies a
per-channel scale to the float32 accumulators in the epilogue (the fused gate/up + SiLU kept), a sub-channel scale by
dequantising each tile in VMEM; "portable" slices one expert's values per step and scales its float32 product;
"xla" calls `qwix.ragged_dot`. Quantized weights are constants: gradients flow to the activations only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ming_jax.config.runtime import GMM_IMPLEMENTATIONS
from ming_jax.pallas.gmm import portable, quant, vjp, xla
from ming_jax.pallas.gmm.kernel import BlockSizes, GmmTiling

IMPLEMENTATIONS = GMM_IMPLEMENTATIONS


def _check(lhs, weights, group_sizes, implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if lhs.ndim != 2 or lhs.shape[0] == 0:
        raise ValueError(f"lhs must be [M, K] with M >= 1, got shape {lhs.shape}")
    for name, w in weights.items():
        shape = quant.weight_shape(w)
        if len(shape) != 3 or shape[1] != lhs.shape[1]:
            raise ValueError(f"{name} must be [G, K={lhs.shape[1]}, N], got shape {shape}")
        if quant.is_quantized(w):
            quant.expert_scales(w, name)
    quantized = {quant.is_quantized(w) for w in weights.values()}
    if len(quantized) > 1:
        raise ValueError(f"{', '.join(weights)}: either all quantized or none")
    num_groups = quant.weight_shape(next(iter(weights.values())))[0]
    if group_sizes.shape != (num_groups,) or group_sizes.dtype != jnp.int32:
        raise ValueError(
            f"group_sizes must be int32 [{num_groups}] (one per expert), got {group_sizes.dtype} {group_sizes.shape}"
        )


def _choose(implementation, interpret, pallas_fn, xla_fn, portable_fn, *args):
    """Run `pallas_fn(interpret)(*args)`, `xla_fn(*args)` or `portable_fn(*args)` per `implementation` (see the
    module docstring)."""
    if implementation == "xla":
        return xla_fn(*args)
    if implementation == "portable":
        return portable_fn(*args)
    if interpret is not None and (implementation == "pallas" or interpret is not False):
        return pallas_fn(interpret)(*args)
    default = pallas_fn(True) if implementation == "pallas" else portable_fn
    return lax.platform_dependent(*args, tpu=pallas_fn(False), default=default)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling: BlockSizes | GmmTiling | None = None,
    interpret=None,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped matmul over expert-sorted rows: out[rows of g] = lhs[rows of g] @ rhs[g]; [M, K] x [G, K, N] -> [M, N].

    Group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])); rows at or past sum(group_sizes) are padding and
    come out as 0 (their gradients too). Sizes summing past M are cut at M. Output dtype: preferred_element_type, else
    lhs.dtype; accumulation is float32. `implementation` and `interpret`: see the module docstring.
    """
    _check(lhs, {"rhs": rhs}, group_sizes, implementation)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tiling = GmmTiling.coerce(tiling)
    if quant.is_quantized(rhs):
        with jax.named_scope("gmm_q"):
            return _choose(
                implementation, interpret,
                lambda interp: lambda a, v, s, gs: vjp.gmm_pallas_q(a, v, s, gs, out_dtype, tiling, interp),
                lambda a, v, s, gs: xla.gmm_q(a, quant.QArray(v, s, None, v.dtype), gs, out_dtype),
                lambda a, v, s, gs: portable.gmm_q(a, v, s, gs, out_dtype, None),
                lhs, rhs.qvalue, rhs.scale.astype(jnp.float32), group_sizes,
            )
    with jax.named_scope("gmm"):
        return _choose(
            implementation, interpret,
            lambda interp: lambda a, b, gs: vjp.gmm_pallas(a, b, gs, out_dtype, tiling, interp),
            lambda a, b, gs: xla.gmm(a, b, gs, out_dtype),
            lambda a, b, gs: portable.gmm(a, b, gs, out_dtype, None),
            lhs, rhs, group_sizes,
        )


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
    interpret=None,
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
    x[rows] first; the portable path gathers each tile's rows inside its loop and scatter-adds d_x per tile; all
    agree. With the Pallas kernels D must be a multiple of the k tile (or fit one k tile).
    """
    if rows is not None:
        _check_rows(x, rows)
        m = rows.shape[0]
    else:
        m = None
    _check(x if m is None else jax.ShapeDtypeStruct((m, x.shape[1]), x.dtype), {"w_gate": w_gate, "w_up": w_up},
           group_sizes, implementation)
    if quant.weight_shape(w_gate) != quant.weight_shape(w_up):
        raise ValueError(f"w_gate {quant.weight_shape(w_gate)} and w_up {quant.weight_shape(w_up)} must have the "
                         "same [G, D, F] shape")
    tiling = GmmTiling.coerce(tiling)
    if quant.is_quantized(w_gate):
        return _gmm_glu_q(x, w_gate, w_up, group_sizes, rows, tiling, interpret, implementation)
    with jax.named_scope("gmm_glu"):
        if rows is None:
            return _choose(
                implementation, interpret,
                lambda interp: lambda a, wg, wu, gs: vjp.glu_pallas(a, wg, wu, gs, None, tiling, interp),
                xla.gmm_glu,
                lambda a, wg, wu, gs: portable.gmm_glu(a, wg, wu, gs, None, None),
                x, w_gate, w_up, group_sizes,
            )
        return _choose(
            implementation, interpret,
            lambda interp: lambda a, wg, wu, gs, r: vjp.glu_pallas(a, wg, wu, gs, r, tiling, interp),
            lambda a, wg, wu, gs, r: xla.gmm_glu(xla.gather_rows(a, r), wg, wu, gs),
            lambda a, wg, wu, gs, r: portable.gmm_glu(a, wg, wu, gs, r, None),
            x, w_gate, w_up, group_sizes, rows,
        )


def _gmm_glu_q(x, w_gate, w_up, group_sizes, rows, tiling, interpret, implementation):
    """gmm_glu with quantized w_gate / w_up (see the module docstring)."""
    q = lambda v, s: quant.QArray(v, s, None, v.dtype)  # noqa: E731
    parts = (w_gate.qvalue, w_gate.scale.astype(jnp.float32), w_up.qvalue, w_up.scale.astype(jnp.float32))
    with jax.named_scope("gmm_glu_q"):
        if rows is None:
            return _choose(
                implementation, interpret,
                lambda interp: lambda a, vg, sg, vu, su, gs: vjp.glu_pallas_q(a, vg, sg, vu, su, gs, None, tiling,
                                                                              interp),
                lambda a, vg, sg, vu, su, gs: xla.gmm_glu_q(a, q(vg, sg), q(vu, su), gs),
                lambda a, vg, sg, vu, su, gs: portable.gmm_glu_q(a, vg, sg, vu, su, gs, None, None),
                x, *parts, group_sizes,
            )
        return _choose(
            implementation, interpret,
            lambda interp: lambda a, vg, sg, vu, su, gs, r: vjp.glu_pallas_q(a, vg, sg, vu, su, gs, r, tiling, interp),
            lambda a, vg, sg, vu, su, gs, r: xla.gmm_glu_q(xla.gather_rows(a, r), q(vg, sg), q(vu, su), gs),
            lambda a, vg, sg, vu, su, gs, r: portable.gmm_glu_q(a, vg, sg, vu, su, gs, r, None),
            x, *parts, group_sizes, rows,
        )


def grouped_glu(xs, group_sizes, w_gate, w_up, w_down, *, rows=None, implementation: str = "auto", interpret=None,
                stacked=None):
    """The routed experts' SwiGLU FFN: down_g(silu(gate_g(x)) * up_g(x)) for each row of expert g.

    xs [M, D] sorted by expert (or, with `rows` [M] int32, the unsorted [T, D] tokens with sorted row r = xs[rows[r]],
    the permute fused into the gate/up kernel's loads), group_sizes [E], w_gate / w_up [E, D, F], w_down [E, F, D]
    -> [M, D] in sorted order, xs.dtype (float32 accumulation). The weights may be quantized `qwix.QArray`s
    (all three, or none; see the module docstring).

    stacked: optional (layer, w_gate_all, w_up_all, w_down_all) with the weights' stacks over all MoE layers ([L, E,
    ...], w_gate == w_gate_all[layer], ...; quantized weights: QArray stacks, values [L, E, ...] and scales [L, E,
    ...]), given inside a scan over layers so that the experts are read in place instead of through the scan's
    per-layer copy of every expert. "pallas" (and "auto" lowered for TPU): the kernels index the stacks with a
    layer offset (`kernel.grouped_matmul(layer=)`), float and quantized; "portable": float stacks in place
    (`portable.grouped_glu`), quantized ones through the per-layer weights (no in-place quantized portable loop);
    "xla": the per-layer weights. The result is the same; under differentiation the per-layer path runs (so the
    gradients are those of the per-layer weights, whose cotangents the layer scan stacks) and the stacks, which
    enter through `stop_gradient`, get none.
    """
    if stacked is None or implementation == "xla":
        return _grouped_glu_sliced(xs, group_sizes, (w_gate, w_up, w_down), rows, implementation, interpret)
    weights = (w_gate, w_up, w_down)
    layer, *stacks = stacked
    quantized = _check_stacks(weights, stacks)
    _check(xs if rows is None else jax.ShapeDtypeStruct((rows.shape[0], xs.shape[1]), xs.dtype),
           {"w_gate": w_gate, "w_up": w_up}, group_sizes, implementation)
    if rows is not None:
        _check_rows(xs, rows)
    layer = jnp.asarray(layer, jnp.int32)
    stacks = tuple(jax.tree.map(lax.stop_gradient, s) for s in stacks)
    if quantized:  # the kernels take (values, float32 scale) pairs
        stacks = tuple((s.qvalue, s.scale.astype(jnp.float32)) for s in stacks)

    def pallas_fn(interp):
        def run(a, gs, r, ws, lyr, st):
            return _in_place(a, gs, r, ws, lyr, st,
                             lambda a, gs, r, lyr, st: vjp.ffn_stacked(a, gs, r, lyr, st, GmmTiling(), interp),
                             lambda a, gs, r, ws: _grouped_glu_sliced(a, gs, ws, r, "pallas", interp))
        return run

    def portable_fn(a, gs, r, ws, lyr, st):
        if quantized:  # no in-place quantized portable loop: the per-layer weights
            return _grouped_glu_sliced(a, gs, ws, r, "portable", None)
        return portable.grouped_glu(a, gs, *ws, r, (lyr, *st))

    with jax.named_scope("grouped_glu"):
        return _choose(implementation, interpret, pallas_fn, None, portable_fn, xs, group_sizes, rows, weights, layer,
                       stacks)


def _check_stacks(weights, stacks) -> bool:
    """The stacks must be [L, ...] stacks of the per-layer weights (quantized alike); returns whether quantized."""
    if len(stacks) != 3:
        raise ValueError(f"stacked must be (layer, w_gate_all, w_up_all, w_down_all), got {len(stacks)} stacks")
    quantized = quant.is_quantized(weights[0])
    for name, w, s in zip(("w_gate", "w_up", "w_down"), weights, stacks):
        if quant.is_quantized(w) != quantized or quant.is_quantized(s) != quantized:
            raise ValueError(f"stacked {name}: the weights and their stacks must all be quantized or all float")
        pairs = ((w.qvalue, s.qvalue), (w.scale, s.scale)) if quantized else ((w, s),)
        for a, b in pairs:
            if b.ndim != a.ndim + 1 or b.shape[1:] != a.shape or b.dtype != a.dtype:
                raise ValueError(f"stacked {name} must be an [L, {', '.join(map(str, a.shape))}] {a.dtype} stack of "
                                 f"the per-layer weight, got {b.dtype} {b.shape}")
    return quantized


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _in_place(x, group_sizes, rows, weights, layer, stacks, run_stacked, run_sliced):
    """run_stacked(x, group_sizes, rows, layer, stacks): the primal, reading the stacks in place (the per-layer
    `weights` go unused, so XLA drops their slices); under differentiation run_sliced(x, group_sizes, rows, weights)
    and its VJP."""
    del weights
    return run_stacked(x, group_sizes, rows, layer, stacks)


def _in_place_fwd(x, group_sizes, rows, weights, layer, stacks, run_stacked, run_sliced):
    return jax.vjp(lambda a, ws: run_sliced(a, group_sizes, rows, ws), x, weights)  # (output, pullback)


def _in_place_bwd(run_stacked, run_sliced, pullback, d_y):
    d_x, d_weights = pullback(d_y)
    return d_x, None, None, d_weights, None, None


_in_place.defvjp(_in_place_fwd, _in_place_bwd)


def _grouped_glu_sliced(xs, group_sizes, weights, rows, implementation, interpret):
    w_gate, w_up, w_down = weights
    h = gmm_glu(xs, w_gate, w_up, group_sizes, rows=rows, implementation=implementation, interpret=interpret)
    return gmm(h.astype(xs.dtype), w_down, group_sizes, preferred_element_type=xs.dtype,
               implementation=implementation, interpret=interpret)
