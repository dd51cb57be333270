import os
import pathlib

import pytest

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
    """After each test module, drop jax's compiled-program caches: a whole-suite run otherwise keeps every program
    of every module (the 3.11 leg grew past 5 GB RSS by mid-suite), and CI runs two such legs side by side on one
    24 GiB machine. The tests that count traces or compilations (test_batch, test_serving, test_image_gen,
    test_image_glyph) count within one module."""
    yield
    import sys

    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()
