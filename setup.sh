#!/usr/bin/env bash
# One-time setup: a fresh .venv holding the project (editable) and every extra this platform can use.
#   bash setup.sh            # macOS (Apple Silicon) or Linux
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [[ "$(uname -s)" == Linux ]] && ! ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5'; then
  # The OpenBLAS that mlx_t5 preloads for MLX (pip cmeel-openblas) links libgfortran.
  echo "setup: installing libgfortran5 (needed by OpenBLAS, which makes MLX's CPU matmuls ~25x faster)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgfortran5 >/dev/null; } \
    || echo "setup: warning: could not install libgfortran5; MLX falls back to its slow reference BLAS" >&2
fi

"$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
# Pinned first: an unpinned torch on Linux pulls several GB of CUDA wheels; 2.13.0 satisfies every extra.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[mlx,torch,convert,serve,dev]"
.venv/bin/python -c "import mlx_t5._blas as b; print('setup: done; MLX BLAS:', b.LOADED or 'platform default')"
