"""Speculative (prompt-lookup) decoding against plain greedy on the same ONNX model, test split, batch 1.

    python bench/speculative_bench.py --model runs/quickstart/best            # int8, the whole test split
    python bench/speculative_bench.py --model runs/quickstart/best --float32 --limit 200 --draft 8

The model (an HF folder, e.g. a trained run's best/) is exported to ONNX once (int8 by default), and its
run's config.yaml (next to it or one folder up) gives the leak-free test split. Each question is answered
at batch 1 twice, alternating: plain greedy (one decoder pass per token) and speculative decoding (drafts
looked up in the question, checked in one pass). Reported: decoder passes, tokens per pass, milliseconds
per query (median and mean over the questions), and how many answers are identical token for token.
Writes a rich table and bench/results/speculative.json.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_questions(model: Path, limit: int) -> list:
    from reformulation.config import load_config
    from reformulation.data import load_examples, make_splits

    config = next((p for p in (model / "config.yaml", model.parent / "config.yaml") if p.is_file()), None)
    if config is None:
        raise SystemExit(f"{model}: no config.yaml beside it or one folder up (the run that trained it)")
    cfg = load_config(config)
    splits = make_splits(load_examples(cfg.data, normalize=cfg.normalize), cfg.split, cfg.split_fractions,
                         cfg.sample_fraction, cfg.seed)
    return splits.test[:limit] if limit else splits.test


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return name + (", AVX-512" if "avx512f" in out else ", AVX2") + (" VNNI" if "vnni" in out else "")
    except Exception:  # noqa: BLE001 - macOS has no lscpu
        return platform.processor() or platform.machine()


def run(onnx_model, tokenizer, questions, draft: int, max_new_tokens: int) -> dict:
    from reformulation.data import format_source
    from reformulation.speculative import piece_keys

    keys = piece_keys(tokenizer)
    plain_ms, spec_ms, same, plain_passes, stats = [], [], 0, 0, {}
    for e in questions:
        ids = tokenizer([format_source(e.query)], return_tensors="np")["input_ids"]
        start = time.perf_counter()
        want = onnx_model.generate(ids, max_new_tokens=max_new_tokens)[0]
        plain_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        got = onnx_model.speculative(ids, max_new_tokens=max_new_tokens, draft_tokens=draft, stats=stats,
                                     keys=keys)[0]
        spec_ms.append((time.perf_counter() - start) * 1e3)
        plain_passes += len(want) - 1
        same += len(got) == len(want) and bool((got == want).all())
    return {"questions": len(questions), "identical": same, "tokens": stats["tokens"],
            "passes_plain": plain_passes, "passes_speculative": stats["passes"],
            "tokens_per_pass": stats["tokens"] / stats["passes"],
            "pass_reduction": plain_passes / stats["passes"],
            "ms_plain": {"median": statistics.median(plain_ms), "mean": statistics.fmean(plain_ms)},
            "ms_speculative": {"median": statistics.median(spec_ms), "mean": statistics.fmean(spec_ms)},
            "speedup_mean": statistics.fmean(plain_ms) / statistics.fmean(spec_ms)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder of a trained run (e.g. runs/quickstart/best)")
    parser.add_argument("--float32", action="store_true", help="export float32 weights instead of int8")
    parser.add_argument("--limit", type=int, default=0, help="first N test questions (0: all)")
    parser.add_argument("--draft", type=int, default=8, help="draft tokens per pass at most")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from onnx_t5 import load
    from onnx_t5.export import export

    model = Path(args.model)
    questions = test_questions(model, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(model, Path(tmp) / "onnx", quantize=not args.float32)
        onnx_model, tokenizer = load(folder, threads=1)
        run(onnx_model, tokenizer, questions[:5], args.draft, args.max_new_tokens)  # warm-up
        result = run(onnx_model, tokenizer, questions, args.draft, args.max_new_tokens)
    result |= {"model": str(model), "weights": "float32" if args.float32 else "int8", "cpu": cpu_name(),
               "draft": args.draft, "threads": 1}
    table = Table(title=f"{model}: {result['weights']}, {result['questions']} test questions at batch 1 "
                        f"({result['cpu']}, 1 thread)")
    for column in ("", "decoder passes", "tokens / pass", "ms / query (median)", "ms / query (mean)"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("plain greedy", f"{result['passes_plain']:,}", "1.00", f"{result['ms_plain']['median']:.1f}",
                  f"{result['ms_plain']['mean']:.1f}")
    table.add_row("speculative", f"{result['passes_speculative']:,}", f"{result['tokens_per_pass']:.2f}",
                  f"{result['ms_speculative']['median']:.1f}", f"{result['ms_speculative']['mean']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"identical answers: {result['identical']}/{result['questions']}; {result['pass_reduction']:.2f}x "
                  f"fewer decoder passes, {result['speedup_mean']:.2f}x lower mean latency", highlight=False)
    out = ROOT / "bench" / "results" / f"speculative-{result['weights']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
