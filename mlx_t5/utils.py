"""Load and save T5 checkpoints in the Hugging Face layout (a checkpoint is a checkpoint)."""

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reformulation.io import atomic_dir

from .model import Model, ModelArgs

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "tokenizer*", "pytorch_model.bin"]


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says which file or keys are wrong."""


def get_model_path(path_or_hub_id: Union[str, Path]) -> Path:
    """A local folder as is; anything else is fetched (or found in the cache) through huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path} is a file; expected a model folder with config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, bad id: all end here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"{path_or_hub_id!r} is not a local folder and could not be fetched from the Hugging Face "
                        f"Hub ({type(err).__name__}: {reason})") from None


def load_config(model_path: Path) -> dict:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{model_path}: no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{config_file}: invalid JSON ({err})") from None


def load_weights_file(model_path: Path) -> dict[str, mx.array]:
    """model.safetensors, sharded safetensors (with or without index), or pytorch_model.bin (weights_only)."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_path / s for s in shards]
    else:
        files = sorted(model_path.glob("model*.safetensors"))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise LoadError(f"{model_path}: missing weight shards {[f.name for f in missing]}")
    if files:
        weights = {}
        for f in files:
            weights.update(mx.load(str(f)))
        return weights
    bin_file = model_path / "pytorch_model.bin"
    if bin_file.is_file():
        import torch  # only this legacy format needs torch

        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        # via fp32: numpy has no bfloat16; the requested dtype is applied after loading
        return {k: mx.array(v.float().numpy()).astype(_mx_dtype(v.dtype)) for k, v in state.items()}
    raise LoadError(f"{model_path}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def _mx_dtype(torch_dtype) -> mx.Dtype:
    return {"torch.bfloat16": mx.bfloat16, "torch.float16": mx.float16}.get(str(torch_dtype), mx.float32)


def check_weights(model: nn.Module, weights: dict[str, mx.array]):
    """One error listing every missing, unexpected and wrongly shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)} from config.json"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unknown tensors ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
    if problems:
        raise LoadError("checkpoint does not match its config.json: " + " | ".join(problems))


def load_model(model_path: Path, dtype: Optional[str] = None) -> Model:
    config = load_config(model_path)
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as err:
        raise LoadError(f"{model_path / 'config.json'}: {err}") from None
    model = Model(args)
    weights = model.sanitize(load_weights_file(model_path))
    if args.quantization:  # re-apply exactly where the checkpoint has quantized tensors
        nn.quantize(model, group_size=args.quantization["group_size"], bits=args.quantization["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    if dtype is not None:
        if dtype not in DTYPES:
            raise LoadError(f"dtype {dtype!r} not supported (choose {', '.join(DTYPES)}; T5 overflows in fp16)")
        model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(path: Union[str, Path]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise LoadError(f"{path}: could not load a tokenizer ({type(err).__name__}: {err})") from None


def load(path_or_hub_id: Union[str, Path], dtype: Optional[str] = None, tokenizer: Optional[str] = None):
    """Load `(model, tokenizer)` from a local HF-layout folder or a hub id.

    Args:
        path_or_hub_id: folder with config.json + weights (+ tokenizer files), or e.g. "google/flan-t5-small".
        dtype: "float32" or "bfloat16"; None keeps the checkpoint's.
        tokenizer: folder or hub id of the tokenizer when the model folder has none.
    """
    model_path = get_model_path(path_or_hub_id)
    model = load_model(model_path, dtype)
    return model, load_tokenizer(tokenizer or model_path)


def model_config(model: Model) -> dict:
    """config.json for `model`, with tie_word_embeddings written explicitly (transformers 5 ties otherwise)."""
    args = model.args
    config = dict(args.extra)
    config.update({k: v for k, v in vars(args).items() if k not in ("extra", "quantization")})
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
                  is_gated_act=args.is_gated, dense_act_fn=args.activation,
                  scale_decoder_outputs=args.tie_word_embeddings)  # transformers 5 reads this for the v1.0 rescale
    if args.quantization:
        config["quantization"] = args.quantization
    return config


def save(model: Model, tokenizer, path: Union[str, Path], dtype: Optional[str] = None):
    """Write an HF-layout folder atomically: config.json, model.safetensors, tokenizer files."""
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    with atomic_dir(Path(path)) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model_config(model), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
