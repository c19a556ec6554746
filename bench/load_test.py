"""Load test of api.py: many concurrent clients, valid and hostile requests mixed, for a fixed time.

    python bench/load_test.py                                  # 200 clients, 60 s, onnx, flan-t5-small shape
    python bench/load_test.py --clients 50 --seconds 10 --hostile 0.5 --model runs/base/final

Starts `python api.py` (serve_bench's server start, with the production timeout) on a free local port,
records the answer of every distinct valid request sent one at a time, then runs `--clients` clients
for `--seconds`, each on its own connection, each request valid or hostile at random (`--hostile`).
Hostile ones: bad JSON, deep nesting, wrong types, blank or too long text, both or neither field,
sampling with beams, unknown fields, a 300 KB body, a 2 MB body, no content type, wrong methods and
paths, a body cut off by a client that hangs up. A client that gets 429 waits its Retry-After.

Reports, and writes to bench/results/load.json: every status by kind, 5xx (must be 0), dropped
connections (transport errors a client did not cause itself; must be 0), valid answers that differ from
their sequential answer (must be 0), p50/p99 latency of the answered valid requests and of the hostile
ones, and the queue depth (/healthz `queued`, sampled every 0.25 s). Exit status 1 if any must-be-0
count is not 0.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from serve_bench import (ROOT, TOKENIZER, build_model, free_port, percentile, pick_queries,  # noqa: E402
                         start_server)

from reformulation.io import atomic_write_json  # noqa: E402

JSON = {"content-type": "application/json"}


def valid_requests(queries: list[str], n: int, max_new_tokens: int, rng: random.Random) -> list[dict]:
    """`n` distinct valid bodies: mostly one greedy query, some batches of 2-4, some beam searches."""
    bodies = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.7:
            bodies.append({"query": queries[i % len(queries)], "max_new_tokens": max_new_tokens})
        elif kind < 0.9:
            k = rng.randint(2, 4)
            bodies.append({"queries": [queries[(i + j) % len(queries)] for j in range(k)],
                           "max_new_tokens": max_new_tokens})
        else:
            bodies.append({"query": queries[i % len(queries)], "max_new_tokens": max_new_tokens, "num_beams": 2})
    return bodies


# name -> (method, path, body bytes or None, headers); each must get a 4xx, never a 5xx or a dropped connection
HOSTILE = {
    "invalid_json": ("POST", "/v1/reformulate", b'{"query": "unterminated', JSON),
    "deep_nesting": ("POST", "/v1/reformulate", b"[" * 100_000, JSON),
    "not_an_object": ("POST", "/v1/reformulate", b'["a"]', JSON),
    "neither_field": ("POST", "/v1/reformulate", b"{}", JSON),
    "both_fields": ("POST", "/v1/reformulate", b'{"query": "a", "queries": ["b"]}', JSON),
    "null_query": ("POST", "/v1/reformulate", b'{"query": null}', JSON),
    "blank": ("POST", "/v1/reformulate", b'{"query": " \\t\\u3000"}', JSON),
    "lone_surrogate": ("POST", "/v1/reformulate", b'{"query": "\\ud800"}', JSON),
    "too_long": ("POST", "/v1/reformulate", json.dumps({"query": "x" * 1001}).encode(), JSON),
    "too_many": ("POST", "/v1/reformulate", json.dumps({"queries": ["q"] * 65}).encode(), JSON),
    "string_int": ("POST", "/v1/reformulate", b'{"query": "a", "num_beams": "2"}', JSON),
    "huge_tokens": ("POST", "/v1/reformulate", b'{"query": "a", "max_new_tokens": 1e308}', JSON),
    "sampling_beams": ("POST", "/v1/reformulate", b'{"query": "a", "temperature": 0.5, "num_beams": 2}', JSON),
    "unknown_field": ("POST", "/v1/reformulate", b'{"query": "a", "top_k": 3}', JSON),
    "body_300k": ("POST", "/v1/reformulate", b'{"query": "' + b"x" * 300_000 + b'"}', JSON),
    "body_2m": ("POST", "/v1/reformulate", b'{"query": "' + b"x" * 2_000_000 + b'"}', JSON),
    "no_content_type": ("POST", "/v1/reformulate", b'{"query": "a"}', {}),
    "form": ("POST", "/v1/reformulate", b"query=a", {"content-type": "application/x-www-form-urlencoded"}),
    "trace": ("TRACE", "/v1/reformulate", None, {}),
    "delete_health": ("DELETE", "/healthz", None, {}),
    "not_found": ("GET", "/v1/nothing", None, {}),
    "cut_off": None,  # raw socket: announces 1000 bytes, sends 10, hangs up (no answer expected)
}


async def cut_off(port: int) -> None:
    """A client that announces a body, sends part of it and hangs up: the server must shrug it off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/reformulate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"query\": ")
    await writer.drain()
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def run_load(url: str, port: int, bodies: list[dict], want: list, clients: int, seconds: float,
                   hostile: float, seed: int) -> dict:
    import httpx

    statuses, latencies, hostile_latencies = Counter(), [], []
    problems = {"5xx": [], "dropped": [], "mismatch": [], "unexpected": []}
    depth = []
    deadline = time.monotonic() + seconds
    retry_waits = [0]

    async def client(i: int):
        rng = random.Random(seed * 1000 + i)
        # one connection per client, kept alive between its requests; timeout above the server's 504
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as http:
            while time.monotonic() < deadline:
                if rng.random() >= hostile:
                    k = rng.randrange(len(bodies))
                    start = time.perf_counter()
                    try:
                        r = await http.post("/v1/reformulate", json=bodies[k])
                    except httpx.TransportError as err:
                        problems["dropped"].append(f"valid: {type(err).__name__}: {err}")
                        continue
                    elapsed = (time.perf_counter() - start) * 1000
                    statuses[f"valid {r.status_code}"] += 1
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        if r.json()["subqueries"] != want[k]:
                            problems["mismatch"].append({"request": bodies[k], "got": r.json()["subqueries"],
                                                         "want": want[k]})
                    elif r.status_code == 429:  # a polite client waits as told
                        wait = float(r.headers["retry-after"])
                        retry_waits[0] += 1
                        await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                    elif r.status_code >= 500:
                        problems["5xx"].append(f"valid: {r.status_code} {r.text[:200]}")
                    else:
                        problems["unexpected"].append(f"valid: {r.status_code} {r.text[:200]}")
                    continue
                name = rng.choice(list(HOSTILE))
                start = time.perf_counter()
                if HOSTILE[name] is None:
                    try:
                        await cut_off(port)
                    except OSError as err:  # could not even connect: the server refused a connection
                        problems["dropped"].append(f"{name}: {type(err).__name__}: {err}")
                    statuses[f"{name} (hung up)"] += 1
                    continue
                method, path, content, headers = HOSTILE[name]
                try:
                    r = await http.request(method, path, content=content, headers=headers)
                except httpx.TransportError as err:
                    problems["dropped"].append(f"{name}: {type(err).__name__}: {err}")
                    continue
                hostile_latencies.append((time.perf_counter() - start) * 1000)
                statuses[f"{name} {r.status_code}"] += 1
                if r.status_code >= 500:
                    problems["5xx"].append(f"{name}: {r.status_code} {r.text[:200]}")
                elif not 400 <= r.status_code < 500 or "error" not in r.json():
                    problems["unexpected"].append(f"{name}: {r.status_code} {r.text[:200]}")

    async def sample_depth():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    depth.append((await http.get("/healthz")).json()["queued"])
                except httpx.TransportError as err:
                    problems["dropped"].append(f"healthz: {type(err).__name__}: {err}")
                await asyncio.sleep(0.25)

    start = time.monotonic()
    await asyncio.gather(sample_depth(), *(client(i) for i in range(clients)))
    wall = time.monotonic() - start

    def stats(values):
        return {"n": len(values), "p50": round(percentile(values, 0.5), 1), "p99": round(percentile(values, 0.99), 1),
                "max": round(max(values), 1)} if values else {"n": 0}

    answered = sum(v for k, v in statuses.items() if k == "valid 200")
    return {"clients": clients, "seconds": round(wall, 1), "hostile_fraction": hostile,
            "requests": sum(statuses.values()), "valid_answered": answered,
            "valid_answered_per_s": round(answered / wall, 2), "waited_retry_after": retry_waits[0],
            "statuses": dict(sorted(statuses.items())), "counts": {k: len(v) for k, v in problems.items()},
            "examples": {k: v[:5] for k, v in problems.items() if v},
            "valid_latency_ms": stats(latencies), "hostile_latency_ms": stats(hostile_latencies),
            "queue_depth": stats(depth)}


