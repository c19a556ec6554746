"""Checkpoint converters: HF <-> MLX, MLX LoRA adapters <-> PEFT, adapter fusing, GGUF for llama.cpp, ONNX.

Run `python -m convert --help` (or `t5r-convert --help`); docs/convert.md documents every subcommand. The
functions behind them:

    from convert.checkpoints import hf_to_mlx, mlx_to_hf, load_checkpoint
    from convert.adapters import mlx_to_peft, peft_to_mlx, fuse
    from convert.gguf_export import to_gguf
    from onnx_t5.export import export                  # to-onnx: needs torch and onnx, not MLX

Importing this package imports no framework: each converter module imports its own (the MLX ones import
mlx_t5 first, which preloads OpenBLAS before mlx).
"""

from .errors import ConvertError

__all__ = ["ConvertError"]
