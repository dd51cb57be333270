#!/usr/bin/env bash
# Set up the environment (incl. the PyTorch CPU reference stack) and run the test suite on CPU.
# Golden data is read from ../shared/golden (override with MING_GOLDEN_DIR). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh test
export JAX_PLATFORMS=cpu
exec python -m pytest -q -m "not gpu" "$@"
