"""T5 on ONNX Runtime: the CPU serving engine (int8 weights, one graph per decoder step).

    python -m convert to-onnx runs/base/final runs/base/onnx      # export (needs torch)
    from onnx_t5 import load                                       # run (needs onnxruntime only)
"""

from .runtime import OnnxLoadError, OnnxT5, is_onnx_folder, load

__all__ = ["OnnxT5", "OnnxLoadError", "is_onnx_folder", "load"]
