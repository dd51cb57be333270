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

    stacked (float weights only): optional (layer, w_gate_all, w_up_all, w_down_all) with the weights' stacks over
    all MoE layers ([L, E, ...], w_gate == w_gate_all[layer], ...), given inside a scan over layers so that the portable path reads its
    experts in place instead of through the scan's per-layer copy of every expert (`portable.grouped_glu`). The
    result and the gradients are the same; "pallas" and "xla" (and "auto" lowered for TPU) use the per-layer weights.
    """
    if stacked is not None and any(isinstance(w, quant.QArray) for w in (w_gate, w_up, w_down)):
        raise ValueError("grouped_glu: `stacked` (in-place expert reads) takes float weights, not quantized QArrays")
    if stacked is not None and (implementation == "portable" or (implementation == "auto" and interpret in (None, False))):
        _check(xs if rows is None else jax.ShapeDtypeStruct((rows.shape[0], xs.shape[1]), xs.dtype),
               {"w_gate": w_gate, "w_up": w_up}, group_sizes, implementation)
        if rows is not None:
            _check_rows(xs, rows)
        in_place = lambda a, gs, wg, wu, wd: portable.grouped_glu(a, gs, wg, wu, wd, rows, stacked)  # noqa: E731
        if implementation == "portable":
            with jax.named_scope("grouped_glu"):
                return in_place(xs, group_sizes, w_gate, w_up, w_down)

        def tpu(a, gs, wg, wu, wd):
            return grouped_glu(a, gs, wg, wu, wd, rows=rows, implementation="pallas", interpret=False)

        with jax.named_scope("grouped_glu"):
            return lax.platform_dependent(xs, group_sizes, w_gate, w_up, w_down, tpu=tpu, default=in_place)
    h = gmm_glu(xs, w_gate, w_up, group_sizes, rows=rows, implementation=implementation, interpret=interpret)
    return gmm(h.astype(xs.dtype), w_down, group_sizes, preferred_element_type=xs.dtype,
               implementation=implementation, interpret=interpret)
