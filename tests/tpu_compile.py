"""The one gate of every test that compiles for TPU through libtpu on this CPU host (no TPU needed).

A missing libtpu FAILS such a test, so CI cannot stay green with the compiled kernels, the ragged exchange and the
memory plans untested; a user without libtpu opts out explicitly with MING_NO_LIBTPU=1 (then they skip, saying
so). ALLOW_MULTIPLE_LIBTPU_LOAD lets several JAX processes use the compiler at once (libtpu's single-user lock
file is for owning real chips): `ming_jax.aot.topology` sets it too.
"""

import importlib.util
import os

import pytest

OPT_OUT = "MING_NO_LIBTPU"


def need_libtpu(module_level: bool = False) -> None:
    if importlib.util.find_spec("libtpu") is None:
        hint = "`pip install 'jax[tpu]==<your jax version>'` (tools/setup_env.sh does)"
        if os.environ.get(OPT_OUT) == "1":
            pytest.skip(f"libtpu is not installed and {OPT_OUT}=1: TPU compiles skipped ({hint})",
                        allow_module_level=module_level)
        pytest.fail(f"libtpu is not installed, so nothing can be compiled for TPU: {hint}, or set {OPT_OUT}=1 to "
                    "skip these tests", pytrace=False)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
