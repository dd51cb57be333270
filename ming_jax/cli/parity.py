"""Parity CLI: run one golden case through ming_jax and compare with the official PyTorch outputs.

    python -m ming_jax.parity CASE_DIR [--dtype float32]

Exit status: 0 all tensors within tolerance, 1 some tensor out of tolerance (or a tensor missing), 2 the kind is not
supported. All logic lives in `ming_jax.parity`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from ming_jax import cli
from ming_jax.parity import golden, numerics
from ming_jax.parity.run import UnsupportedKind, run_case

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype of our "
                           "run; bfloat16 is judged against the float32 reference by numerics.BF16_MODEL.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m ming_jax.parity CASE_DIR")
    path = argv[1]
    try:
        rows = run_case(path, _DTYPE.value)
    except UnsupportedKind as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 1
    bar = (f"tolerance {numerics.TOLERANCES['float32']:g} relative max-abs (integers exact)"
           if _DTYPE.value == "float32" else f"bar {numerics.BF16_MODEL} (rel L2, top-1 / decision agreement; "
           "bookkeeping ids exact; tokens up to each row's first near-tie)")
    print(f"case {path} ({golden.case_kind(path)}), dtype {_DTYPE.value}, {bar}")
    print(numerics.report(rows))
    bad = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
