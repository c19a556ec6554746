"""On Linux, importing mlx_t5 must put OpenBLAS under MLX (the mlx[cpu] wheel links reference BLAS)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only")

PROBE = """
import mlx_t5, mlx_t5._blas as b
import mlx.core as mx
a = mx.ones((64, 64)); mx.eval(a @ a)
maps = open("/proc/self/maps").read()
print(b.LOADED)
print("openblas-mapped" if "libopenblas" in maps else "openblas-missing")
"""


def test_openblas_is_mapped_after_importing_mlx_t5():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    loaded, mapped = out.stdout.split()
    assert loaded.endswith("libopenblas.so.0"), out.stderr
    assert mapped == "openblas-mapped"


def test_importing_mlx_first_warns_instead_of_silently_staying_slow():
    code = "import mlx.core, warnings\nwarnings.simplefilter('error')\nimport mlx_t5"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "slow reference BLAS" in out.stderr
