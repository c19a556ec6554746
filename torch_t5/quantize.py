"""Quantize a T5 checkpoint to int8 for CPU serving (torch_t5.int8 describes the format).

    python -m torch_t5.quantize --model runs/base/final --out runs/base/int8 [--check data.jsonl]
"""

import argparse
import sys
import time
from pathlib import Path

from .infer import InferError, generate, load
from .int8 import QuantizeError, load_int8, quantize_model, save_int8


def greedy_agreement(model_a, model_b, tokenizer, queries, max_new_tokens: int = 64, batch_size: int = 32) -> float:
    """Fraction of queries for which both models produce the same greedy output string."""
    a = generate(model_a, tokenizer, queries, max_new_tokens=max_new_tokens, batch_size=batch_size)
    b = generate(model_b, tokenizer, queries, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(x == y for x, y in zip(a, b)) / max(len(queries), 1)


def file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantize_checkpoint(model_dir, out_dir, skip=()) -> dict:
    """Quantize the HF folder ``model_dir`` into ``out_dir``; return a summary dict."""
    model, tokenizer = load(model_dir, dtype="float32")
    start = time.perf_counter()
    modules = quantize_model(model, skip=skip)
    if not modules:
        raise QuantizeError(f"{model_dir}: no nn.Linear left to quantize (skip={list(skip)})")
    save_int8(model, tokenizer, out_dir, modules, source=str(model_dir))
    return {
        "modules": len(modules),
        "seconds": time.perf_counter() - start,
        "fp32_bytes": file_size(Path(model_dir)),
        "int8_bytes": file_size(Path(out_dir)),
    }


def main(argv=None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m torch_t5.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (or hub id) to quantize")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="modules to keep in fp32: names, suffixes (wo, lm_head) or globs (decoder.*)")
    parser.add_argument("--check", metavar="JSONL", default=None,
                        help="data file: report greedy agreement with the fp32 model on its first queries")
    parser.add_argument("--check-samples", type=int, default=64, help="queries used by --check (default 64)")
    args = parser.parse_args(argv)

    console, err = Console(), Console(stderr=True)
    try:
        with console.status(f"quantizing {args.model}"):
            summary = quantize_checkpoint(args.model, args.out, skip=args.skip)
        console.print(f"[green]wrote[/] {args.out}: {summary['modules']} linear layers in int8, "
                      f"{summary['fp32_bytes'] / 2**20:,.1f} MiB -> {summary['int8_bytes'] / 2**20:,.1f} MiB")
        if args.check:
            from reformulation.data import load_examples

            queries = [e.query for e in load_examples(args.check)[: args.check_samples]]
            with console.status(f"comparing greedy outputs on {len(queries)} queries"):
                fp32, tokenizer = load(args.model, dtype="float32")
                int8, _ = load_int8(args.out)
                rate = greedy_agreement(fp32, int8, tokenizer, queries)
            console.print(f"greedy agreement with fp32: [bold]{rate:.1%}[/] of {len(queries)} queries")
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        from reformulation.data import DataError

        if not isinstance(e, (QuantizeError, InferError, DataError, OSError, ValueError)):
            raise
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
