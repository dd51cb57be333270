"""Thin absl mains over the library: parse flags, call one library function, show progress. Each is reachable as
`python -m ming_jax.<name>` and as a console script (pyproject.toml)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import jax
from absl import app, flags


def local_platforms() -> str | None:
    """The jax platforms worth initialising on this host, or None to let jax decide (a TPU host, or JAX_PLATFORMS
    set). With libtpu installed (for compiling to TPU topologies, `ming_jax.aot`), jax otherwise initialises a TPU
    backend on every host and, without a TPU, prints libtpu's errors and takes libtpu's single-process lock, which
    makes a second JAX program on the same machine fail."""
    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return None
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(
        importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    return "cuda,cpu" if cuda else "cpu"


def run(main, module: str) -> None:
    """`app.run(main)` for the CLI defined in `module`, on this host's platforms (`local_platforms`). absl's
    `--help` lists the flags of the program's main module; under `python -m ming_jax.<name>` (a shim) or a console
    script that is not `module`, so `module`'s flags are adopted by it."""
    platforms = local_platforms()
    if platforms:
        jax.config.update("jax_platforms", platforms)
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


def mesh_and_rules(mesh_text: str | None, rules_name: str):
    """(mesh, rules) of the --mesh / --rules flags, or (None, None) without --mesh; a bad mesh is a usage error."""
    from ming_jax import sharding

    if not mesh_text:
        return None, None
    try:
        return sharding.make_mesh(sharding.MeshSpec.parse(mesh_text)), sharding.ShardingRules.preset(rules_name)
    except sharding.ShardingError as e:
        raise app.UsageError(f"--mesh {mesh_text!r}: {e}") from None
