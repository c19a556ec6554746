"""MLX matmul speed on this CPU against torch's and numpy's, measured side by side in one process.

    python bench/blas_bench.py                  # default threads (every core)
    python bench/blas_bench.py --threads 1
    OPENBLAS_CORETYPE=Haswell python bench/blas_bench.py   # what an AVX2-only CPU runs (DYNAMIC_ARCH builds)

Shapes: a 1024^3 square product, then the products a flan-t5-small training step and decoding step make
(batch 16 x 32 tokens through d_model 512 / d_ff 1024 layers, the 32k-row LM head). Each is float32,
timed as the median of --repeats runs after a warm-up; MLX evaluates each product. Reports GFLOP/s per
framework and MLX / torch, with the CPU, its flags and the BLAS MLX uses, and writes bench/results/blas.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_t5  # noqa: E402  (first: puts the OpenBLAS under MLX)
from mlx_t5 import info  # noqa: E402

SHAPES = [  # (m, k, n): A (m x k) @ B (k x n)
    ("square 1024", 1024, 1024, 1024),
    ("train: attention q/k/v/o", 512, 512, 512),
    ("train: ffn in", 512, 512, 1024),
    ("train: ffn out", 512, 1024, 512),
    ("train: lm head", 512, 512, 32128),
    ("decode: lm head, 1 row", 1, 512, 32128),
]


def _median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(m: int, k: int, n: int, repeats: int) -> dict:
    import mlx.core as mx
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    ma, mb = mx.array(a), mx.array(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2 * m * k * n
    seconds = {"mlx": _median_seconds(lambda: mx.eval(ma @ mb), repeats),
               "torch": _median_seconds(lambda: ta @ tb, repeats),
               "numpy": _median_seconds(lambda: a @ b, repeats)}
    return {name: flops / s / 1e9 for name, s in seconds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="BLAS / torch threads (default: every core)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blas.json")
    args = p.parse_args(argv)

    import torch
    from machine import make_console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
        if mlx_t5.blas.STATE.path:
            mlx_t5.blas.set_threads(args.threads)
    machine = info.collect()
    rows = []
    for name, m, k, n in SHAPES:
        gflops = measure(m, k, n, args.repeats)
        rows.append(dict(shape=name, m=m, k=k, n=n, **{f"{key}_gflops": round(v, 1) for key, v in gflops.items()},
                         mlx_vs_torch=round(gflops["mlx"] / gflops["torch"], 2)))
    ratios = [row["mlx_vs_torch"] for row in rows]
    geomean = statistics.geometric_mean(ratios)

    console = make_console()
    table = Table(title=f"float32 matmul GFLOP/s: {machine['cpu']}; MLX BLAS {machine['blas']['config']}, "
                        f"{torch.get_num_threads()} torch / {mlx_t5.blas.get_threads()} BLAS threads")
    for column in ("shape", "m x k x n", "MLX", "torch", "numpy", "MLX / torch"):
        table.add_column(column, justify="left" if column == "shape" else "right")
    for row in rows:
        table.add_row(row["shape"], f"{row['m']}x{row['k']}x{row['n']}", f"{row['mlx_gflops']:.1f}",
                      f"{row['torch_gflops']:.1f}", f"{row['numpy_gflops']:.1f}", f"{row['mlx_vs_torch']:.2f}")
    console.print(table)
    console.print(f"MLX / torch: {rows[0]['mlx_vs_torch']:.2f} on the square product, geometric mean {geomean:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=machine, threads=torch.get_num_threads(), rows=rows,
                                        geomean_mlx_vs_torch=round(geomean, 2)), indent=2) + "\n")


if __name__ == "__main__":
    main()
