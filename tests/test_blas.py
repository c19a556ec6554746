"""On Linux, importing mlx_t5 puts a fast BLAS under MLX, and only one that runs on every CPU of its architecture.

A BLAS built for one target (cmeel-openblas 0.3.31: SKYLAKEX, AVX-512) crashed every MLX matmul with SIGILL on
AVX2-only CPUs. These tests fail if such a library is loaded again, and check that one built for instructions
the CPU lacks is refused before it is ever mapped into the process.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_t5 import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS preload is Linux-only")
ROOT = Path(__file__).resolve().parents[1]

# One matmul, one training step and one generation on a tiny random model: the numbers the kernels produce.
WORKLOAD = """
import json, mlx_t5
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_t5 import blas, loss_fn
from mlx_t5.init import init_model
mx.random.seed(0)
a, b = mx.random.normal((96, 200)), mx.random.normal((200, 80))
matmul = (a @ b).tolist()
model = init_model(dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0), seed=0)
ids = mx.array([[5, 9, 12, 30, 1], [7, 8, 1, 0, 0]]); mask = (ids != 0).astype(mx.int32); mask[1, 2] = 1
dec = mx.array([[0, 4, 6, 2], [0, 3, 1, 0]]); labels = mx.array([[4, 6, 2, 1], [3, 1, -100, -100]])
(loss, _), grads = nn.value_and_grad(model, loss_fn)(model, ids, mask, dec, labels)
optim.SGD(learning_rate=0.5).update(model, grads); mx.eval(model.parameters())  # continuous in the gradient
weights = [x for _, v in tree_flatten(model.parameters()) for x in v.flatten().tolist()]
tokens = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8)
print(json.dumps(dict(config=blas.STATE.config, core=blas.STATE.corename, path=blas.STATE.path,
                      matmul=matmul, loss=loss.item(), weights=weights, tokens=tokens)))
"""


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_loaded_openblas_picks_kernels_at_run_time_and_is_what_mlx_calls():
    out = _run(WORKLOAD + "\nprint(open('/proc/self/maps').read().count(blas.STATE.path))")
    result, mapped = json.loads(out.stdout.splitlines()[-2]), int(out.stdout.splitlines()[-1])
    assert result["path"], f"no OpenBLAS loaded: {blas.STATE.refused} (setup.sh installs libopenblas0-pthread)"
    # a fixed-target build (e.g. "... SKYLAKEX MAX_THREADS=4") runs only on CPUs like the one it was built for
    assert "DYNAMIC_ARCH" in result["config"].split(), result["config"]
    assert mapped > 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="OPENBLAS_CORETYPE=Haswell names an x86-64 target")
def test_avx2_kernels_give_the_same_matmul_training_step_and_generation():
    """OPENBLAS_CORETYPE=Haswell makes a DYNAMIC_ARCH build use its AVX2 kernels: what an AVX2-only CPU runs."""
    here = json.loads(_run(WORKLOAD).stdout.splitlines()[-1])
    haswell = json.loads(_run(WORKLOAD, OPENBLAS_CORETYPE="Haswell").stdout.splitlines()[-1])
    assert haswell["core"].lower() == "haswell", haswell["core"]
    assert haswell["tokens"] == here["tokens"]
    assert haswell["loss"] == pytest.approx(here["loss"], rel=1e-5)
    assert haswell["weights"] == pytest.approx(here["weights"], rel=1e-4, abs=1e-6)
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(haswell["matmul"]) == pytest.approx(flat(here["matmul"]), rel=1e-4, abs=1e-4)


SKYLAKEX = "OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4"
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "bmi2"}  # what an AMD EPYC Zen 3 reports, AVX-512 left out
ZEN4 = ZEN3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"}


@pytest.mark.parametrize("config, core, flags, ok", [
    (SKYLAKEX, "SKYLAKEX", ZEN3, False),
    (SKYLAKEX, "SKYLAKEX", ZEN4, True),
    ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64", "Zen", ZEN3, True),
    ("OpenBLAS 0.3.26 HASWELL MAX_THREADS=64", "Haswell", {"sse4_2", "avx"}, False),
    ("OpenBLAS 0.3.26 SAPPHIRERAPIDS MAX_THREADS=64", "SAPPHIRERAPIDS", ZEN4, False),
    ("OpenBLAS 0.3.26 NEOVERSEV1 MAX_THREADS=64", "NEOVERSEV1", {"fp", "asimd"}, False),
    ("OpenBLAS 0.3.26 ARMV8 MAX_THREADS=64", "ARMV8", {"fp", "asimd"}, True),
    ("OpenBLAS 0.3.26 SOMEFUTURECORE MAX_THREADS=64", "SOMEFUTURECORE", ZEN4, False),
])
def test_a_fixed_target_library_runs_only_where_the_cpu_has_its_instructions(config, core, flags, ok):
    why = blas.runs_here(config, core, flags)
    assert (why is None) == ok, why
    if core == "SKYLAKEX" and not ok:
        assert "SKYLAKEX" in why and "avx512f" in why


def _skylakex_library() -> Path:
    for entry in sys.path:
        path = Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if path.is_file():
            return path
    pytest.skip("cmeel-openblas (the dev extra's SKYLAKEX-only OpenBLAS, x86-64 Linux) is not installed")


def test_a_library_built_for_instructions_the_cpu_lacks_is_refused_with_a_warning_and_never_mapped():
    """blas.py as a fresh module (so no BLAS is loaded yet), asked to load the SKYLAKEX-only library on a
    CPU whose flags are this one's without AVX-512: one warning naming it and what is missing; the system's
    DYNAMIC_ARCH library is loaded instead; the refused file never enters the process."""
    library = _skylakex_library()
    code = f"""
