"""One place for comparing our tensors with reference tensors, and one tolerance table.

Error metric: max |ours - ref| divided by max |ref| ("relative max-abs"). It is scale-free, so one number per dtype
works for logits, hidden states and routing weights alike, and it is the metric the project's parity bar is stated in.
Integer tensors (token ids, expert ids, positions, masks) must match exactly, and ours must be integers too: a float
output compared with an integer reference fails (naming both dtypes) instead of being cast, so 3.7 never passes for 3.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

# Relative max-abs tolerance by compute dtype.
#  float32: the project bar. Our kernels reorder float32 reductions (fused matmuls, grouped expert matmuls, softmax in
#           one pass), which moves results by a few ulps times the depth of the network: ~1e-6 relative in practice.
#  bfloat16: 8 mantissa bits give ~4e-3 relative rounding per op; a few layers of accumulation stay under 2e-2.
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    ref_max_abs: float
    rel: float
    tol: float
    exact: bool
    ok: bool
    note: str = ""

    def row(self) -> str:
        status = "ok" if self.ok else "FAIL"
        if self.exact:
            detail = "exact" if self.ok else self.note
            return f"{self.name:<44} {'int':>11} {'':>11} {detail:>11}  {status}"
        row = f"{self.name:<44} {self.max_abs:11.3e} {self.ref_max_abs:11.3e} {self.rel:11.3e}  {status}"
        return f"{row}  ({self.note})" if self.note and not self.ok else row


def compare(name: str, ours, ref, *, dtype: str = "float32", tol: float | None = None) -> Comparison:
    """Compare one tensor; shapes must agree exactly (a shape mismatch is a failure, not an exception)."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    tol = TOLERANCES[dtype] if tol is None else tol
    if ours.shape != ref.shape:
        return Comparison(name, np.inf, np.nan, np.inf, tol, False, False, f"shape {ours.shape} != ref {ref.shape}")
    exact = not _is_float(ref.dtype)
    if exact:
        if not _is_exact(ours.dtype):  # 3.7 must not pass against 3: an id / position / mask output is an integer
            return Comparison(name, np.inf, 0.0, np.inf, 0.0, True, False,
                              f"ours {ours.dtype}, ref {ref.dtype}: integer reference needs an integer output")
        n_bad = int(np.sum(ours != ref))  # numpy compares mixed integer dtypes by value (no wrap-around cast)
        return Comparison(name, float(n_bad), 0.0, 0.0, 0.0, True, n_bad == 0, f"{n_bad} differ")
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / ref_max if ref_max > 0 else max_abs
    ok = bool(np.isfinite(rel) and rel <= tol and np.all(np.isfinite(ours) == np.isfinite(ref)))
    return Comparison(name, max_abs, ref_max, rel, tol, False, ok)


def _is_float(dtype) -> bool:
    """numpy's issubdtype misses bfloat16 (an ml_dtypes extension type); jax's knows it."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def _is_exact(dtype) -> bool:
    """Integer or boolean: the dtypes compared exactly."""
    dtype = np.dtype(dtype)
    return dtype == np.bool_ or np.issubdtype(dtype, np.integer)


def report(rows: Iterable[Comparison]) -> str:
    rows = list(rows)
    head = f"{'tensor':<44} {'max_abs':>11} {'ref_max':>11} {'rel':>11}  status"
    return "\n".join([head, "-" * len(head)] + [r.row() for r in rows])


def all_ok(rows: Sequence[Comparison]) -> bool:
    return all(r.ok for r in rows)


def assert_close(name: str, ours, ref, *, dtype: str = "float32", tol: float | None = None) -> None:
    """For tests: raise AssertionError with the comparison row when `ours` is not within tolerance of `ref`."""
    c = compare(name, ours, ref, dtype=dtype, tol=tol)
    if not c.ok:
        raise AssertionError(f"{c.row()} (tol {c.tol:g}) {c.note}")
