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
