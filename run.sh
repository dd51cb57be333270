#!/usr/bin/env bash
# Set up the environment and run generation. With no --checkpoint: the tiny preset with random weights.
#   ./run.sh                                   # tiny demo
#   ./run.sh --checkpoint /path/to/Ming-flash-omni-2.0 --prompt "Hello"
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
exec python -m ming_jax.generate "$@"
