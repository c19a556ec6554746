"""T5 on ONNX Runtime: the CPU serving engine (int8 weights, one graph per decoder step).

    python -m convert to-onnx --model runs/base/final --out runs/base/onnx   # export (torch and onnx, not MLX)
    from onnx_t5 import load                                                  # run (onnxruntime only)
"""

from .runtime import OnnxLoadError, OnnxT5, is_onnx_folder, load

__all__ = ["OnnxT5", "OnnxLoadError", "is_onnx_folder", "load"]
