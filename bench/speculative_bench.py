"""Speculative decoding against plain greedy on the same model and engine, test split, batch 1.

    python bench/speculative_bench.py --model runs/quickstart/best            # onnx int8, the whole test split
    python bench/speculative_bench.py --model runs/quickstart/best --float32 --draft 4,8
    python bench/speculative_bench.py --model runs/quickstart/best --engine mlx --limit 300      # MLX, float32

The model (an HF folder, e.g. a trained run's best/) is exported to ONNX once (int8 by default) or run by MLX.
Its run's config.yaml (next to it or one folder up) gives the leak-free test split and, when the folder has no
drafts.json (runs trained before the trainers wrote it), the train split's phrasebook. Each question is answered
at batch 1 by every variant in turn: plain greedy (one decoder pass per token), prompt lookup alone (drafts from
the question and the answer), and prompt lookup + the phrasebook, for each draft length. Reported: decoder
passes, tokens per pass, milliseconds per query (median and mean), and how many answers equal plain greedy's
token for token. Writes a rich table and bench/results/speculative-<engine>-<weights>.json.

--project (onnx) adds a projection for flan-t5-small's shape, where weights stream from memory every pass: the
decoder pass over 1 and over k + 1 positions is timed on a random model of that shape (same weights: int8 or
float32), and each variant's measured pass reduction is scaled by that cost ratio. A projection, not a
measurement: a random model accepts no drafts, and a trained flan-t5-small's answers may draft differently.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import make_console, cpu_name  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402


def load_splits(model: Path):
    from reformulation.config import load_config
    from reformulation.data import load_examples, make_splits

    config = next((p for p in (model / "config.yaml", model.parent / "config.yaml") if p.is_file()), None)
    if config is None:
        raise SystemExit(f"{model}: no config.yaml beside it or one folder up (the run that trained it)")
    cfg = load_config(config)
    return make_splits(load_examples(cfg.data, normalize=cfg.normalize), cfg.split, cfg.split_fractions,
                       cfg.sample_fraction, cfg.seed)


def variants(tokenizer, folder: Path, splits, start: int, drafts: list[int]) -> dict:
    """name -> (Drafts or None for plain greedy, draft length)."""
    from reformulation.recipe import phrasebook
    from reformulation.speculative import Drafts, Phrasebook, piece_keys

    book = Phrasebook.load(folder, len(tokenizer)) or phrasebook(tokenizer, splits.train, start)
    keys = piece_keys(tokenizer)
    out = {"plain greedy": (None, 0)}
    for k in drafts:
        out[f"prompt lookup, k={k}"] = (Drafts(keys), k)
        out[f"lookup + phrasebook, k={k}"] = (Drafts(keys, book), k)
    return out


class OnnxRunner:
    """The model exported to ONNX Runtime (int8 or float32), 1 thread."""

    def __init__(self, model: Path, tmp: Path, float32: bool):
        from onnx_t5 import load
        from onnx_t5.export import export

        self.folder = export(model, tmp / "onnx", quantize=not float32)
        self.model, self.tokenizer = load(self.folder, threads=1)
        self.start = self.model.start

    def plain(self, ids, max_new_tokens: int) -> list[int]:
        return _new_tokens(self.model.generate(ids, max_new_tokens=max_new_tokens)[0][1:], self.model.pad)

    def speculative(self, ids, max_new_tokens: int, k: int, drafts, stats: dict) -> list[int]:
        out = self.model.speculative(ids, max_new_tokens=max_new_tokens, draft_tokens=k, stats=stats, drafts=drafts)
        return _new_tokens(out[0][1:], self.model.pad)


class MLXRunner:
    """The model in MLX, its own float32 weights (OpenBLAS with 1 thread on Linux)."""

    def __init__(self, model: Path, tmp: Path, float32: bool):
        from mlx_t5 import blas
        from mlx_t5.utils import load

        blas.set_threads(1)
        self.folder = model
        self.model, self.tokenizer = load(model)
        self.start = self.model.args.decoder_start_token_id

    def plain(self, ids, max_new_tokens: int) -> list[int]:
        from mlx_t5.generation import generate_tokens

        return generate_tokens(self.model, ids, max_new_tokens=max_new_tokens)[0]

    def speculative(self, ids, max_new_tokens: int, k: int, drafts, stats: dict) -> list[int]:
        from mlx_t5.generation import speculative_tokens

        return speculative_tokens(self.model, ids, None, max_new_tokens, draft_tokens=k, drafts=drafts, stats=stats)[0]


def _new_tokens(row, pad: int) -> list[int]:
    row = list(row)
    while row and row[-1] == pad:
        row.pop()
    return row


def run(runner, questions, ways: dict, max_new_tokens: int) -> dict:
    from reformulation.data import format_source

    times = {name: [] for name in ways}
    stats = {name: {} for name in ways}
    same = dict.fromkeys(ways, 0)
    for e in questions:
        ids = runner.tokenizer([format_source(e.query)], return_tensors="np")["input_ids"]
        want = None
        for name, (drafts, k) in ways.items():
            start = time.perf_counter()
            if drafts is None:
                got = want = runner.plain(ids, max_new_tokens)
                stats[name]["passes"] = stats[name].get("passes", 0) + len(got)
                stats[name]["tokens"] = stats[name].get("tokens", 0) + len(got)
            else:
                got = runner.speculative(ids, max_new_tokens, k, drafts, stats[name])
            times[name].append((time.perf_counter() - start) * 1e3)
            same[name] += got == want
    plain = statistics.fmean(times["plain greedy"])
    return {name: {"identical": same[name], "passes": stats[name]["passes"], "tokens": stats[name]["tokens"],
                   "tokens_per_pass": stats[name]["tokens"] / stats[name]["passes"],
                   "pass_reduction": stats["plain greedy"]["passes"] / stats[name]["passes"],
                   "ms_median": statistics.median(times[name]), "ms_mean": statistics.fmean(times[name]),
                   "speedup_mean": plain / statistics.fmean(times[name])} for name in ways}


def pass_cost(float32: bool, positions: list[int], tmp: Path, repeats: int = 40) -> dict:
    """Median ms of one ONNX decoder pass over n new positions after a 16-token answer, flan-t5-small's shape."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import make_model

    from onnx_t5 import OnnxT5
    from onnx_t5.export import export_folder

    folder = tmp / "flan-small"
    folder.mkdir()
    export_folder(make_model("flan-small"), folder, quantize=not float32)
    model = OnnxT5(folder, threads=1)
    ids = np.arange(100, 124, dtype=np.int64)[None]
    feed = model.begin(ids)
    model.decode(feed, np.arange(200, 216, dtype=np.int64)[None], 0)
    times = {n: [] for n in positions}
    for _ in range(repeats):
        for n in positions:
            start = time.perf_counter()
            model.decode(feed, np.arange(300, 300 + n, dtype=np.int64)[None], 16)
            times[n].append((time.perf_counter() - start) * 1e3)
            model.truncate(feed, 16)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder of a trained run (e.g. runs/quickstart/best)")
    parser.add_argument("--engine", choices=("onnx", "mlx"), default="onnx")
    parser.add_argument("--float32", action="store_true", help="onnx: export float32 weights instead of int8")
    parser.add_argument("--limit", type=int, default=0, help="first N test questions (0: all)")
    parser.add_argument("--draft", default="4,8", help="draft lengths to compare, comma-separated (default 4,8)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--project", action="store_true",
                        help="onnx: also project each variant onto flan-t5-small's shape (see above)")
    parser.add_argument("--out", help="result file (default bench/results/speculative-<engine>-<weights>.json)")
    args = parser.parse_args(argv)

    from rich.table import Table

    model = Path(args.model)
    splits = load_splits(model)
    questions = splits.test[:args.limit] if args.limit else splits.test
    with tempfile.TemporaryDirectory() as tmp:
        runner = (MLXRunner if args.engine == "mlx" else OnnxRunner)(model, Path(tmp), args.float32)
        ways = variants(runner.tokenizer, runner.folder, splits, runner.start, [int(k) for k in args.draft.split(",")])
        run(runner, questions[:5], ways, args.max_new_tokens)  # warm-up
        rows = run(runner, questions, ways, args.max_new_tokens)
        cost = pass_cost(args.float32, sorted({1} | {k + 1 for _, k in ways.values()}), Path(tmp)) \
            if args.project and args.engine == "onnx" else None
    if cost:
        for name, (_, k) in ways.items():
            rows[name]["flan_small_pass_ms"] = cost[k + 1]
            rows[name]["flan_small_projected_speedup"] = rows[name]["pass_reduction"] * cost[1] / cost[k + 1]
    weights = "float32" if args.float32 or args.engine == "mlx" else "int8"
    result = {"model": str(model), "engine": args.engine, "weights": weights, "cpu": cpu_name(), "threads": 1,
              "questions": len(questions), "variants": rows}
    table = Table(title=f"{model}: {args.engine} {weights}, {len(questions)} test questions at batch 1 "
                        f"({result['cpu']}, 1 thread)")
    for column in ("", "decoder passes", "fewer passes", "drafts accepted / pass", "ms / query (median)",
                   "ms / query (mean)", "lower latency (mean)", "= plain greedy") + \
            (("flan-small pass ms", "flan-small projected") if cost else ()):
        table.add_column(column, justify="right" if column else "left")
    for name, r in rows.items():
        table.add_row(name, f"{r['passes']:,}", f"{r['pass_reduction']:.2f}x", f"{r['tokens_per_pass'] - 1:.2f}",
                      f"{r['ms_median']:.2f}", f"{r['ms_mean']:.2f}", f"{r['speedup_mean']:.2f}x",
                      f"{r['identical']}/{len(questions)}",
                      *((f"{r['flan_small_pass_ms']:.2f}", f"{r['flan_small_projected_speedup']:.2f}x") if cost else ()))
    console = make_console()
    console.print(table)
    out = Path(args.out or ROOT / "bench" / "results" / f"speculative-{args.engine}-{weights}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
