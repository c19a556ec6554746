"""T5 / Flan-T5 in PyTorch: fine-tuning on CUDA GPUs (Colab), int8 CPU serving, the torch backend.

    from torch_t5 import load, generate
    model, tokenizer = load("runs/base/final")        # HF folder, hub id, PEFT adapter or int8 folder
    generate(model, tokenizer, ["Who lived longer, Nikola Tesla or Milutin Milankovic?"])

Training: ``python -m torch_t5.train``; int8 for CPU serving: ``python -m torch_t5.quantize``.
"""

from .infer import InferError, default_device, generate, load, stream_generate
from .int8 import Int8Linear, QuantizeError, load_int8, quantize_model

__all__ = ["InferError", "Int8Linear", "QuantizeError", "default_device", "generate", "load", "load_int8",
           "quantize_model", "stream_generate"]
