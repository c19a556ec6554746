"""MLX vs transformers generation speed on the flan-t5-small shape (random init), same process, same inputs.

    python bench/generate_bench.py [--repeats 5] [--batches 1 8] [--beams 4] [--threads N]

Greedy, 24-token inputs, exactly 30 new tokens (EOS masked on both sides: MLX `ignore_eos=True`,
transformers `min_new_tokens=max_new_tokens=30`), so both do the same work and must give the same tokens.
Each configuration is warmed up once, then MLX and torch alternate for --repeats runs; medians are reported.
The memory floor is the time to read, at the bandwidth measured here, what one decode step must read:
decoder weights (less the cross-attention K/V projections, used on the first step only), the LM head,
and the cross- and self-attention K/V caches. Results also go to bench/results/generate.json.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import mlx_t5  # noqa: E402  (before mlx: loads OpenBLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hf_models import SHAPES, make_model  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from machine import make_console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from reformulation.io import atomic_write_json  # noqa: E402

SHAPE = "flan-small"


def measure_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a warm numpy copy (each byte read once and written once), best of `repeats`."""
    src = np.ones(mbytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch: page faults out of the measurement
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bytes(model, batch: int, source_len: int, new_tokens: int) -> int:
    """What one decode step reads: weights it uses every step + the K/V caches (self-attention at mean length)."""
    weights = sum(v.nbytes for k, v in tree_flatten(model.parameters())
                  if k.startswith("decoder.") and ".EncDecAttention.k." not in k and ".EncDecAttention.v." not in k)
    head = model.lm_head.weight if "lm_head" in model else model.shared.weight
    a = model.args
    per_position = batch * a.num_decoder_layers * 2 * a.num_heads * a.d_kv * 4  # K and V, fp32
    return weights + head.nbytes + per_position * (source_len + (new_tokens + 1) / 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--beams", type=int, default=0, help="also time beam search with this width at batch 1")
    p.add_argument("--input-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads and OpenBLAS threads (default: the core count)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    args = p.parse_args(argv)
    console = make_console()
    threads = args.threads
    torch.set_num_threads(threads)
    if mlx_t5.blas.STATE.path:  # the OpenBLAS MLX uses on Linux; it reads OPENBLAS_NUM_THREADS only at load
        mlx_t5.blas.set_threads(threads)
    load_before = os.getloadavg()

    with console.status("Building the random flan-t5-small model"):
        hf = make_model(SHAPE)
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            model, _ = mlx_t5.load(folder)
    with console.status("Measuring memory bandwidth"):
        bandwidth = measure_bandwidth()

    n = args.new_tokens
    configs = [(b, 1) for b in args.batches] + ([(1, args.beams)] if args.beams > 1 else [])
    rng = np.random.default_rng(0)
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("runs", total=len(configs) * (args.repeats + 1) * 2)
        for batch, beams in configs:
            ids = rng.integers(5, 32000, size=(batch, args.input_tokens)).astype(np.int32)
            ids[:, -1] = hf.config.eos_token_id
            mask = np.ones_like(ids)
            ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

            def run_mlx():
                return mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=n, num_beams=beams, ignore_eos=True)

            def run_torch():
                with torch.inference_mode():
                    return hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, num_beams=beams,
                                       min_new_tokens=n, max_new_tokens=n)

            identical = run_mlx() == run_torch()[:, 1:].tolist()  # also the warmup
            progress.advance(task, 2)
            times = {"mlx": [], "torch": []}
            for _ in range(args.repeats):
                for name, fn in (("mlx", run_mlx), ("torch", run_torch)):
                    times[name].append(_timed(fn))
                    progress.advance(task)
            mlx_s, torch_s = float(np.median(times["mlx"])), float(np.median(times["torch"]))
            floor_step = step_bytes(model, batch * beams, args.input_tokens, n) / bandwidth
            results.append(dict(batch=batch, num_beams=beams, new_tokens=n, identical_tokens=identical,
                                mlx_ms=1e3 * mlx_s, torch_ms=1e3 * torch_s, ratio_mlx_over_torch=mlx_s / torch_s,
                                mlx_ms_per_step=1e3 * mlx_s / n, torch_ms_per_step=1e3 * torch_s / n,
                                floor_ms_per_step=1e3 * floor_step, mlx_over_floor=mlx_s / n / floor_step,
                                mlx_runs_ms=[1e3 * t for t in times["mlx"]],
                                torch_runs_ms=[1e3 * t for t in times["torch"]]))

    table = Table(title=f"Generation, {SHAPE} shape (random init), {args.input_tokens}-token input, "
                        f"{n} new tokens, median of {args.repeats}")
    for col in ("batch", "beams", "MLX ms", "torch ms", "MLX/torch", "MLX ms/token", "torch ms/token",
                "floor ms/token", "MLX/floor", "same tokens"):
        table.add_column(col, justify="right")
    for r in results:
        ratio = f"[{'green' if r['ratio_mlx_over_torch'] <= 1 else 'red'}]{r['ratio_mlx_over_torch']:.2f}[/]"
        table.add_row(str(r["batch"]), str(r["num_beams"]), f"{r['mlx_ms']:.0f}", f"{r['torch_ms']:.0f}", ratio,
                      f"{r['mlx_ms_per_step']:.1f}", f"{r['torch_ms_per_step']:.1f}", f"{r['floor_ms_per_step']:.1f}",
                      f"{r['mlx_over_floor']:.1f}x", "yes" if r["identical_tokens"] else "[red]NO[/]")
    console.print(table)
    load_after = os.getloadavg()
    console.print(f"memory bandwidth (numpy copy) {bandwidth / 1e9:.1f} GB/s; {os.cpu_count()} cores; torch and "
                  f"OpenBLAS threads {threads}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    env = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cores=os.cpu_count(), torch_threads=torch.get_num_threads(), openblas_threads=threads,
               torch=torch.__version__, mlx=mx.__version__,
               mlx_device=str(mx.default_device()), openblas=mlx_t5.blas.STATE.config,
               load_average_before=load_before, load_average_after=load_after)
    atomic_write_json(args.out, dict(benchmark="generate", shape=SHAPE, shape_config=SHAPES[SHAPE],
                                     input_tokens=args.input_tokens, new_tokens=n, repeats=args.repeats,
                                     bandwidth_bytes_per_s=bandwidth, env=env, results=results))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
