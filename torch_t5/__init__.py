"""T5 / Flan-T5 in PyTorch: fine-tuning on CUDA GPUs (Colab), int8 CPU serving, the torch backend.

    from torch_t5 import load, generate
    model, tokenizer = load("runs/base/final")        # HF folder, hub id, PEFT adapter or int8 folder
    generate(model, tokenizer, ["Who lived longer, Nikola Tesla or Milutin Milankovic?"])

Training: ``python -m torch_t5.train``; int8 for CPU serving: ``python -m torch_t5.quantize``.
"""

import importlib

from .infer import InferError, default_device, generate, load

# quantize is imported on first use: `python -m torch_t5.quantize` must find it not yet imported
_LAZY = {"Int8Linear": "quantize", "QuantizeError": "quantize", "load_int8": "quantize", "quantize_checkpoint": "quantize",
         "quantize_model": "quantize"}
__all__ = ["InferError", "default_device", "generate", "load", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'torch_t5' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value
