"""Affine group quantization of an MLX T5 model (weights only, mlx-lm style).

    python -m mlx_t5.quantize --model runs/base/final --bits 4 --group-size 64 --out runs/base/q4

Every nn.Linear and nn.Embedding whose rows split into whole groups becomes its quantized twin; the
relative-position bias tables ((32, heads): too small to group, and every score depends on them) stay
in float. The tied v1.0 head goes through `shared.as_linear`, so it runs on the quantized embedding.
The config records {"group_size", "bits"}; `mlx_t5.load` re-quantizes exactly the saved `.scales` paths.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reformulation.constants import GROUP_SIZE

from .model import Model

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def _quantizable(group_size: int):
    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized") or "relative_attention_bias" in path:
            return False
        return module.weight.shape[-1] % group_size == 0

    return predicate


def quantize_model(model: Model, bits: int = 8, group_size: int = GROUP_SIZE) -> Model:
    """Quantize `model` in place (and return it); `model.args.quantization` records the settings.

    Args:
        model: an unquantized mlx_t5 Model (fuse LoRA adapters first: QLoRA adapters go on top).
        bits: 2, 3, 4, 5, 6 or 8 bits per weight.
        group_size: 32, 64 or 128 weights share one scale and bias.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} not supported (choose {', '.join(map(str, BITS))})")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} not supported (choose {', '.join(map(str, GROUP_SIZES))})")
    if is_quantized(model):
        raise ValueError("model is already quantized; quantize its float checkpoint instead")
    wrapped = [p for p, m in model.named_modules() if hasattr(m, "lora_a")]
    if wrapped:
        raise ValueError(f"model has LoRA layers ({wrapped[0]}, ...): fuse the adapters first")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_quantizable(group_size))
    model.args.quantization = {"group_size": group_size, "bits": bits}
    mx.eval(model.parameters())
    return model


def dequantize_model(model: Model) -> Model:
    """Replace every quantized layer by its float twin (weights dequantized); return the model."""
    if not is_quantized(model):
        return model
    from mlx_lm.utils import dequantize_model as _dequantize  # imports transformers: only when needed

    model = _dequantize(model)
    model.args.quantization = None
    mx.eval(model.parameters())
    return model


def nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def main(argv=None) -> int:
    from rich.console import Console

    from .utils import LoadError, load_model, load_tokenizer, save

    parser = argparse.ArgumentParser(prog="python -m mlx_t5.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLX or HF checkpoint folder (float weights)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--bits", type=int, default=8, choices=BITS, help="bits per weight (default 8)")
    parser.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                        help="weights per scale/bias group (default 64)")
    args = parser.parse_args(argv)

    console, err = Console(), Console(stderr=True)
    try:
        model_path = Path(args.model)
        if not model_path.is_dir():
            raise LoadError(f"{model_path}: no such folder")
        with console.status(f"loading {model_path}"):
            model = load_model(model_path)
            try:
                tokenizer = load_tokenizer(model_path)
            except LoadError:
                tokenizer = None
        before = nbytes(model)
        with console.status(f"quantizing to {args.bits} bits, groups of {args.group_size}"):
            quantize_model(model, bits=args.bits, group_size=args.group_size)
            save(model, tokenizer, args.out)
        n = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        console.print(f"[green]wrote[/] {args.out}: {n} layers in {args.bits}-bit, "
                      f"{before / 2**20:,.1f} MiB -> {nbytes(model) / 2**20:,.1f} MiB")
        if tokenizer is None:
            err.print(f"[yellow]warning:[/] {model_path} has no tokenizer; {args.out} has none either")
    except (LoadError, ValueError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
