"""Training throughput: the MLX trainer's compiled step against a plain torch loop, same model, same batches.

    python bench/train_bench.py                         # flan-t5-small shape, batch 8, 20 timed steps
    python bench/train_bench.py --steps 40 --threads 2 --dropout 0.0

Both sides train the same random-init flan-t5-small (saved once by mlx_t5, loaded by transformers) on the
same batches of real rows of full.jsonl (queries and targets tokenized by the Flan-T5 tokenizer, padded
to the trainer's multiple-of-8 buckets, labels -100 on padding): AdamW (lr 3e-4, weight decay 0.01 off
the norm weights, bias correction), global-norm clipping at 1.0, dropout --dropout, float32.
MLX: `mlx_t5.trainer.make_step` (nn.value_and_grad + clip + update, mx.compile'd over model, optimizer
and RNG state). torch: forward with labels, backward, clip_grad_norm_, AdamW.step, zero_grad.
Each framework runs in its own process (its own peak RSS; thread pools do not meet) with --threads
BLAS / intra-op threads; every batch shape is seen once before timing (MLX compiles per shape).
Reported: samples/s and tokens/s (non-padding source + target tokens) over the timed steps, the loss of
the first batch without dropout on both sides (same weights, same batch: must agree), peak memory (MLX
allocator peak and process peak RSS). Writes a rich table and bench/results/train.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "flan-t5-small"
DATA = SHARED / "datasets" / "full.jsonl"


def make_batches(batch_size: int, count: int, seed: int) -> list[dict]:
    """`count` padded batches of real rows, as lists (JSON for the workers)."""
    import numpy as np
    from transformers import AutoTokenizer

    from mlx_t5.trainer import collate
    from reformulation.data import read_jsonl, tokenize

    rows = read_jsonl(DATA).examples
    pick = np.random.default_rng(seed).choice(len(rows), batch_size * count, replace=False)
    tokens = tokenize(AutoTokenizer.from_pretrained(str(TOKENIZER)), [rows[i] for i in pick], 64, 64)
    batches = []
    for b in range(count):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        batch = collate(tokens["input_ids"][sl], tokens["labels"][sl])
        batch = {k: v.tolist() for k, v in batch.items()}
        batch["tokens"] = int(sum(map(len, tokens["input_ids"][sl])) + sum(map(len, tokens["labels"][sl])))
        batches.append(batch)
    return batches


def peak_rss_gb() -> float:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def shapes_first(batches: list[dict]) -> list[int]:
    """Indices of one batch per distinct shape (the warm-up pass)."""
    seen, first = set(), []
    for i, b in enumerate(batches):
        shape = (len(b["input_ids"]), len(b["input_ids"][0]), len(b["labels"][0]))
        if shape not in seen:
            seen.add(shape)
            first.append(i)
    return first


def timed_steps(run, batches: list[dict]) -> tuple[float, float]:
    """(loss of the first step, seconds for one step on every batch): `run(i)` trains on batch i; each
    batch shape is run once before the clock starts (MLX compiles per shape)."""
    first_loss = run(0)
    for i in shapes_first(batches)[1:]:
        run(i)
    start = time.perf_counter()
    for i in range(len(batches)):
        run(i)
    return first_loss, time.perf_counter() - start


def worker_mlx(model_dir: str, batches: list[dict], lr: float, dropout: float) -> dict:
    import mlx_t5  # noqa: I001  (first: it preloads OpenBLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from mlx_t5.model import loss_fn
    from mlx_t5.trainer import build_optimizer, make_step, set_dropout, to_mx
    from reformulation.config import TrainConfig

    model, _ = mlx_t5.load(model_dir)
    set_dropout(model, dropout)
    model.train()
    cfg = TrainConfig(init="small", learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0)
    optimizer = build_optimizer(cfg, 10_000)
    optimizer.init(model.trainable_parameters())
    step, _, _ = make_step(model, optimizer, cfg.max_grad_norm)
    arrays = [to_mx({k: np.array(v, dtype=np.int32) for k, v in b.items() if k != "tokens"}) for b in batches]
    model.eval()
    check_loss = loss_fn(model, *arrays[0])[0].item()  # no dropout: must equal torch's
    model.train()

    def run(i):
        loss_sum, ntoks, norm = step(arrays[i])
        mx.eval(loss_sum, ntoks, norm, model.state, optimizer.state)
        return (loss_sum / ntoks).item()

    first_loss, seconds = timed_steps(run, batches)
    return {"check_loss": check_loss, "first_loss": first_loss, "seconds": seconds,
            "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9}


def worker_torch(model_dir: str, batches: list[dict], lr: float, dropout: float, threads: int) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration

    torch.set_num_threads(threads)
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dropout_rate=dropout).train()
    decay = [p for n, p in model.named_parameters() if "layer_norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "layer_norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr)
    tensors = [{k: torch.tensor(v) for k, v in b.items() if k != "tokens"} for b in batches]
    model.eval()
    with torch.no_grad():
        check_loss = model(**tensors[0]).loss.item()
    model.train()

    def run(i):
        loss = model(**tensors[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first_loss, seconds = timed_steps(run, batches)
    return {"check_loss": check_loss, "first_loss": first_loss, "seconds": seconds}


def worker_main(args) -> int:
    spec = json.loads(Path(args.worker_spec).read_text())
    if args.worker == "mlx":
        result = worker_mlx(spec["model_dir"], spec["batches"], spec["lr"], spec["dropout"])
    else:
        result = worker_torch(spec["model_dir"], spec["batches"], spec["lr"], spec["dropout"], spec["threads"])
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result))
    return 0


def run_worker(framework: str, spec_file: Path, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--worker", framework, "--worker-spec", str(spec_file)],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shape", default="small", help="init shape: small, base, large or a config.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (distinct batches)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS / torch intra-op threads, the same for both (1: least disturbed on shared hosts)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="alternate mlx / torch this many times (noisy hosts)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    parser.add_argument("--worker", choices=("mlx", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    from machine import make_console
    from rich.table import Table

    console = make_console()
    if not DATA.is_file() or not TOKENIZER.is_dir():
        console.print(f"[red]error:[/] needs {DATA} and {TOKENIZER}")
        return 2
    sys.path.insert(0, str(ROOT))
    import mlx_t5
    from mlx_t5.init import init_model
    from reformulation.io import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp, console.status("building the model and batches"):
        tokenizer = mlx_t5.utils.load_tokenizer(TOKENIZER)
        model_dir = Path(tmp) / "model"
        mlx_t5.save(init_model(args.shape, seed=args.seed), tokenizer, model_dir)
        batches = make_batches(args.batch_size, args.steps, args.seed)
        spec = {"model_dir": str(model_dir), "batches": batches, "lr": args.lr, "dropout": args.dropout,
                "threads": args.threads}
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        runs = {"mlx": [], "torch": []}
        for r in range(args.rounds):
            for framework in ("mlx", "torch"):
                runs[framework].append(run_worker(framework, spec_file, args.threads))

    samples = args.batch_size * args.steps
    tokens = sum(b["tokens"] for b in batches)
    result = {"shape": args.shape, "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
              "dropout": args.dropout, "platform": platform.platform(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "frameworks": {}}
    for framework, results in runs.items():
        best = min(results, key=lambda x: x["seconds"])  # the least disturbed round
        result["frameworks"][framework] = best | {
            "samples_per_second": samples / best["seconds"], "tokens_per_second": tokens / best["seconds"],
            "all_seconds": [x["seconds"] for x in results]}
    mlx, torch_ = result["frameworks"]["mlx"], result["frameworks"]["torch"]
    result["mlx_over_torch"] = mlx["samples_per_second"] / torch_["samples_per_second"]

    table = Table(title=f"Training step, {args.shape} shape, batch {args.batch_size}, {args.threads} thread(s)")
    for col in ("", "samples/s", "tokens/s", "loss (no dropout)", "peak RSS GB", "MLX peak GB"):
        table.add_column(col, justify="right")
    for framework, r in result["frameworks"].items():
        table.add_row(framework, f"{r['samples_per_second']:.2f}", f"{r['tokens_per_second']:,.0f}",
                      f"{r['check_loss']:.5f}", f"{r['peak_rss_gb']:.2f}",
                      f"{r['mlx_peak_memory_gb']:.2f}" if "mlx_peak_memory_gb" in r else "-")
    console.print(table)
    console.print(f"MLX / torch samples/s: [bold]{result['mlx_over_torch']:.2f}[/]   load average "
                  f"{result['load_average'][0]:.1f} on {os.cpu_count()} CPUs")
    atomic_write_json(args.out, result)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
