"""Load and save T5 checkpoints in the Hugging Face layout (a checkpoint is a checkpoint)."""

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reformulation.constants import decoder_output_scale
from reformulation.io import atomic_dir, read_json_object

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
    """config.json of a T5 checkpoint folder."""
    path = Path(model_path) / "config.json"
    config = read_json_object(path, "a model folder", LoadError)
    if config.get("model_type", "t5") not in ("t5", "mt5"):
        raise LoadError(f"{path}: model_type {config['model_type']!r} is not a T5 model")
    return config


def model_args(model_path: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(load_config(model_path))
    except (TypeError, ValueError) as err:
        raise LoadError(f"{Path(model_path) / 'config.json'}: {err}") from None


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as err:  # mlx raises RuntimeError/ValueError on truncated or foreign files
        raise LoadError(f"{path}: not a readable safetensors file ({err})") from None


def _load_torch_bin(path: Path) -> dict[str, mx.array]:
    import torch  # only this legacy format needs torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoadError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    dtypes = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}
    # numpy has no bfloat16: go through float32 (exact for bf16 / fp16) and cast back
    return {k: mx.array(v.float().numpy()).astype(dtypes.get(v.dtype, mx.float32)) for k, v in state.items()}


def _shards(folder: Path, index_name: str) -> Optional[list[Path]]:
    index = folder / index_name
    if not index.is_file():
        return None
    try:
        names = sorted(set(read_json_object(index, "a sharded checkpoint", LoadError)["weight_map"].values()))
    except (KeyError, AttributeError) as err:
        raise LoadError(f"{index}: not a weight index ({type(err).__name__}: {err})") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise LoadError(f"{index}: shard files missing: {', '.join(missing)}")
    return [folder / n for n in names]


def load_weights_file(model_path: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder: model.safetensors, sharded safetensors, or pytorch_model.bin
    (also sharded; read with weights_only)."""
    folder = Path(model_path)
    files = _shards(folder, "model.safetensors.index.json") or sorted(folder.glob("model*.safetensors"))
    loader = _load_safetensors
    if not files:
        files = _shards(folder, "pytorch_model.bin.index.json") or sorted(folder.glob("pytorch_model*.bin"))
        loader = _load_torch_bin
    if not files:
        raise LoadError(f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin")
    weights = {}
    for f in files:
        weights.update(loader(f))
    return weights


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
    """The model of an HF-layout folder (quantized ones stay quantized), every tensor checked against config.json."""
    args = model_args(model_path)
    model = Model(args)
    raw = load_weights_file(model_path)
    head, shared = raw.get("lm_head.weight"), raw.get("shared.weight")
    if args.tie_word_embeddings and head is not None and shared is not None and \
            not (head.shape == shared.shape and mx.array_equal(head, shared).item()):
        # sanitize would drop it: refuse rather than silently swap the head for the embedding
        raise LoadError(f"{Path(model_path) / 'config.json'}: tie_word_embeddings is true but the checkpoint has "
                        f"its own lm_head.weight; set \"tie_word_embeddings\": false")
    weights = model.sanitize(raw)
    q = args.quantization
    if q:  # re-apply exactly where the checkpoint has quantized tensors
        if not isinstance(q, dict) or not {"group_size", "bits"} <= set(q):
            raise LoadError(f"{Path(model_path) / 'config.json'}: quantization must be {{'group_size', 'bits'}}, "
                            f"got {q!r}")
        try:
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                        class_predicate=lambda p, m: f"{p}.scales" in weights)
        except ValueError as err:  # e.g. .scales on a layer whose width does not split into groups
            raise LoadError(f"{model_path}: quantized tensors do not fit {q}: {err}") from None
    try:
        check_weights(model, weights)
    except LoadError as err:
        raise LoadError(f"{model_path}: {err}") from None
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
                  scale_decoder_outputs=decoder_output_scale(args) is not None)  # what transformers 5 reads
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
