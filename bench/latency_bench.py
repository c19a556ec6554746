"""Greedy decoding latency at batch 1: MLX fp32 / bf16 / q8 / q4 against torch fp32 / int8, same weights.

torch-fp32 / torch-int8 decode with torch_t5.greedy (what api.py and chat.py run); torch-*-generate
decode the same models with transformers' generate, the baseline of the ratios; onnx-int8 / onnx-fp32
run the model exported by onnx_t5 in ONNX Runtime (the onnx serving backend; 1 thread unless
OMP_NUM_THREADS says otherwise).

    python bench/latency_bench.py                          # flan-t5-small shape, random init
    python bench/latency_bench.py --repeats 15 --backends mlx-fp32 mlx-q8 torch-fp32
    python bench/latency_bench.py --model runs/base/final  # a trained checkpoint instead

Every backend turns the same 24-token input (prompt and </s> included) into exactly 30 new tokens (EOS
ignored, KV cache on). Reported: the median of --repeats runs after --warmup runs, in one process; the
backends take turns run by run, so a busy moment of a shared machine slows all of them alike. Random
weights do not change the speed: shapes, not values, set the cost. Thread counts follow the environment
(OPENBLAS_NUM_THREADS for MLX's BLAS, OMP_NUM_THREADS for torch); both are recorded in the JSON.
Writes a rich table and bench/results/latency.json.
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx_t5  # noqa: E402  (before mlx: preloads OpenBLAS on Linux)

from reformulation.constants import GROUP_SIZE  # noqa: E402
from reformulation.data import format_source  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402

SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "flan-t5-small"
QUERY = "Who lived longer, Nikola Tesla or Milutin Milankovic, and which of them was born in the Austrian Empire?"
# torch-*: torch_t5.greedy (what api.py / chat.py run); torch-*-generate: transformers' generate, same model
BACKENDS = ("mlx-fp32", "mlx-bf16", "mlx-q8", "mlx-q4", "onnx-int8", "onnx-fp32", "torch-fp32", "torch-int8",
            "torch-fp32-generate", "torch-int8-generate")


def input_ids(tokenizer, length: int) -> list[int]:
    """Exactly `length` ids: the prompt's tokens, cut (or repeated) to length - 1, then </s>."""
    ids = tokenizer(format_source(QUERY)).input_ids[:-1]
    while len(ids) < length - 1:
        ids = ids + ids
    return ids[: length - 1] + [tokenizer.eos_token_id]


def random_model(folder: Path) -> Path:
    from hf_models import save_model

    return save_model("flan-small", folder, TOKENIZER)


def mlx_runner(folder: Path, backend: str, ids: list[int], new_tokens: int):
    import mlx.core as mx

    from mlx_t5.quantize import quantize_model

    model, _ = mlx_t5.load(folder, dtype="bfloat16" if backend == "mlx-bf16" else "float32")
    if backend in ("mlx-q8", "mlx-q4"):
        quantize_model(model, bits=int(backend[-1]), group_size=GROUP_SIZE)
    x, mask = mx.array([ids]), mx.ones((1, len(ids)), dtype=mx.int32)

    def run():
        out = mlx_t5.generate_tokens(model, x, mask, max_new_tokens=new_tokens, ignore_eos=True)
        assert len(out[0]) == new_tokens, len(out[0])

    return run


def torch_runner(model, backend: str, ids: list[int], new_tokens: int):
    import torch

    from torch_t5.greedy import GreedyDecoder

    if backend.startswith("torch-int8"):
        from torch_t5.int8 import quantize_model

        model = copy.deepcopy(model)
        quantize_model(model)
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    greedy = None if backend.endswith("-generate") else GreedyDecoder(model)

    def run():
        with torch.inference_mode():
            if greedy is None:
                out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, num_beams=1)
            else:
                out = greedy(x, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert out.shape[1] == new_tokens + 1, out.shape  # + decoder_start_token_id

    return run


def onnx_runner(model, folder: Path, backend: str, ids: list[int], new_tokens: int):
    """onnx_t5 (the onnx serving backend): the model exported to ONNX Runtime, int8 or float32, 1 thread."""
    import numpy as np

    from onnx_t5 import OnnxT5
    from onnx_t5.export import export_folder

    folder.mkdir(parents=True)
    export_folder(model, folder, quantize=backend == "onnx-int8")
    onnx_model = OnnxT5(folder, threads=int(os.environ.get("OMP_NUM_THREADS", 1)))
    x = np.array([ids])
    mask = np.ones_like(x)

    def run():
        out = onnx_model.generate(x, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert out.shape[1] == new_tokens + 1, out.shape

    return run


def measure(runs: dict, warmup: int, repeats: int, progress, task) -> dict[str, list[float]]:
    """Round-robin: repeat r times every backend in turn, so a busy moment of the machine hits all alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            progress.update(task, description=f"run {r + 1}/{repeats}: {name}")
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
        progress.advance(task)
    return times


def main(argv=None) -> int:
    import torch
    from machine import make_console
    from rich.progress import Progress
    from rich.table import Table
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: flan-t5-small shape, random init)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--input-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency.json"))
    args = parser.parse_args(argv)

    console = make_console()
    if not TOKENIZER.is_dir() and args.model is None:
        console.print(f"[red]error:[/] {TOKENIZER} not found (needs ../shared beside the checkout)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else random_model(Path(tmp) / "flan-small")
        tokenizer = AutoTokenizer.from_pretrained(str(folder if (folder / "tokenizer.json").is_file() else TOKENIZER))
        ids = input_ids(tokenizer, args.input_tokens)
        torch_model = T5ForConditionalGeneration.from_pretrained(folder).eval()
        runs = {}
        with console.status("loading and quantizing"):
            for backend in args.backends:
                if backend.startswith("mlx"):
                    runs[backend] = mlx_runner(folder, backend, ids, args.new_tokens)
                elif backend.startswith("onnx"):
                    runs[backend] = onnx_runner(torch_model, Path(tmp) / backend, backend, ids, args.new_tokens)
                else:
                    runs[backend] = torch_runner(torch_model, backend, ids, args.new_tokens)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warmup", total=args.repeats)
            times = measure(runs, args.warmup, args.repeats, progress, task)
        results = []
        for backend, t in times.items():
            median = statistics.median(t)
            results.append({"backend": backend, "ms_per_query": median, "ms_per_token": median / args.new_tokens,
                            "min_ms": min(t), "max_ms": max(t), "runs_ms": t})

    base = next((r["ms_per_query"] for r in results if r["backend"] == "torch-fp32-generate"), None)
    table = Table(title=f"batch 1, {args.input_tokens} tokens in -> {args.new_tokens} out, median of {args.repeats}")
    for column in ("backend", "ms/query", "ms/token", "min-max ms", "vs torch fp32 generate"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in results:
        r["vs_torch_fp32_generate"] = r["ms_per_query"] / base if base else None
        ratio = f"{r['vs_torch_fp32_generate']:.2f}x" if base else "-"
        table.add_row(r["backend"], f"{r['ms_per_query']:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{r['min_ms']:.0f}-{r['max_ms']:.0f}", ratio)
    console.print(table)

    import mlx.core as mx

    report = {
        "model": args.model or "flan-t5-small shape, random init",
        "input_tokens": args.input_tokens, "new_tokens": args.new_tokens, "batch": 1,
        "warmup": args.warmup, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "mlx": mx.__version__, "mlx_device": str(mx.default_device()), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    atomic_write_json(args.out, report)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
