"""The serving backends: a name (`--backend`) for each engine, and the default for this machine.

    backend = make_backend("mlx").load("runs/base/final")
    backend.generate(["Who lived longer, Tesla or Milankovic?"], num_beams=4)
    # -> ["Nikola Tesla lifespan|Milutin Milankovic lifespan"]

The engines themselves (reformulation.engine's contract) live in their packages: mlx_t5/engine.py,
onnx_t5/engine.py, torch_t5/engine.py. `import serving.backends` imports none of them; make_backend
imports the one it makes.
"""

import importlib
import platform
import sys
from importlib.util import find_spec

from reformulation.engine import Engine, EngineError

# name -> (module, class, constructor arguments, the pip extra its framework comes with)
_REGISTRY = {
    "mlx": ("mlx_t5.engine", "MLXEngine", {}, "mlx"),
    "onnx": ("onnx_t5.engine", "OnnxEngine", {}, "serve"),
    "torch-int8": ("torch_t5.engine", "TorchEngine", {"quantize": True}, "torch"),
    "torch": ("torch_t5.engine", "TorchEngine", {}, "torch"),
}
BACKENDS = tuple(_REGISTRY)

__all__ = ["BACKENDS", "Engine", "EngineError", "add_model_args", "default_backend", "make_backend"]


def make_backend(name: str) -> Engine:
    """A new, unloaded engine: "mlx", "onnx" (ONNX Runtime int8, CPU), "torch-int8" (dynamic int8, CPU) or
    "torch" (float). Its module is imported here, on the caller's thread: mlx_t5 preloads OpenBLAS on
    import, and doing that on a short-lived thread can abort the process at exit."""
    if name not in _REGISTRY:
        raise EngineError(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
    module, cls, kwargs, extra = _REGISTRY[name]
    try:
        engine = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise EngineError(f"the {name} backend needs {err.name or err}: pip install -e '.[{extra}]'") from None
    return engine(**kwargs)


def default_backend() -> str:
    """The fastest backend here: MLX on Apple Silicon (Metal), torch on CUDA, ONNX Runtime int8 on other CPUs
    (torch dynamic int8 where onnxruntime is not installed)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    has_torch = find_spec("torch") is not None
    if has_torch:
        from torch_t5 import default_device

        if default_device() == "cuda":
            return "torch"  # the int8 kernels of onnx / torch-int8 are CPU ones; on CUDA float matmuls win
    # Linux x86 CPU, flan-t5-small shape, 24-token query -> 30 tokens, 1 thread (bench/latency_bench.py,
    # BENCHMARKS.md "Serving"): onnx int8 80 ms, torch-int8 188 ms, MLX fp32 + OpenBLAS 622 ms, torch fp32
    # generate 740 ms. Each token reads the decoder and the 32128 x 512 head: 38 MB of int8 weights; MLX's CPU
    # quantized matmul is slower than its fp32 one there.
    if find_spec("onnxruntime") is None:
        return "torch-int8" if has_torch else "mlx"
    return "onnx"


def add_model_args(parser) -> None:
    """The model flags chat and the API share: --model, --backend, --dtype."""
    parser.add_argument("--model", required=True, help="model folder (HF layout, int8 or adapter) or hub id")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="inference backend (default: mlx on Apple Silicon, torch on CUDA, onnx on other "
                             "CPUs: the fastest measured, see docs/serving.md)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights dtype (default: as saved)")
