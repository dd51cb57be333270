#!/usr/bin/env bash
# Create (once) and update the project virtualenv in .venv: jax (CPU), flax & co, and with `test` the PyTorch CPU
# reference stack. torch is pinned to 2.13.0, the CPU build served from local disk; an unpinned torch would pull a
# multi-GB CUDA build. Usage: source tools/setup_env.sh [test|tpu]
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-python3}"
if [ ! -x "$_repo/.venv/bin/python" ]; then
  "$_py" -m venv "$_repo/.venv"
fi
# shellcheck disable=SC1091
source "$_repo/.venv/bin/activate"
python -m pip install -q --upgrade pip
# The editable install writes ming_jax.egg-info into the checkout: serialised with CI's other leg where flock exists.
_locked() { if command -v flock >/dev/null 2>&1; then flock "$_repo/.install.lock" "$@"; else "$@"; fi; }
if [ "${1:-}" = "test" ]; then
  python -m pip install -q "torch==2.13.0"
  _locked python -m pip install -q -e "$_repo[test]"
  # libtpu lets the CPU machine compile our Pallas kernels and sharded programs for real TPU slices (no TPU needed).
  # Its tests fail without it; MING_NO_LIBTPU=1 skips installing it (and those tests then skip, saying so).
  if [ "${MING_NO_LIBTPU:-0}" != "1" ]; then
    _jax="$(python -c 'import jax; print(jax.__version__)')"
    python -m pip install -q "jax[tpu]==${_jax}"
  fi
elif [ "${1:-}" = "tpu" ]; then
  # A Cloud TPU VM: the package and libtpu for the installed jax (docs/training.md's launch recipe).
  _locked python -m pip install -q -e "$_repo"
  _jax="$(python -c 'import jax; print(jax.__version__)')"
  python -m pip install -q "jax[tpu]==${_jax}"
else
  _locked python -m pip install -q -e "$_repo"
fi
