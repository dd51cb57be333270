"""One place for comparing our tensors with reference tensors, and one tolerance table.

Error metric: max |ours - ref| divided by max |ref| ("relative max-abs"). It is scale-free, so one number per dtype
works for logits, hidden states and routing weights alike, and it is the metric the project's parity bar is stated in.
Integer tensors (token ids, expert ids, positions, masks) must match exactly, and ours must be integers too: a float
output compared with an integer reference fails (naming both dtypes) instead of being cast, so 3.7 never passes for 3.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ming_jax.config.runtime import Runtime

# Relative max-abs tolerance by compute dtype.
#  float32: the project bar. Our kernels reorder float32 reductions (fused matmuls, grouped expert matmuls, softmax in
#           one pass), which moves results by a few ulps times the depth of the network: ~1e-6 relative in practice.
#  bfloat16: 8 mantissa bits give ~4e-3 relative rounding per op; a few layers of accumulation stay under 2e-2.
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}

# A whole model run in bfloat16 against the float32 reference (`python -m ming_jax.parity CASE --dtype bfloat16`):
# routing decisions flip on near-ties (a token then takes another expert, which moves its row by O(1)) and single
# elements move by several bf16 ulps, so element-wise max-abs is the wrong bar. Stated instead: relative L2 error
# ||ours - ref|| / ||ref|| <= 0.1 for every float tensor; the top-1 choice of every logits row agrees on >= 90% of
# rows; ids that are decisions (expert ids, tokens) agree on >= 80% of entries; greedy tokens are compared exactly,
# but only up to each row's first near-tie of the reference (`tie_free_prefix`); ids that are bookkeeping
# (positions, grids, masks, lengths) stay exact. Measured on the golden cases (2026-12-01, CPU): towers 0.6-1.1% rel
# L2; the 3-layer MoE backbone 4-7% rel L2 at its output with 95-97% top-1 agreement, top-k weights 4-5%.
BF16_MODEL = {"rel_l2": 0.1, "top1": 0.90, "decisions": 0.80}

# Weight-only quantized models (`ming_jax.quant`: the LLM's projections and expert stacks int8 / fp8 with per-channel
# scales, bf16 compute) against the official float32 outputs of the golden llm_backbone case
# (`ming_jax.parity.quant_quality`; tests/test_quant_quality.py): logits of the multimodal prompt (91 positions) and
# the 8 greedy tokens of the text prompt. Measured 2026-12-01 on CPU (docs/benchmarks.md): int8 rel L2 0.145, top-1
# 91.2%, greedy 8 of 8; fp8 (e4m3: 3 mantissa bits, ~4x int8's weight error on these Gaussian weights) rel L2 0.278,
# top-1 70.3%, greedy 3 of 8. The tiny random golden model amplifies errors (bf16 alone: rel L2 0.06, top-1 97%), so
# these are bounds for this case, with margin, not the accuracy of the real model. Bounds: rel L2 <=, top-1
# agreement >=, greedy common prefix >= (fraction of the 8 tokens).
QUANT_QUALITY = {
    "int8": {"rel_l2": 0.20, "top1": 0.85, "greedy": 0.75},
    "fp8": {"rel_l2": 0.35, "top1": 0.60, "greedy": 0.25},
}
MODEL_BF16 = "bfloat16-model"  # the `dtype` of `compare` that applies this bar
_BOOKKEEPING = ("position", "grid", "mask", "len", "spans", "index")


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
            detail = self.note if (not self.ok or self.note.endswith("agree")) else "exact"
            return f"{self.name:<44} {'int':>11} {'':>11} {detail:>11}  {status}"
        row = f"{self.name:<44} {self.max_abs:11.3e} {self.ref_max_abs:11.3e} {self.rel:11.3e}  {status}"
        return f"{row}  ({self.note})" if self.note and not self.ok else row


def compare_model_bf16(name: str, ours, ref) -> Comparison:
    """One tensor of a whole-model bfloat16 run against the float32 reference, by the `BF16_MODEL` bar."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        return Comparison(name, np.inf, np.nan, np.inf, 0.0, False, False, f"shape {ours.shape} != ref {ref.shape}")
    if not _is_float(ref.dtype):
        if any(k in name for k in _BOOKKEEPING):
            return compare(name, ours, ref)
        agree = float(np.mean(ours == ref)) if ref.size else 1.0
        ok = _is_exact(ours.dtype) and agree >= BF16_MODEL["decisions"]
        return Comparison(name, float(np.sum(ours != ref)), 0.0, 0.0, 0.0, True, ok, f"{100 * agree:.1f}% agree")
    o, r = ours.astype(np.float64), ref.astype(np.float64)
    norm = float(np.sqrt(np.sum(r * r)))
    rel = float(np.sqrt(np.sum((o - r) ** 2)) / norm) if norm > 0 else float(np.abs(o).max(initial=0.0))
    ok = bool(np.isfinite(rel) and rel <= BF16_MODEL["rel_l2"])
    note = "rel L2"
    if name.endswith("logits") and ref.ndim >= 2 and ref.size:
        top1 = float(np.mean(np.argmax(o, -1) == np.argmax(r, -1)))
        ok = ok and top1 >= BF16_MODEL["top1"]
        note = f"rel L2, top-1 {100 * top1:.1f}%"
    max_abs = float(np.abs(o - r).max(initial=0.0))
    return Comparison(name, max_abs, float(np.abs(r).max(initial=0.0)), rel, BF16_MODEL["rel_l2"], False, ok, note)


