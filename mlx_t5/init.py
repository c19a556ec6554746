"""Random initialisation of a T5 model: the Flan-T5 shapes, T5's init scheme (transformers' `_init_weights`)."""

import dataclasses
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from reformulation.constants import FLAN_T5_SHAPES
from reformulation.io import read_json_object

from .model import Model, ModelArgs

SHAPES = FLAN_T5_SHAPES  # "small" | "base" | "large"


def model_args(shape: Union[str, Path, dict]) -> ModelArgs:
    """ModelArgs for "small" | "base" | "large", a T5 config.json path, or a config dict."""
    if isinstance(shape, dict):
        return ModelArgs.from_dict(shape)
    if str(shape) in SHAPES:
        return ModelArgs.from_dict(SHAPES[str(shape)])
    if Path(shape).suffix != ".json":
        raise ValueError(f"init shape must be one of {', '.join(SHAPES)} or a config.json path, got {shape!r}")
    return ModelArgs.from_dict(read_json_object(shape, "an init config folder"))


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
