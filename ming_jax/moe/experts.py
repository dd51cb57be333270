"""Grouped SwiGLU experts over expert-sorted rows, with a choice of grouped-matmul backend.

`grouped_glu(xs, group_sizes, w_gate, w_up, w_down, impl=...)` computes, for each row r of expert g,
down_g(silu(gate_g(xs[r])) * up_g(xs[r])). Backends:
  "xla"    - `jax.lax.ragged_dot` (portable reference; XLA:TPU lowers it natively, other backends may densify);
  "pallas" - the Pallas TPU grouped-matmul kernels in `ming_jax.pallas.gmm` (fused gate/up + SiLU epilogue);
  "loop"   - one dense matmul per expert on masked rows: the test oracle, O(E) work, never for production;
  "auto"   - "pallas" on TPU, "xla" elsewhere.
With `rows=` the input is the unsorted tokens and the permute is fused into the Pallas gate/up kernel's loads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return impl


def grouped_glu(xs, group_sizes, w_gate, w_up, w_down, *, impl: str = "auto", rows=None):
    """xs [M, D] sorted by expert, group_sizes [E], w_gate / w_up [E, D, F], w_down [E, F, D] -> [M, D].

    rows: optional int32 [M] fused permute: xs is then the unsorted [T, D] (the tokens) and sorted row r is
    xs[rows[r]]. "pallas" reads those rows inside the gate/up kernel (no [M, D] permuted copy); "xla" / "loop" gather
    first. The result is [M, D] in sorted order either way.
    """
    impl = resolve_impl(impl)
    if rows is not None and impl != "pallas":
        from ming_jax.pallas.gmm.vjp import gather_rows

        xs, rows = gather_rows(xs, rows), None
    if impl == "xla":
        dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)  # noqa: E731
        h = jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)
        return dot(h.astype(xs.dtype), w_down).astype(xs.dtype)
    if impl == "pallas":
        from ming_jax.pallas import gmm as pgmm

        interpret = jax.default_backend() != "tpu"  # off TPU the kernels run in the Pallas interpreter (tests)
        h = pgmm.gmm_glu(xs, w_gate, w_up, group_sizes, rows=rows, interpret=interpret, implementation="pallas")
        return pgmm.gmm(h.astype(xs.dtype), w_down, group_sizes, preferred_element_type=xs.dtype,
                        interpret=interpret, implementation="pallas")
    if impl == "loop":
        return _loop(xs, group_sizes, w_gate, w_up, w_down)
    raise ValueError(f"unknown grouped matmul impl {impl!r}")


def _loop(xs, group_sizes, w_gate, w_up, w_down):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(xs.shape[0])
    out = jnp.zeros(xs.shape, jnp.float32)
    for e in range(w_gate.shape[0]):
        sel = ((rows >= starts[e]) & (rows < ends[e]))[:, None]
        h = jax.nn.silu(xs @ w_gate[e]) * (xs @ w_up[e])
        out = out + jnp.where(sel, h @ w_down[e], 0.0)
    return out.astype(xs.dtype)
