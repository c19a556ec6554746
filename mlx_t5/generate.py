"""Reformulate queries from the command line with an MLX T5 checkpoint.

    python -m mlx_t5.generate --model DIR "Who lived longer, Nikola Tesla or Milutin Milankovic?"
    python -m mlx_t5.generate --model DIR --beams 4 -n 2 "capital of France" "rain"
    python -m mlx_t5.generate --model DIR < queries.txt        # one query per line

The library function is `mlx_t5.generate` (from mlx_t5/generation.py); this module is only the CLI, so
running it with -m neither shadows that function nor makes runpy warn.
"""

import argparse
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reformulation.data import parse_subqueries
from reformulation.engine import LIMITS, EngineError, check_options

from .generation import generate
from .utils import DTYPES, LoadError, load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_t5.generate",
                                description="Reformulate questions into search subqueries with an MLX T5 model.")
    p.add_argument("queries", nargs="*", help="queries to reformulate (none: read one per line from stdin)")
    p.add_argument("--model", required=True, help="model folder (HF layout) or hub id")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id, when the model folder has none")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--beams", type=int, default=1,
                   help=f"beam search width (1 = greedy or sampling; at most {LIMITS.max_beams})")
    p.add_argument("-n", "--num-return-sequences", type=int, default=1, help="candidates per query")
    p.add_argument("--max-new-tokens", type=int, default=64, help=f"at most {LIMITS.max_new_tokens}")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0 = greedy; > 0 samples (at most {LIMITS.max_temperature:g})")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=32, help="queries decoded together")
    p.add_argument("--raw", action="store_true",
                   help="feed queries as they are (no 'reformulate: ' prompt, no unicode normalisation)")
    return p


def _print_result(console: Console, query: str, candidates: list[str]):
    # soft_wrap: one subquery per output line even when piped (rich wraps at 80 columns otherwise)
    console.print(f"[bold cyan]{escape(query)}[/]", highlight=False, soft_wrap=True)
    for j, text in enumerate(candidates, 1):
        if len(candidates) > 1:
            console.print(f"  [dim]candidate {j}[/]")
        subqueries = parse_subqueries(text)
        for k, sub in enumerate(subqueries, 1):
            console.print(f"  [green]{k}.[/] {escape(sub)}", highlight=False, soft_wrap=True)
        if not subqueries:
            console.print("  [dim](no subqueries)[/]")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)

    def fail(message: str) -> int:
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return 2

    queries = args.queries or [line.strip() for line in sys.stdin if line.strip()]
    if not queries:
        return fail("no queries: pass them as arguments or one per line on stdin")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    try:  # the bounds chat and the API have too
        check_options(num_beams=args.beams, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    except EngineError as e:
        return fail(str(e))
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.beams, length_penalty=args.length_penalty,
                   num_return_sequences=args.num_return_sequences, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, raw=args.raw)
    n = args.num_return_sequences
    try:
        with err.status(f"Loading {escape(args.model)}"):
            model, tokenizer = load(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
        start = time.perf_counter()
        progress = Progress(TextColumn("Generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True, disable=len(queries) <= args.batch_size)
        with progress:
            task = progress.add_task("generate", total=len(queries))
            for i in range(0, len(queries), args.batch_size):
                chunk = queries[i:i + args.batch_size]
                texts = generate(model, tokenizer, chunk, batch_size=args.batch_size, **options)
                for j, query in enumerate(chunk):
                    _print_result(out, query, texts[j * n:(j + 1) * n])
                progress.advance(task, len(chunk))
    except (LoadError, ValueError, TypeError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return 130
    elapsed = time.perf_counter() - start
    err.print(f"[dim]{len(queries)} queries in {elapsed:.2f} s ({1000 * elapsed / len(queries):.0f} ms/query)[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
