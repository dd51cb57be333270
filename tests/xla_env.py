"""How the test suite has XLA:CPU compile: quickly. `tests/conftest.py` applies it before jax starts.

Most of the suite's time is XLA:CPU compiling small programs, not running them: tests/test_generation.py takes 81 s
cold and 22 s when every program is already compiled (2-core VM, jax 0.10.2). Two settings, for the pytest process
and for the subprocesses its tests start (CLIs, notebooks, the 8-device suites), cut that:

* LLVM at -O0 (`--xla_backend_optimization_level=0`): test_generation.py 81 -> 59 s. The programs are tiny, so what
  they lose in run time is small; the arithmetic is the same IEEE arithmetic (XLA:CPU does not enable fast-math at
  any level), and the tests that compare two programs bit for bit compile both the same way.
* A persistent compilation cache in a fresh folder for the run (`JAX_COMPILATION_CACHE_DIR`): the per-module
  `jax.clear_caches()` of conftest.py (the memory-mapping limit) makes every module compile again what earlier ones
  compiled, and each subprocess starts with nothing; with the cache they load it. Six CLI / serving / weight-hook
  modules: 213 -> 183 s. The folder is removed when the run that made it ends.

Either is skipped when the caller already chose (an optimisation level in XLA_FLAGS, a cache folder in the
environment); MING_TEST_DEFAULT_XLA=1 turns both off (a run as users compile).
"""

import os
import shutil
import tempfile

OPT_FLAG = "--xla_backend_optimization_level=0"


def enabled() -> bool:
    return os.environ.get("MING_TEST_DEFAULT_XLA", "0") != "1"


def flags(*extra: str) -> str:
    """XLA_FLAGS for a test's subprocess: the suite's compile setting plus `extra` (e.g. a host device count)."""
    return " ".join(([OPT_FLAG] if enabled() else []) + [e for e in extra if e])


def apply() -> str | None:
    """Set the environment of this process (before jax starts) and of its children; returns the cache folder this
    call made (for `cleanup`), or None."""
    if not enabled():
        return None
    xla = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in xla:
        os.environ["XLA_FLAGS"] = f"{xla} {OPT_FLAG}".strip()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="ming_jax_test_xla_cache.")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the small programs are the many
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return folder


def cleanup(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
