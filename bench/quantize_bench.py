"""What MLX quantization costs in quality and buys in size and speed: fp32 vs bf16 / q8 / q4, same run.

    python bench/quantize_bench.py                       # 2 min of training, then the measurements
    python bench/quantize_bench.py --train-seconds 120 --skip-flan

Two models, because no pretrained weights are reachable here:
- "trained tiny": a 2+2-layer T5 (d_model 128) trained from scratch for --train-seconds on the first
  --examples rows of full.jsonl until it reproduces their subqueries; measured on those queries. Its
  vocabulary is only the token ids those rows use (renumbered), so a minute on 2 CPU cores is enough.
- "flan-t5-small": the real shape with random weights (sizes and speed are real; its greedy outputs are
  noise, so agreement there is a worst case: near-tied logits flip under any perturbation).
Per variant: size on disk; vs fp32 on teacher-forced target positions, the relative logits error
||q - f|| / ||f|| and the next-token argmax agreement; greedy agreement with fp32 (identical output
sequences); median ms/query of greedy decoding at batch 1.
Writes a rich table and bench/results/quantize.json.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before OpenBLAS loads: one BLAS thread. This model's matrices are small, and on a shared 2-core box two
# spinning OpenBLAS threads made a training step ~5x slower (0.2 s -> 1 s) than one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx_t5  # noqa: E402  (before mlx: preloads OpenBLAS on Linux)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_t5.quantize import quantize_model  # noqa: E402
from reformulation.constants import GROUP_SIZE  # noqa: E402
from reformulation.data import load_examples, pad_batch, shift_right, tokenize  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402

SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "flan-t5-small"
DATA = SHARED / "datasets" / "full.jsonl"
TINY = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
VARIANTS = ("fp32", "bf16", "q8", "q4")
MAX_LENGTH = 32
BATCH = 16


def batches(data: dict, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(data["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield to_arrays(data, rows)


def to_arrays(data: dict, rows, length: int = MAX_LENGTH) -> tuple:
    """One fixed padded length: the compiled step is traced once, not once per batch shape."""
    ids = pad_batch([data["input_ids"][i] for i in rows], 0, length)
    labels = pad_batch([data["labels"][i] for i in rows], -100, length)
    return mx.array(ids), mx.array((ids != 0).astype(np.int32)), mx.array(shift_right(labels)), mx.array(labels)


def compact_vocab(data: dict) -> tuple[dict, int]:
    """Renumber the ids the data uses to 0..n-1 (pad 0 and </s> 1 kept): a 32k-row softmax would dominate."""
    used = sorted({0, 1}.union(*data["input_ids"], *data["labels"]))
    index = {old: new for new, old in enumerate(used)}
    remap = {k: [[index[t] for t in seq] for seq in data[k]] for k in ("input_ids", "labels")}
    return remap, len(used)


def train_tiny(data: dict, vocab_size: int, seconds: float, console) -> tuple:
    from mlx_t5.init import init_model

    model = init_model(dict(TINY, vocab_size=vocab_size), seed=0)
    optimizer = optim.Adam(learning_rate=3e-3)
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: mlx_t5.loss_fn(m, *b)[0])

    def step(*batch):
        loss, grads = loss_and_grad(model, *batch)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
    rng, start, steps, loss = np.random.default_rng(0), time.perf_counter(), 0, float("nan")
    with console.status("training the tiny model") as status:
        while time.perf_counter() - start < seconds:
            for batch in batches(data, BATCH, rng):
                if len(batch[0]) < BATCH:  # a short last batch would be a new shape to compile
                    continue
                loss = step(*batch)
                mx.eval(model.state, optimizer.state)
                steps += 1
                status.update(f"training the tiny model: step {steps}, loss {loss.item():.3f}")
    model.eval()
    return model, {"steps": steps, "final_loss": loss.item(), "seconds": time.perf_counter() - start}


def variant(model, name: str):
    clone = mlx_t5.Model(copy.deepcopy(model.args))
    clone.load_weights(tree_flatten(model.parameters()))
    clone.eval()
    if name == "bf16":
        clone.set_dtype(mx.bfloat16)
    elif name in ("q8", "q4"):
        quantize_model(clone, bits=int(name[1]), group_size=GROUP_SIZE)
    mx.eval(clone.parameters())
    return clone


def disk_size(model, folder: Path) -> int:
    mlx_t5.save(model, None, folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def logits(model, batch) -> np.ndarray:
    """Teacher-forced logits at the target positions only (padding positions are never used)."""
    ids, mask, dec, labels = batch
    return np.array(model(ids, dec, mask).astype(mx.float32))[np.array(labels) != -100]


def greedy(model, queries: list[list[int]], ignore_eos: bool, new_tokens: int) -> tuple[list, list]:
    """Greedy ids for each query (token ids) at batch 1, and the ms each took."""
    outputs, times = [], []
    for q in queries:
        ids, mask = mx.array([q]), mx.ones((1, len(q)), dtype=mx.int32)
        start = time.perf_counter()
        out = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=new_tokens, ignore_eos=ignore_eos)
        times.append((time.perf_counter() - start) * 1000)
        outputs.append(out[0])
    return outputs, times


def measure(name: str, model, batch, queries, ignore_eos: bool, new_tokens: int, tmp: Path, console):
    rows, reference = [], None
    for v in VARIANTS:
        with console.status(f"{name}: {v}"):
            m = variant(model, v)
            out, times = greedy(m, queries, ignore_eos, new_tokens)
            lg = logits(m, batch)
            size = disk_size(m, tmp / f"{name}-{v}")
        if reference is None:
            reference = {"logits": lg, "out": out, "size": size}
        rows.append({
            "model": name, "variant": v, "bytes": size, "size_vs_fp32": size / reference["size"],
            "logits_rel_error": float(np.linalg.norm(lg - reference["logits"]) / np.linalg.norm(reference["logits"])),
            "next_token_agreement": float((lg.argmax(-1) == reference["logits"].argmax(-1)).mean()),
            "greedy_agreement": sum(a == b for a, b in zip(out, reference["out"])) / len(out),
            "ms_per_query": statistics.median(times),
            "mean_new_tokens": sum(map(len, out)) / len(out),
        })
    return rows, reference["out"]


def main(argv=None) -> int:
    from machine import make_console
    from rich.table import Table
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=320, help="rows of full.jsonl to train the tiny model on")
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument("--queries", type=int, default=48, help="queries for greedy agreement / latency")
    parser.add_argument("--skip-flan", action="store_true", help="only the trained tiny model")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = parser.parse_args(argv)

    console = make_console()
    if not DATA.is_file() or not TOKENIZER.is_dir():
        console.print(f"[red]error:[/] needs {DATA} and {TOKENIZER} (../shared beside the checkout)")
        return 2
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    examples = load_examples(DATA)[: args.examples]
    real = tokenize(tokenizer, examples, MAX_LENGTH, MAX_LENGTH)
    data, vocab_size = compact_vocab(real)
    model, training = train_tiny(data, vocab_size, args.train_seconds, console)
    training["vocab_size"] = vocab_size
    n = min(args.queries, len(examples))
    eval_rows = list(range(min(32, len(examples))))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rows, outputs = measure("tiny (trained)", model, to_arrays(data, eval_rows), data["input_ids"][:n], False, 64,
                                Path(tmp), console)
        training["exact_match_fp32"] = sum(o == t for o, t in zip(outputs, data["labels"][:n])) / n
        results += rows
        if not args.skip_flan:
            from hf_models import save_model

            with console.status("flan-t5-small shape, random init"):
                folder = save_model("flan-small", Path(tmp) / "flan-small", TOKENIZER)
                flan, _ = mlx_t5.load(folder)
            rows, _ = measure("flan-small (random)", flan, to_arrays(real, eval_rows), real["input_ids"][:16],
                              True, 30, Path(tmp), console)
            results += rows

    table = Table(title="MLX quantization (group size 64), same run")
    for column in ("model", "variant", "MiB", "vs fp32", "logits err", "next tok = fp32", "greedy = fp32", "ms/query"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for r in results:
        table.add_row(r["model"], r["variant"], f"{r['bytes'] / 2**20:.1f}", f"{r['size_vs_fp32']:.2f}",
                      f"{r['logits_rel_error']:.2e}", f"{r['next_token_agreement']:.1%}",
                      f"{r['greedy_agreement']:.0%}", f"{r['ms_per_query']:.1f}")
    console.print(table)
    console.print(f"tiny model: {training['steps']} steps in {training['seconds']:.0f} s, final loss "
                  f"{training['final_loss']:.3f}, fp32 exact match on its training queries "
                  f"{training['exact_match_fp32']:.0%}")
    atomic_write_json(args.out, {"training": training, "tiny_config": TINY, "group_size": GROUP_SIZE,
                                 "mlx": mx.__version__, "device": str(mx.default_device()), "results": results})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
