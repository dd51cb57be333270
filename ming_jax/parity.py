"""Parity tool: run one golden case through ming_jax and compare with the official PyTorch outputs.

    python -m ming_jax.parity CASE_DIR [--dtype float32]

The case kind is the folder name. Exit status: 0 all tensors within tolerance, 1 some tensor out of tolerance (or a
tensor missing), 2 the kind is not supported. Each kind's runner lives in `ming_jax/parity_cases/<kind>.py` and
returns a list of `numerics.Comparison`; this module only dispatches and reports.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags

from ming_jax import golden, numerics

KINDS = ("llm_backbone", "vision_encoder", "audio_encoder", "preprocessing", "full_mm_forward")

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32"], "Compute dtype of the comparison run.")


class UnsupportedKind(Exception):
    pass


def runner_for(kind: str):
    if kind not in KINDS:
        raise UnsupportedKind(f"unknown golden case kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        module = importlib.import_module(f"ming_jax.parity_cases.{kind}")
    except ModuleNotFoundError as e:
        if e.name == f"ming_jax.parity_cases.{kind}":
            raise UnsupportedKind(f"golden case kind {kind!r} is not supported yet") from None
        raise
    return module.run


def run_case(path: str) -> list[numerics.Comparison]:
    kind = golden.case_kind(path)
    run = runner_for(kind)
    case = golden.load_case(path)
    rows = run(case)
    # Every tensor the case holds must be compared: an output the runner skipped is a failure, not a pass.
    compared = {r.name for r in rows}
    for name in sorted(set(case.outputs) - compared):
        rows.append(numerics.Comparison(name, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                        "not compared"))
    return rows


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m ming_jax.parity CASE_DIR")
    path = argv[1]
    try:
        rows = run_case(path)
    except UnsupportedKind as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 1
    print(f"case {path} ({golden.case_kind(path)}), dtype {_DTYPE.value}, tolerance "
          f"{numerics.TOLERANCES[_DTYPE.value]:g} relative max-abs (integers exact)")
    print(numerics.report(rows))
    bad = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    app.run(main)
