"""T5 / Flan-T5 in MLX: model, checkpoints, generation, fine-tuning, quantization."""

from . import _blas  # noqa: F401  (must run before the first `import mlx`)
from .model import KVCache, Model, ModelArgs, loss_fn  # noqa: E402
from .utils import LoadError, load, save  # noqa: E402

__all__ = ["KVCache", "LoadError", "Model", "ModelArgs", "load", "loss_fn", "save"]
