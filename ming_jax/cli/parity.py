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

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32"], "Compute dtype of the comparison run.")


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


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
