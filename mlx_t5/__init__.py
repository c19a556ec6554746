"""T5 / Flan-T5 in MLX: model, checkpoints, generation, fine-tuning, quantization."""

from . import blas

blas.load()  # before the first `import mlx`: MLX's cblas_* calls must resolve to a fast BLAS that runs here

from .generation import generate, generate_tokens, stream_generate  # noqa: E402
from .model import KVCache, Model, ModelArgs, loss_fn  # noqa: E402
from .utils import LoadError, check_weights, load, save  # noqa: E402

__all__ = ["KVCache", "LoadError", "Model", "ModelArgs", "check_weights", "generate", "generate_tokens", "load",
           "loss_fn", "save", "stream_generate"]
