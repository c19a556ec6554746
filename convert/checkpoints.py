"""HF <-> MLX checkpoints. Both sides use the HF layout and parameter names, so converting is reading,
checking every tensor against config.json, optionally casting / quantizing / dequantizing, and writing.

A float checkpoint goes HF -> MLX -> HF bit-exactly: tensors are never round-tripped through another dtype.
"""

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import mlx_t5  # noqa: I001  (first: it preloads OpenBLAS before mlx is imported)
from mlx_t5.quantize import dequantize_model, quantize_model
from mlx_t5.utils import DTYPES, load_config, load_model
from mlx_t5.utils import model_args as mlx_model_args
from reformulation.constants import GROUP_SIZE
from reformulation.speculative import DRAFTS_FILE

from .errors import ConvertError

# Copied verbatim next to the weights: no tokenizer-library round trip can change them.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
              "added_tokens.json", "generation_config.json", DRAFTS_FILE)  # drafts: speculative decoding's phrasebook

PathLike = Union[str, Path]


@contextmanager
def _convert_errors():
    """mlx_t5's LoadError (naming the file and what is wrong) as a ConvertError."""
    try:
        yield
    except mlx_t5.LoadError as err:
        raise ConvertError(str(err)) from None


def _folder(folder: PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: no such folder")
    return folder


def read_config(folder: PathLike) -> dict:
    with _convert_errors():
        return load_config(_folder(folder))


def model_args(folder: PathLike) -> mlx_t5.ModelArgs:
    with _convert_errors():
        return mlx_model_args(_folder(folder))


def load_checkpoint(folder: PathLike) -> mlx_t5.Model:
    """An mlx_t5 Model from an HF or MLX checkpoint folder (quantized ones stay quantized); no tokenizer needed."""
    with _convert_errors():
        return load_model(_folder(folder))


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
              group_size: int = GROUP_SIZE) -> mlx_t5.Model:
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