def tie_free_prefix(step_logits, margin: float) -> np.ndarray:
    """[B, N, V] reference logits of a greedy decode -> [B] number of leading steps whose top-1 beats the top-2 by
    more than `margin`: a lower-precision run must pick the same tokens there; after a near-tie it may not."""
    top2 = np.sort(np.asarray(step_logits, np.float64), axis=-1)[..., -2:]
    tied = (top2[..., 1] - top2[..., 0]) <= margin  # [B, N]
    return np.where(tied.any(1), np.argmax(tied, axis=1), tied.shape[1])


def compare(name: str, ours, ref, *, dtype: str = "float32", tol: float | None = None) -> Comparison:
    """Compare one tensor; shapes must agree exactly (a shape mismatch is a failure, not an exception).

    dtype MODEL_BF16: a whole model run in bfloat16 against a float32 reference, judged by `compare_model_bf16`."""
    if dtype == MODEL_BF16:
        return compare_model_bf16(name, ours, ref)
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


def missing(name: str, note: str) -> Comparison:
    """A failed row for a reference tensor we do not produce (a skipped output is a failure, not a pass)."""
    return Comparison(name, float("nan"), float("nan"), float("nan"), 0.0, False, False, note)


def compare_outputs(ours: Mapping[str, object], refs: Mapping[str, object], *, dtype: str = "float32",
                    prefix: str = "", missing_note: Callable[[str], str] | str = "not an output of this kind"
                    ) -> list[Comparison]:
    """Every reference tensor whose name starts with `prefix` against `ours[name without the prefix]` (float
    outputs compared as float32); one we lack is a failed row noted by `missing_note` (a text, or a function of the
    short name)."""
    rows = []
    for key, ref in refs.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        if short not in ours:
            rows.append(missing(key, missing_note(short) if callable(missing_note) else missing_note))
            continue
        value = np.asarray(ours[short])
        rows.append(compare(key, value.astype(np.float32) if value.dtype.kind == "f" else value, ref, dtype=dtype))
    return rows


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


def runtime_for(mode: str):
    """The run settings a parity mode computes in: float32, or bfloat16 parameters and compute (MODEL_BF16)."""
    return Runtime.bf16() if mode == MODEL_BF16 else Runtime()
