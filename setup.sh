#!/usr/bin/env bash
# One-time setup: a fresh .venv holding the project (editable) and every extra this platform can use.
#   bash setup.sh            # macOS (Apple Silicon) or Linux
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [[ "$(uname -s)" == Linux ]] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  # MLX's Linux wheel links netlib's reference BLAS; mlx_t5 preloads the system OpenBLAS instead (~40x faster
  # matmuls). Debian/Ubuntu build it DYNAMIC_ARCH: it picks kernels for this CPU at run time (x86-64, arm64).
  echo "setup: installing libopenblas0-pthread (a fast BLAS for MLX that runs on any CPU)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  if command -v apt-get >/dev/null; then
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null; } \
      || echo "setup: warning: could not install libopenblas0-pthread; MLX falls back to its slow reference BLAS" >&2
  else
    echo "setup: warning: no apt-get; install your distribution's OpenBLAS (e.g. dnf install openblas-pthreads)" >&2
  fi
fi

if [[ "$(uname -s)" == Linux ]] && ! { command -v chromedriver && { command -v chromium || command -v chromium-browser; }; } \
    >/dev/null 2>&1; then
  # tests/test_web.py uses the web page in a headless Chromium through its chromedriver (skipped without them)
  echo "setup: installing chromium and chromium-driver (the web page's browser test)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  if command -v apt-get >/dev/null; then
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "setup: warning: could not install chromium; tests/test_web.py will be skipped" >&2
  else
    echo "setup: warning: no apt-get; install Chromium and its chromedriver, or tests/test_web.py is skipped" >&2
  fi
fi

"$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
# Pinned first: an unpinned torch on Linux pulls several GB of CUDA wheels; 2.13.0 satisfies every extra.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[mlx,torch,convert,serve,dev]"
.venv/bin/python -c "import mlx_t5; s = mlx_t5.blas.STATE; print('setup: done; MLX BLAS:', s.config or 'platform default')"
