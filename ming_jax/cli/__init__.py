"""Thin absl mains over the library: parse flags, call one library function, show progress. Each is reachable as
`python -m ming_jax.<name>` and as a console script (pyproject.toml)."""

from __future__ import annotations

import sys

from absl import app, flags


def run(main, module: str) -> None:
    """`app.run(main)` for the CLI defined in `module`. absl's `--help` lists the flags of the program's main module;
    under `python -m ming_jax.<name>` (a shim) or a console script that is not `module`, so `module`'s flags are
    adopted by it."""
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
