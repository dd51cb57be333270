import os
import pathlib

import pytest
import xla_env

# Fast XLA:CPU compiles for this process and the subprocesses tests start (before anything imports jax).
_XLA_CACHE = xla_env.apply()


def pytest_sessionfinish(session, exitstatus):
    xla_env.cleanup(_XLA_CACHE)


# Golden parity data lives beside the repository (../shared/golden); MING_GOLDEN_DIR overrides.
GOLDEN_DIR = pathlib.Path(os.environ.get("MING_GOLDEN_DIR",
                                         pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"))
REFERENCE_DIR = GOLDEN_DIR.parent / "reference"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN_DIR} (set MING_GOLDEN_DIR)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    return REFERENCE_DIR


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop jax's compiled programs. XLA:CPU maps each executable's code into the process;
    a whole-suite run kept every program of every module (test_generation.py alone leaves ~9,000 mappings) until
    the process passed Linux's per-process limit (vm.max_map_count, 65,530), and the next compile's mmap failed:
    "Fatal Python error: Segmentation fault" (jax 0.12) or "Aborted" (jax 0.10) late in the suite, in whichever
    test came next. tests/test_zz_process_limits.py checks the count at the end of a run. The tests that count
    traces or compilations (test_batch, test_serving, test_image_gen, test_image_glyph) count within one module."""
    yield
    import sys

    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()
