"""Checkpoint converters: HF <-> MLX, MLX LoRA adapters <-> PEFT, adapter fusing, GGUF for llama.cpp.

Run `python -m convert --help`; docs/convert.md documents every subcommand. The functions behind them:

    from convert.checkpoints import hf_to_mlx, mlx_to_hf, load_checkpoint
    from convert.adapters import mlx_to_peft, peft_to_mlx, fuse
    from convert.gguf_export import to_gguf
"""

import mlx_t5  # noqa: F401  (preloads OpenBLAS before any submodule imports mlx)

from .errors import ConvertError

__all__ = ["ConvertError"]