import importlib.util, sys, warnings
spec = importlib.util.spec_from_file_location("fresh_blas", {str(ROOT / "mlx_t5" / "blas.py")!r})
b = importlib.util.module_from_spec(spec); sys.modules["fresh_blas"] = b; spec.loader.exec_module(b)
flags = {{f for f in b.cpu_flags() if not f.startswith("avx512")}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = b.load(flags)
print(len(caught)); print(caught[0].message if caught else "")
print(state.path); print({str(library)!r} in open("/proc/self/maps").read())
"""
    count, message, loaded, mapped = _run(code, MLX_T5_OPENBLAS=str(library)).stdout.splitlines()
    assert count == "1"
    assert str(library) in message and "SKYLAKEX" in message and "lacks avx512" in message
    assert mapped == "False"
    assert loaded != str(library)


def test_without_a_usable_openblas_mlx_keeps_its_reference_blas_and_the_warning_says_how_to_fix_it():
    code = f"""
import importlib.util, sys, warnings
spec = importlib.util.spec_from_file_location("fresh_blas", {str(ROOT / "mlx_t5" / "blas.py")!r})
b = importlib.util.module_from_spec(spec); sys.modules["fresh_blas"] = b; spec.loader.exec_module(b)
b.SYSTEM_OPENBLAS = "libopenblas-not-installed.so.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = b.load()
import mlx.core as mx
a = mx.ones((8, 8))
print((a @ a)[0, 0].item()); print(state.path); print(len(caught)); print(caught[0].message)
"""
    value, loaded, count, message = _run(code).stdout.splitlines()
    assert (value, loaded, count) == ("8.0", "None", "1")
    assert "reference BLAS" in message and "apt-get install libopenblas0-pthread" in message


def test_importing_mlx_first_warns_instead_of_silently_staying_slow():
    code = "import mlx.core, warnings\nwarnings.simplefilter('error')\nimport mlx_t5"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "slow reference BLAS" in out.stderr


def test_info_names_the_blas_in_use_the_cpu_flags_and_the_versions():
    out = subprocess.run([sys.executable, "-m", "mlx_t5.info", "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    info = json.loads(out.stdout)
    assert info["blas"]["config"] == blas.STATE.config and info["blas"]["threads"] >= 1
    assert info["blas"]["core"] and info["blas"]["core"] in info["blas"]["config"]
    if platform.machine() == "x86_64":
        assert set(info["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni"}
    assert all(info["versions"][name] != "not installed" for name in ("mlx", "torch", "onnxruntime"))
    text = subprocess.run([sys.executable, "-m", "mlx_t5.info"], capture_output=True, text=True, cwd=ROOT).stdout
    assert f"config: {blas.STATE.config}" in text
