"""HF <-> MLX checkpoints. Both sides use the HF layout and parameter names, so converting is reading,
checking every tensor against config.json, optionally casting / quantizing / dequantizing, and writing.

A float checkpoint goes HF -> MLX -> HF bit-exactly: tensors are never round-tripped through another dtype.
"""

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx_t5  # noqa: I001  (first: it preloads OpenBLAS before mlx is imported)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_t5.quantize import dequantize_model, quantize_model
from reformulation.io import read_json_object

from .errors import ConvertError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# Copied verbatim next to the weights: no tokenizer-library round trip can change them.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
              "added_tokens.json", "generation_config.json")

PathLike = Union[str, Path]


def read_config(folder: PathLike) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: no such folder")
    path = folder / "config.json"
    config = read_json_object(path, "a model folder", ConvertError)
    if config.get("model_type", "t5") not in ("t5", "mt5"):
        raise ConvertError(f"{path}: model_type {config['model_type']!r} is not a T5 model")
    return config


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on truncated or foreign files
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None


def _load_torch_bin(path: Path) -> dict[str, mx.array]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    dtypes = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}
    # numpy has no bfloat16: go through float32 (exact for bf16 / fp16) and cast back
    return {k: mx.array(v.float().numpy()).astype(dtypes.get(v.dtype, mx.float32)) for k, v in state.items()}


def _shards(folder: Path, index_name: str) -> Optional[list[Path]]:
    index = folder / index_name
    if not index.is_file():
        return None
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ConvertError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConvertError(f"{index}: shard files missing: {', '.join(missing)}")
    return [folder / n for n in names]


def read_weights(folder: PathLike) -> dict[str, mx.array]:
    """Every tensor of a checkpoint folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    folder = Path(folder)
    files = _shards(folder, "model.safetensors.index.json") or sorted(folder.glob("model*.safetensors"))
    loader = _load_safetensors
    if not files:
        files = _shards(folder, "pytorch_model.bin.index.json") or sorted(folder.glob("pytorch_model*.bin"))
        loader = _load_torch_bin
    if not files:
        raise ConvertError(f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin")
    weights = {}
    for f in files:
        weights.update(loader(f))
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str):
    """mlx_t5's one-message check of unknown, missing and wrongly shaped tensors, as a ConvertError."""
    try:
        mlx_t5.check_weights(model, weights)
    except mlx_t5.LoadError as err:
        raise ConvertError(f"{where}: {err}") from None


def model_args(folder: PathLike) -> mlx_t5.ModelArgs:
    folder = Path(folder)
    try:
        return mlx_t5.ModelArgs.from_dict(read_config(folder))
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{folder / 'config.json'}: {e}") from None


def load_checkpoint(folder: PathLike) -> mlx_t5.Model:
    """An mlx_t5 Model from an HF or MLX checkpoint folder (quantized ones stay quantized); no tokenizer needed."""
    folder = Path(folder)
    args = model_args(folder)
    model = mlx_t5.Model(args)
    raw = read_weights(folder)
    head = raw.get("lm_head.weight")
    if args.tie_word_embeddings and head is not None and "shared.weight" in raw and \
            not (head.shape == raw["shared.weight"].shape and mx.array_equal(head, raw["shared.weight"]).item()):
        # sanitize would drop it: refuse rather than silently swap the head for the embedding
        raise ConvertError(f"{folder / 'config.json'}: tie_word_embeddings is true but the checkpoint has its own "
                           f"lm_head.weight; set \"tie_word_embeddings\": false")
    weights = model.sanitize(raw)
    if args.quantization:
        q = args.quantization
        if not isinstance(q, dict) or not {"group_size", "bits"} <= set(q):
            raise ConvertError(f"{folder / 'config.json'}: quantization must be {{'group_size', 'bits'}}, got {q!r}")
        try:
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                        class_predicate=lambda path, _: f"{path}.scales" in weights)
        except ValueError as e:  # e.g. .scales on a layer whose width does not split into groups
            raise ConvertError(f"{folder}: quantized tensors do not fit {q}: {e}") from None
    check_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model.eval()


class SideFiles:
    """Stands in for the tokenizer in `mlx_t5.save`, which calls `save_pretrained(folder)`: copies the
    source folder's tokenizer files and generation_config.json byte for byte."""

    def __init__(self, source: PathLike):
        self.files = [Path(source) / n for n in SIDE_FILES if (Path(source) / n).is_file()]

    def save_pretrained(self, folder: str):
        for f in self.files:
            shutil.copyfile(f, Path(folder) / f.name)


def save_checkpoint(model: mlx_t5.Model, out_dir: PathLike, source: PathLike) -> Path:
    """Write `model` (HF layout, atomically) with the tokenizer files of `source`."""
    if Path(out_dir).resolve() == Path(source).resolve():
        raise ConvertError(f"{out_dir}: output folder is the input folder; choose another --out")
    mlx_t5.save(model, SideFiles(source), out_dir)
    return Path(out_dir)


def hf_to_mlx(hf_dir: PathLike, out_dir: PathLike, dtype: Optional[str] = None, bits: Optional[int] = None,
              group_size: int = 64) -> mlx_t5.Model:
    """HF checkpoint (safetensors or pytorch_model.bin) -> MLX checkpoint folder; returns the written model.

    Args:
        dtype: "float32" or "bfloat16" to cast; None keeps the checkpoint's dtype (bit-exact copy).
        bits, group_size: quantize (8 or 4 bits, ...) after the cast; None writes float weights.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} not supported (choose {', '.join(DTYPES)}; T5 overflows in float16)")
    model = load_checkpoint(hf_dir)
    if dtype is not None:
        if model.args.quantization:
            raise ConvertError(f"{hf_dir}: already quantized; a dtype cast applies to float checkpoints only")
        model.set_dtype(DTYPES[dtype])
    if bits is not None:
        try:
            quantize_model(model, bits=bits, group_size=group_size)
        except ValueError as e:
            raise ConvertError(f"{hf_dir}: {e}") from None
    save_checkpoint(model, out_dir, hf_dir)
    return model


def mlx_to_hf(mlx_dir: PathLike, out_dir: PathLike) -> mlx_t5.Model:
    """MLX checkpoint (quantized ones are dequantized) -> HF folder that transformers loads."""
    model = dequantize_model(load_checkpoint(mlx_dir))
    save_checkpoint(model, out_dir, mlx_dir)
    return model
