"""Serving latency and throughput through HTTP, one backend after another.

    python bench/serve_bench.py                       # onnx, torch-int8, mlx; flan-t5-small shape, random init
    python bench/serve_bench.py --backends mlx --requests 100 --model runs/base/final

Starts `python api.py --ignore-eos` for each backend on a free local port, sends 24-token queries
(prompt included) that each generate exactly 30 tokens, and measures p50/p95 latency one request at
a time and throughput (queries/s) with 8 and 32 concurrent clients. Writes a rich table and
bench/results/serve.json. Random weights do not change the speed: shapes, not values, set the cost.
"""

import argparse
import json
import os

# before torch is imported: idle OpenMP workers must not spin (api.py and chat.py do the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reformulation.data import format_source  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402

SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "flan-t5-small"
DATA = SHARED / "datasets" / "full.jsonl"


def build_model(folder: Path) -> Path:
    """flan-t5-small's real config (from the shared tokenizer folder) with random weights, untied head."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = T5Config.from_pretrained(str(TOKENIZER))
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(folder)
    return folder


def pick_queries(tokenizer_dir: Path, n: int, length: int) -> list[str]:
    """Real queries from full.jsonl whose model input (prompt + query + </s>) is exactly `length` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    found, seen = [], set()
    if DATA.is_file():
        with DATA.open() as f:
            for line in f:
                query = json.loads(line)["query"]
                if query not in seen and len(tok(format_source(query))["input_ids"]) == length:
                    seen.add(query)
                    found.append(query)
                    if len(found) == n:
                        return found
    # no data (or too few): pad generic questions word by word to the length
    i = 0
    while len(found) < n:
        words = f"Who lived longer, person number {i} or".split()
        while len(tok(format_source(" ".join(words)))["input_ids"]) < length:
            words.append("someone")
        query = " ".join(words)
        if len(tok(format_source(query))["input_ids"]) == length:
            found.append(query)
        i += 1
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, backend: str, port: int, threads, args, extra=(), stderr=subprocess.PIPE
                 ) -> subprocess.Popen:
    """`python api.py` on `port`, once /healthz answers. extra: more flags (a repeated flag overrides);
    stderr: where the server's log goes (a pipe is read only if it exits early: pass a file for long runs)."""
    import httpx

    # "onnx-batches": the onnx backend generating each micro-batch as one batch (api.py --onnx-batches)
    flags = ["--backend", "onnx", "--onnx-batches"] if backend == "onnx-batches" else ["--backend", backend]
    cmd = [sys.executable, str(ROOT / "api.py"), "--model", str(model), *flags, "--port", str(port),
           "--ignore-eos", "--log-level", "warning", "--timeout", "600", "--max-batch", str(args.max_batch),
           "--batch-window-ms", str(args.batch_window_ms)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd + list(extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{backend} server exited: {proc.stderr.read().strip() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{backend} server did not come up in 300 s")


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_load(url: str, queries: list[str], concurrency: int, total: int, max_new_tokens: int) -> dict:
    """`concurrency` clients, each with its own connection, sending `total` requests between them."""
    import httpx

    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(total))

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                r = http.post("/v1/reformulate", json={"query": queries[i % len(queries)],
                                                       "max_new_tokens": max_new_tokens})
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    (latencies if r.status_code == 200 else errors).append(elapsed if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"concurrency": concurrency, "requests": total, "seconds": round(wall, 3),
            "queries_per_s": round(total / wall, 2), "p50_ms": round(percentile(latencies, 0.5), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1), "mean_ms": round(statistics.mean(latencies), 1)}


def cpu_seconds(pid: int):
    """User + system CPU time of the server so far (None without psutil): robust to a shared CPU."""
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def bench_backend(model: Path, backend: str, threads, queries: list[str], args) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, backend, port, threads, args)
    try:
        run_load(url, queries, 1, args.warmup, args.new_tokens)  # compile paths, fill caches
        result = {"backend": backend, "threads": threads or "default", "runs": []}
        cpu_before = cpu_seconds(proc.pid)
        result["runs"].append(run_load(url, queries, 1, args.requests, args.new_tokens))
        if cpu_before is not None:
            # server CPU time per query: on a quiet machine with 1 thread this is the latency floor
            result["runs"][0]["server_cpu_ms_per_query"] = round(
                (cpu_seconds(proc.pid) - cpu_before) * 1000 / args.requests, 1)
        for concurrency in args.concurrency:
            total = max(args.requests, concurrency * args.rounds)
            try:
                result["runs"].append(run_load(url, queries, concurrency, total, args.new_tokens))
            except RuntimeError as err:  # keep what was measured; say what failed
                result["runs"].append({"concurrency": concurrency, "requests": total, "error": str(err)})
        info = httpx.get(f"{url}/v1/model").json()
        result["server"] = {k: info.get(k) for k in ("dtype", "device", "blas", "blas_threads", "torch_threads",
                                                     "parameters")}
        result["server"]["batching"] = info["serving"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


DIRECT_THREADS = {"mlx": 1}  # OpenBLAS spin-waits: 1 thread measured best for MLX here (see the HTTP runs)


def direct_ab(model: Path, backends: list[str], queries: list[str], n: int, new_tokens: int) -> dict:
    """In-process, no HTTP, backends interleaved query by query: a fair A/B when the CPU is shared and
    its load drifts (each backend sees the same load). Wall and CPU milliseconds per query."""
    from serving.backends import make_backend

    loaded = [make_backend(name).load(model, threads=DIRECT_THREADS.get(name)) for name in backends]
    for backend in loaded:
        backend.generate(queries[:1], max_new_tokens=new_tokens, ignore_eos=True)
    wall = {b.name: [] for b in loaded}
    cpu = {b.name: 0.0 for b in loaded}
    for query in queries[:n]:
        for backend in loaded:
            c0, w0 = time.process_time(), time.perf_counter()
            backend.generate([query], max_new_tokens=new_tokens, ignore_eos=True)
            wall[backend.name].append((time.perf_counter() - w0) * 1000)
            cpu[backend.name] += time.process_time() - c0
    return {name: {"queries": len(v), "threads": DIRECT_THREADS.get(name, "default"),
                   "p50_ms": round(percentile(v, 0.5), 1), "p95_ms": round(percentile(v, 0.95), 1),
                   "min_ms": round(min(v), 1), "cpu_ms_per_query": round(cpu[name] * 1000 / len(v), 1)}
            for name, v in wall.items()}


def main(argv=None) -> int:
    from machine import make_console
    from rich.markup import escape
    from rich.table import Table

    from serving.backends import BACKENDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="onnx,torch-int8,mlx",
                        help=f"comma-separated, from {', '.join(BACKENDS)} and onnx-batches (onnx with --onnx-batches)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: flan-t5-small shape, random)")
    parser.add_argument("--requests", type=int, default=40, help="requests at concurrency 1 (default 40)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", default="8,32", help="concurrency levels for throughput (default 8,32)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client at each concurrency (default 4)")
    parser.add_argument("--query-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--threads", default="", help="comma-separated thread counts to try per backend "
                                                      "(e.g. 1,2; default: the library's own)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--direct", type=int, default=20,
                        help="queries for the in-process interleaved A/B of the backends (0 = skip; default 20)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS + ("onnx-batches",)]
    console = make_console()
    if unknown:
        console.print(f"[red]error:[/] unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        return 2
    if not TOKENIZER.is_dir():
        console.print(f"[red]error:[/] {TOKENIZER} not found: the benchmark needs ../shared beside the checkout")
        return 2

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model = args.model
        if model is None:
            with console.status("building a random flan-t5-small"):
                model = build_model(Path(tmp) / "flan-t5-small-random")
        queries = pick_queries(model if (Path(model) / "tokenizer.json").is_file() else TOKENIZER, 200,
                               args.query_tokens)
        results = []
        for backend in backends:
            for threads in [int(t) for t in args.threads.split(",") if t] or [None]:
                label = f"{backend}, {threads or 'default'} threads"
                with console.status(f"benchmarking {label}"):
                    results.append(bench_backend(Path(model), backend, threads, queries, args))
                c1 = results[-1]["runs"][0]
                console.print(f"{label}: p50 {c1['p50_ms']} ms at concurrency 1, server CPU "
                              f"{c1.get('server_cpu_ms_per_query', '?')} ms per query")
        direct = {}
        if args.direct and len(backends) > 1:
            with console.status(f"in-process A/B, {args.direct} queries, backends interleaved"):
                direct = direct_ab(Path(model), [b for b in backends if b != "onnx-batches"], queries, args.direct,
                                   args.new_tokens)

    table = Table(title=f"serving, {args.query_tokens}-token queries -> {args.new_tokens} tokens, through HTTP")
    for column in ("backend", "threads", "clients", "n", "p50 ms", "p95 ms", "q/s", "CPU ms/q", "max batch"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for result in results:
        for run in result["runs"]:
            if "error" in run:
                table.add_row(result["backend"], str(result["threads"]), str(run["concurrency"]), str(run["requests"]),
                              f"[red]{escape(run['error'][:60])}[/]")
                continue
            cpu = run.get("server_cpu_ms_per_query")
            table.add_row(result["backend"], str(result["threads"]), str(run["concurrency"]), str(run["requests"]),
                          f"{run['p50_ms']:.1f}", f"{run['p95_ms']:.1f}", f"{run['queries_per_s']:.2f}",
                          "" if cpu is None else f"{cpu:.1f}",
                          str(result["server"]["batching"]["largest_batch"]) if run is result["runs"][-1] else "")
    console.print(table)
    if direct:
        ab = Table(title="in-process, backends interleaved query by query (no HTTP)")
        for column in ("backend", "threads", "n", "p50 ms", "p95 ms", "min ms", "CPU ms/q"):
            ab.add_column(column, justify="left" if column == "backend" else "right")
        for name, row in direct.items():
            ab.add_row(name, str(row["threads"]), str(row["queries"]), f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}",
                       f"{row['min_ms']:.1f}", f"{row['cpu_ms_per_query']:.1f}")
        console.print(ab)
    record = {
        "benchmark": "serve", "model": str(args.model) if args.model else "flan-t5-small shape, random init",
        "query_tokens": args.query_tokens, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
        "batch_window_ms": args.batch_window_ms,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
        "direct_interleaved": direct,
    }
    atomic_write_json(args.out, record)
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
                  f"[dim](load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores: other processes share this CPU)[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
