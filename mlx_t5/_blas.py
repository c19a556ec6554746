"""Give MLX a fast BLAS on Linux before anything imports it.

The Linux `mlx[cpu]` wheel links netlib's reference BLAS (~8 GFLOP/s on our 2-core CI boxes).
Loading OpenBLAS (from the `cmeel-openblas` wheel) with RTLD_GLOBAL before `mlx.core` is first
imported makes the dynamic linker resolve MLX's `cblas_*` calls to it (~200 GFLOP/s). This
module is imported first by `mlx_t5/__init__.py`, the one door every entry point goes through.
"""

import ctypes
import os
import sys
import warnings
from pathlib import Path

LOADED: str | None = None


def _candidates():
    if env := os.environ.get("MLX_T5_OPENBLAS"):
        yield Path(env)
    for entry in sys.path:
        yield Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0"


def load_openblas() -> str | None:
    """Preload OpenBLAS globally on Linux; return its path, or None where not needed/available."""
    global LOADED
    if LOADED or not sys.platform.startswith("linux") or os.environ.get("MLX_T5_NO_OPENBLAS"):
        return LOADED
    if "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before mlx_t5: MLX keeps its slow reference BLAS")
        return None
    for path in _candidates():
        if not path.is_file():
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:  # typically libgfortran.so.5 missing: `apt-get install libgfortran5`
            warnings.warn(f"could not load OpenBLAS from {path} ({err}); MLX matmuls will be slow. "
                          "On Debian/Ubuntu: apt-get install libgfortran5")
            return None
        LOADED = str(path)
        return LOADED
    return None


load_openblas()
