"""python -m convert <subcommand>: checkpoints and adapters between MLX, transformers/PEFT, llama.cpp and ONNX.

    hf-to-mlx         HF checkpoint -> MLX checkpoint (optionally bfloat16 and/or 8/4-bit quantized)
    mlx-to-hf         MLX checkpoint (quantized ones are dequantized) -> HF folder for transformers
    adapters-to-peft  MLX LoRA adapters -> PEFT adapter folder
    peft-to-adapters  PEFT LoRA adapter folder -> MLX LoRA adapters
    fuse              merge MLX or PEFT LoRA adapters into their base checkpoint
    to-gguf           checkpoint -> GGUF file for llama.cpp (f32, f16 or q8_0)
    to-onnx           HF checkpoint -> ONNX Runtime folder (int8 weights) for the onnx serving backend

Every subcommand reads --model (a checkpoint) and/or --adapters (an adapter folder) and writes --out;
`t5r-convert` is the same command once the project is installed. Each subcommand imports only what it
needs: to-onnx runs without MLX.
"""

import argparse
import sys

from .errors import ConvertError


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _folder_size(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def hf_to_mlx(args, console):
    from .checkpoints import hf_to_mlx

    with console.status(f"converting {args.model}"):
        model = hf_to_mlx(args.model, args.out, dtype=args.dtype, bits=args.bits, group_size=args.group_size)
    q = model.args.quantization
    what = f"{q['bits']}-bit, groups of {q['group_size']}" if q else (args.dtype or "dtype kept")
    return f"{args.out} ({what}, {_size(_folder_size(args.out))})"


def mlx_to_hf(args, console):
    from .checkpoints import mlx_to_hf

    with console.status(f"converting {args.model}"):
        mlx_to_hf(args.model, args.out)
    return f"{args.out} ({_size(_folder_size(args.out))}; load with transformers' from_pretrained)"


def adapters_to_peft(args, console):
    from .adapters import mlx_to_peft

    with console.status(f"converting {args.adapters}"):
        config = mlx_to_peft(args.adapters, args.model, args.out)
    return (f"{args.out} (PEFT LoRA r={config['r']}, lora_alpha={config['lora_alpha']:g}, "
            f"{len(config['target_modules'])} modules)")


def peft_to_adapters(args, console):
    from .adapters import peft_to_mlx

    with console.status(f"converting {args.adapters}"):
        config = peft_to_mlx(args.adapters, args.out, base_dir=args.model)
    p = config["lora_parameters"]
    return f"{args.out} (MLX LoRA rank={p['rank']}, scale={p['scale']:g}, {len(config['target_modules'])} modules)"


def fuse(args, console):
    from .adapters import fuse

    with console.status(f"fusing {args.adapters} into {args.model}"):
        kind = fuse(args.model, args.adapters, args.out, dequantize=args.dequantize)
    return f"{args.out} ({kind} adapters merged, {_size(_folder_size(args.out))})"


def to_gguf(args, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .gguf_export import to_gguf

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{args.type} tensors", total=None)
        summary = to_gguf(args.model, args.out, args.type, tokenizer_dir=args.tokenizer,
                          progress=lambda done, total, name: bar.update(task, completed=done, total=total))
    types = ", ".join(f"{n} {t}" for t, n in summary["types"].items())
    tied = "; tied head written as output.weight * d_model**-0.5" if summary["tied_head_scaled"] else ""
    return f"{args.out} ({_size(summary['bytes'])}, {summary['tensors']} tensors: {types}{tied})"


def to_onnx(args, console):
    from pathlib import Path

    from onnx_t5.export import ExportError, export, quantization

    with console.status(f"exporting {args.model} to ONNX"):
        try:
            bits, block_size, method = quantization(args.bits, args.block_size, args.quantizer)
            out = export(args.model, args.out, quantize=not args.float32, tokenizer=args.tokenizer, bits=bits,
                         block_size=block_size, method=method)
        except ExportError as err:
            raise ConvertError(str(err)) from None
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.suffix in (".onnx", ".data"))
    what = "float32" if args.float32 else \
        f"int{bits} weights (MatMulNBits, {method}, blocks of {block_size})"
    return f"{out} ({what}, {_size(size)}; serve with --backend onnx)"


def _flag(parser, name: str, *old_names: str, **kwargs) -> None:
    """An option that is also accepted under the names it had before (--hf, --mlx, --peft, --base,
    --quantize); --help and error messages show only the current name."""
    action = parser.add_argument(name, *old_names, **kwargs)
    action.option_strings = [name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0],
                                     epilog="docs/convert.md documents every subcommand.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    out_help = "output folder (written atomically)"

    p = sub.add_parser("hf-to-mlx", help="HF checkpoint -> MLX checkpoint")
    _flag(p, "--model", "--hf", required=True, help="HF folder (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast (default: keep)")
    _flag(p, "--bits", "--quantize", type=int, choices=(8, 4), default=None, help="quantize to 8 or 4 bits")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="quantization group (default 64)")
    p.set_defaults(run=hf_to_mlx)

    p = sub.add_parser("mlx-to-hf", help="MLX checkpoint -> HF folder (dequantizes)")
    _flag(p, "--model", "--mlx", required=True, help="MLX checkpoint folder")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(run=mlx_to_hf)

    p = sub.add_parser("adapters-to-peft", help="MLX LoRA adapters -> PEFT adapter folder")
    p.add_argument("--adapters", required=True, help="folder with adapters.safetensors + adapter_config.json")
    _flag(p, "--model", "--base", required=True, help="the base checkpoint the adapters were trained on (checked)")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(run=adapters_to_peft)

    p = sub.add_parser("peft-to-adapters", help="PEFT LoRA adapter folder -> MLX LoRA adapters")
    _flag(p, "--adapters", "--peft", required=True, help="folder with adapter_model.safetensors + adapter_config.json")
    _flag(p, "--model", "--base", default=None, help="base checkpoint to check the target modules against")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(run=peft_to_adapters)

    p = sub.add_parser("fuse", help="merge LoRA adapters (MLX or PEFT) into their base")
    _flag(p, "--model", "--base", required=True, help="base checkpoint folder")
    p.add_argument("--adapters", required=True, help="MLX adapter folder or PEFT adapter folder")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--dequantize", action="store_true", help="MLX: write a float model from a quantized base")
    p.set_defaults(run=fuse)

    p = sub.add_parser("to-gguf", help="checkpoint -> GGUF for llama.cpp")
    p.add_argument("--model", required=True, help="HF or MLX checkpoint folder")
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="tensor type (default f16)")
    p.add_argument("--tokenizer", default=None, help="folder with spiece.model / tokenizer.json if --model has none")
    p.set_defaults(run=to_gguf)

    p = sub.add_parser("to-onnx", help="HF checkpoint -> ONNX Runtime folder (int8) for --backend onnx")
    p.add_argument("--model", required=True, help="HF folder or hub id (float weights)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: quantized, --bits)")
    from onnx_t5.export import BITS, DEFAULT_BITS, METHODS

    p.add_argument("--bits", type=int, choices=BITS, default=DEFAULT_BITS,
                   help=f"weight bits of every matmul (default {DEFAULT_BITS}: BENCHMARKS.md, \"4-bit weights\")")
    p.add_argument("--block-size", type=int, choices=(32, 64, 128), default=None,
                   help="inputs per quantization block (default: 128 for 8 bits, the measured best for 4)")
    p.add_argument("--quantizer", choices=METHODS, default=None,
                   help="4-bit quantizer: rtn (symmetric round-to-nearest), rtn-asym (with zero points), hqq "
                        "(default: the measured best)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder if --model has none")
    p.set_defaults(run=to_onnx)
    return parser


def main(argv=None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    try:
        result = args.run(args, console)
    except (ConvertError, OSError) as e:  # OSError: an output folder that cannot be written
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"[green]wrote[/] {result}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
