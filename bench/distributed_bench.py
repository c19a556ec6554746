"""MLX data parallelism: samples/s of 1 vs 2 processes on this machine, the measured all-reduce cost, and
the scaling it projects for N machines.

    python bench/distributed_bench.py                        # the quickstart model and flan-t5-small, 2 ranks
    python bench/distributed_bench.py --models small --steps 30

For each model the MLX trainer (`python -m mlx_t5.train`) runs the same global batch with 1 process (all
cores) and with `mlx.launch -n 2` (the ring backend over 127.0.0.1, one core each); samples/s is the
trainer's own train_samples_per_second (evaluation excluded). Then 2 ranks time `all_sum` on a buffer the
size of the model's gradients (float32), which gives the link's bus bandwidth as the ring all-reduce uses
it: 2 (N-1)/N x bytes / seconds. The projection for N machines is

    step(N) = compute_per_sample x global_batch / N + 2 (N-1)/N x gradient_bytes / link_bandwidth

with compute_per_sample from the 1-process run on this CPU and link bandwidths as listed (the loopback
figure is measured; the Ethernet/Thunderbolt ones are the links' nominal rates, marked assumed).
Writes a rich table and bench/results/distributed.json.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, make_console  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
MODELS = {  # name: trainer flags (a tenth of the data: the test split scored at the end stays small)
    "quickstart": ["--config", "configs/quickstart.yaml"],
    "small": ["--init", "small", "--tokenizer-vocab-size", "0", "--augment-copies", "0"],
}
LINKS_GBPS = {"10 GbE (assumed 1.1 GB/s)": 1.1, "Thunderbolt 4/5 IP (assumed 3 GB/s)": 3.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(model: str, ranks: int, steps: int, batch: int, out: Path) -> dict:
    flags = [*MODELS[model], "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
             "--max-minutes", "none", "--eval-every", "0", "--eval-samples", "16", "--eval-max-new-tokens", "4",
             "--sample-fraction", "0.1", "--log-every", str(steps), "--dropout", "0"]
    python = [sys.executable, "-m", "mlx_t5.train", *flags]
    if ranks > 1:
        python = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port()),
                  "--python", sys.executable, "--", "-m", "mlx_t5.train", *flags]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(max(1, os.cpu_count() // ranks)))
    done = subprocess.run(python, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(python)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def parameters(model: str) -> int:
    from mlx.utils import tree_flatten

    from mlx_t5.init import init_model

    shape = ROOT / "configs/models/t5-task.json" if model == "quickstart" else "small"
    return sum(v.size for _, v in tree_flatten(init_model(shape).parameters()))


def allreduce_worker(nbytes: int, reps: int):
    """Run under mlx.launch: rank 0 prints seconds per all_sum of `nbytes` float32 bytes."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True)
    x = mx.ones((nbytes // 4,))
    for _ in range(3):
        mx.eval(mx.distributed.all_sum(x, group=group))
    start = time.perf_counter()
    for _ in range(reps):
        x = mx.distributed.all_sum(x, group=group) * 0.5
        mx.eval(x)
    if group.rank() == 0:
        print(json.dumps({"seconds": (time.perf_counter() - start) / reps}))


def allreduce_seconds(nbytes: int, reps: int = 10) -> float:
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--python",
           sys.executable, "--", str(Path(__file__).resolve()), "--allreduce-worker", str(nbytes), "--reps", str(reps)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"all-reduce benchmark failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])["seconds"]


def projection(per_sample: float, batch: int, grad_bytes: int, link: float) -> list[dict]:
    rows = []
    for n in (1, 2, 4, 8):
        comm = 2 * (n - 1) / n * grad_bytes / (link * 1e9)
        step = per_sample * batch / n + comm
        rows.append({"machines": n, "step_s": step, "comm_s": comm, "speedup": per_sample * batch / step})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="quickstart,small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch (each of 2 ranks trains half)")
    parser.add_argument("--allreduce-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_worker is not None:
        return allreduce_worker(args.allreduce_worker, args.reps)

    from rich.table import Table

    console = make_console()
    results = {"cpu": cpu_name(), "batch": args.batch, "steps": args.steps, "models": {}}
    for model in args.models.split(","):
        params = parameters(model)
        with tempfile.TemporaryDirectory() as tmp:
            one = train(model, 1, args.steps, args.batch, Path(tmp) / "one")
            two = train(model, 2, args.steps, args.batch, Path(tmp) / "two")
        seconds = allreduce_seconds(params * 4)
        loopback = 2 * (2 - 1) / 2 * params * 4 / seconds / 1e9  # bus bandwidth, GB/s
        per_sample = 1 / one["train_samples_per_second"]
        links = {"loopback (measured)": loopback, **LINKS_GBPS}
        results["models"][model] = {
            "parameters": params, "gradient_mb": params * 4 / 1e6,
            "samples_per_second": {"1 process": one["train_samples_per_second"],
                                   "2 processes": two["train_samples_per_second"]},
            "allreduce_seconds": seconds, "loopback_bus_gb_per_s": loopback,
            "projection": {name: projection(per_sample, args.batch, params * 4, bw) for name, bw in links.items()},
        }
        console.print(f"[bold]{model}[/] ({params / 1e6:.1f}M parameters, {params * 4 / 1e6:.0f} MB of gradients): "
                      f"1 process {one['train_samples_per_second']:.1f} samples/s, 2 processes "
                      f"{two['train_samples_per_second']:.1f} ({two['train_samples_per_second'] / one['train_samples_per_second']:.2f}x); "
                      f"all-reduce {seconds * 1e3:.1f} ms ({loopback:.2f} GB/s over loopback)", highlight=False)
        table = Table(title=f"{model}: projected step time, global batch {args.batch} ({results['cpu']} per machine)")
        table.add_column("link")
        for n in (1, 2, 4, 8):
            table.add_column(f"{n} machine{'s' if n > 1 else ''}", justify="right")
        for name, rows in results["models"][model]["projection"].items():
            table.add_row(name, *(f"{r['step_s'] * 1e3:.0f} ms ({r['speedup']:.2f}x)" for r in rows))
        console.print(table)
    out = ROOT / "bench" / "results" / "distributed.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