def sequential_answers(url: str, bodies: list[dict]) -> list:
    """Each valid request alone, one at a time: the answer every concurrent copy must match."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:
        answers = []
        for body in bodies:
            r = http.post("/v1/reformulate", json=body)
            r.raise_for_status()
            answers.append(r.json()["subqueries"])
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hostile", type=float, default=0.4, help="fraction of requests that are hostile")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: flan-t5-small shape, random)")
    parser.add_argument("--distinct", type=int, default=60, help="distinct valid requests (answered alone first)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per answer (exactly: --ignore-eos)")
    parser.add_argument("--query-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or not 0 <= args.hostile <= 1 or args.distinct < 1:
        parser.error("--clients and --distinct must be >= 1, --seconds > 0, --hostile in [0, 1]")
    if args.model is None and not TOKENIZER.is_dir():
        parser.error(f"{TOKENIZER} not found: the default model needs ../shared beside the checkout")

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        model = args.model or build_model(Path(tmp) / "flan-t5-small-random")
        queries = pick_queries(model if (Path(model) / "tokenizer.json").is_file() else TOKENIZER, args.distinct,
                               args.query_tokens)
        bodies = valid_requests(queries, args.distinct, args.new_tokens, rng)
        port = free_port()
        log = open(Path(tmp) / "server.log", "w+")  # a pipe nobody reads during the run could fill and block it
        # the production timeout (serve_bench's 600 s would hide 504s); --ignore-eos: every answer costs the same
        proc = start_server(Path(model), args.backend, port, None, args, extra=("--timeout", "30"), stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"server up ({args.backend}); {len(bodies)} distinct valid requests, answered one at a time",
                  file=sys.stderr)
            want = sequential_answers(url, bodies)
            print(f"{args.clients} clients for {args.seconds:g} s, {args.hostile:.0%} hostile", file=sys.stderr)
            result = asyncio.run(run_load(url, port, bodies, want, args.clients, args.seconds, args.hostile,
                                          args.seed))
            import httpx

            result["server"] = httpx.get(f"{url}/v1/model", timeout=30).json()["serving"]
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            server_err = log.read()
            log.close()
    result["server_tracebacks"] = server_err.count("Traceback")
    record = {"benchmark": "load", "backend": args.backend,
              "model": str(args.model) if args.model else "flan-t5-small shape, random init",
              "new_tokens": args.new_tokens, "query_tokens": args.query_tokens, "max_batch": args.max_batch,
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              **result}
    atomic_write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("requests", "valid_answered", "valid_answered_per_s", "counts",
                                             "valid_latency_ms", "hostile_latency_ms", "queue_depth",
                                             "server_tracebacks")}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    bad = sum(result["counts"][k] for k in ("5xx", "dropped", "mismatch", "unexpected")) + result["server_tracebacks"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
