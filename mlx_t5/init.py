"""Random initialisation of a T5 model: the Flan-T5 shapes, T5's init scheme (transformers' `_init_weights`)."""

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .model import Model, ModelArgs

# Flan-T5 (T5 v1.1) architecture; the sizes differ only in width and depth.
_FLAN = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
             layer_norm_epsilon=1e-6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SHAPES = {
    "small": dict(_FLAN, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "base": dict(_FLAN, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "large": dict(_FLAN, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
}


def model_args(shape: Union[str, Path, dict]) -> ModelArgs:
    """ModelArgs for "small" | "base" | "large", a T5 config.json path, or a config dict."""
    if isinstance(shape, dict):
        return ModelArgs.from_dict(shape)
    if str(shape) in SHAPES:
        return ModelArgs.from_dict(SHAPES[str(shape)])
    path = Path(shape)
    if path.suffix != ".json":
        raise ValueError(f"init shape must be one of {', '.join(SHAPES)} or a config.json path, got {shape!r}")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"init config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of T5 config keys")
    return ModelArgs.from_dict(config)


def _std(name: str, args: ModelArgs, factor: float) -> float:
    """The normal std transformers' T5PreTrainedModel._init_weights gives the parameter `name`."""
    leaf = name.rsplit(".", 2)[-2]  # module name: q, k, wi_0, layer_norm, relative_attention_bias, ...
    if name in ("shared.weight", "lm_head.weight"):
        return factor * 1.0
    if leaf == "q":
        return factor * (args.d_model * args.d_kv) ** -0.5
    if leaf in ("k", "v", "wi", "wi_0", "wi_1", "relative_attention_bias"):
        return factor * args.d_model ** -0.5
    if leaf == "o":
        return factor * (args.num_heads * args.d_kv) ** -0.5
    if leaf == "wo":
        return factor * args.d_ff ** -0.5
    raise ValueError(f"no init rule for parameter {name}")


def init_model(shape: Union[str, Path, dict] = "small", seed: int = 0, vocab_size: Optional[int] = None) -> Model:
    """A randomly initialised T5 model.

    Args:
        shape: "small", "base", "large" (the Flan-T5 shapes: gated-gelu, untied head, vocab 32128),
            a T5 config.json path, or a config dict.
        seed: the same seed gives the same weights, whatever the global MLX random state.
        vocab_size: embedding rows, overriding the shape's (a task tokenizer's size).

    Returns:
        A float32 `Model` in train mode: embeddings and head ~ N(0, 1), attention and FFN weights
        scaled by fan-in as in transformers (q by (d_model * d_kv)^-0.5), RMS-norm weights 1.
    """
    args = model_args(shape)
    if vocab_size is not None:
        args = dataclasses.replace(args, vocab_size=vocab_size)
    factor = float(args.extra.get("initializer_factor", 1.0))
    model = Model(args)
    params = sorted(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = []
    for (name, value), key in zip(params, keys):
        if name.endswith("layer_norm.weight"):
            weights.append((name, mx.full(value.shape, factor, dtype=mx.float32)))
        else:
            weights.append((name, _std(name, args, factor) * mx.random.normal(value.shape, key=key)))
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model
