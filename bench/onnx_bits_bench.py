"""ONNX Runtime 4-bit weights (MatMulNBits bits=4) against int8 and fp32: quality on a trained model, speed
on the flan-t5-small shape, each speed also as a ratio to the int8 weight-streaming floor.

    python bench/onnx_bits_bench.py --model /tmp/qs-model/best          # quality + latency
    python bench/onnx_bits_bench.py --skip-quality                      # latency only (random flan-small)

Quality (--model, a trained HF folder): the test split answered greedily at batch 1 by each variant;
"agree" = answers identical to fp32's, token for token; test ROUGE-L against the references.
Latency: flan-t5-small shape with random weights, a 24-token input -> exactly 30 new tokens (EOS ignored),
plain greedy (no speculation: random weights copy nothing), 1 thread; each variant answers --repeats queries in
a row, as a server does (its weights may stay in cache where they fit), the variants taking turns in 3 rounds;
"interleaved" alternates variants query by query (each query finds another's weights in cache). Floor: at
batch 1 every decoder step streams the int8 decoder and LM head (~38 MB); 38 MB x 30 steps / the single-core read
bandwidth measured here (numpy sum over a 512 MiB array) is what int8 cannot beat from DRAM; ratio = p50 / floor.
Writes a table and bench/results/onnx_bits.json.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from machine import cpu_name, make_console, read_bandwidth  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402

SHARED = ROOT.parent / "shared"
INT8_STEP_BYTES = 38e6  # flan-t5-small: decoder matmuls + 32128 x 512 head, int8 (README, issue 15)
VARIANTS = [("fp32", 32, None, None), ("int8", 8, 128, "rtn")] + [
    (f"int4-{method}-b{block}", 4, block, method) for method in ("rtn", "rtn-asym", "hqq") for block in (32, 64, 128)]


def export_variant(model, folder: Path, bits: int, block: int, method: str):
    from onnx_t5 import OnnxT5
    from onnx_t5.export import export_folder

    folder.mkdir(parents=True, exist_ok=True)
    export_folder(model, folder, quantize=bits != 32, bits=8 if bits == 32 else bits, block_size=block,
                  method=method)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".onnx")
    return OnnxT5(folder, threads=1), size


def quality(model_path: str, data: str, names, tmp: Path, limit: int) -> dict:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from reformulation.data import format_source, load_examples, make_splits
    from reformulation.metrics import rouge_l

    test = make_splits(load_examples([data]), "target").test
    test = test[:limit] if limit else test
    tok = AutoTokenizer.from_pretrained(model_path)
    hf = T5ForConditionalGeneration.from_pretrained(model_path, dtype="float32").eval()
    encoded = [tok([format_source(ex.query)], return_tensors="np") for ex in test]
    refs = [ex.target for ex in test]
    out, answers = {}, {}
    for name, bits, block, method in VARIANTS:
        if name not in names:
            continue
        model, size = export_variant(hf, tmp / f"q-{name}", bits, block, method)
        ids = []
        for enc in encoded:
            ids.append(model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=64)[0].tolist())
        answers[name] = ids
        texts = [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        out[name] = {"bytes": size, "rouge_l": rouge_l(texts, refs)}
    for name in out:
        same = sum(a == b for a, b in zip(answers[name], answers["fp32"]))
        out[name].update(agree=same / len(test), agree_count=same)
        out[name]["rouge_l_delta"] = out[name]["rouge_l"] - out["fp32"]["rouge_l"]
    return {"questions": len(test), "variants": out}


def latency(names, tmp: Path, repeats: int, tokens: int = 30, rounds: int = 3) -> dict:
    """p50 of each variant answered as a server answers: query after query with the same weights (4-bit's ~19 MB
    may then stay in a 32 MB L3; int8's ~38 MB cannot). Variants take
    turns in blocks of `repeats` queries, `rounds` times (the box's noise drifts); the first query of each block,
    which finds the other variant's weights in cache, is dropped. Also the p50 with variants alternating query by
    query ("interleaved", what sessions before 10 reported)."""
    from hf_models import make_model

    hf = make_model("flan-small")
    models = {}
    for name, bits, block, method in VARIANTS:
        if name in names:
            models[name] = export_variant(hf, tmp / f"l-{name}", bits, block, method)
    ids = np.arange(100, 124, dtype=np.int64)[None]
    ids[0, -1] = 1
    mask = np.ones_like(ids)

    def timed(model) -> float:
        t0 = time.perf_counter()
        model.generate(ids, mask, max_new_tokens=tokens, min_new_tokens=tokens)
        return 1000 * (time.perf_counter() - t0)

    alone = {name: [] for name in models}
    interleaved = {name: [] for name in models}
    for _ in range(rounds):
        for name, (model, _) in models.items():
            alone[name] += [timed(model) for _ in range(repeats + 1)][1:]
    for _ in range(repeats):
        for name, (model, _) in models.items():
            interleaved[name].append(timed(model))
    return {name: {"p50_ms": statistics.median(alone[name]), "p95_ms": float(np.percentile(alone[name], 95)),
                   "interleaved_p50_ms": statistics.median(interleaved[name]), "bytes": models[name][1]}
            for name in models}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="trained HF folder for the quality columns")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "full.jsonl"))
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_bits.json"))
    args = parser.parse_args(argv)
    names = set(args.variants) | {"fp32"}
    result = {"cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model and not args.skip_quality:
            result["quality"] = quality(args.model, args.data, names, Path(tmp), args.limit)
        if not args.skip_latency:
            bw = read_bandwidth()
            lat = latency(names | {"int8"}, Path(tmp), args.repeats)
            floor = INT8_STEP_BYTES * 30 / bw * 1000
            for row in lat.values():
                row["floor_ratio"] = row["p50_ms"] / floor
            result.update(bandwidth_gb_s=bw / 1e9, int8_floor_ms=floor, latency=lat)

    from rich.table import Table

    table = Table(title="ONNX Runtime weights: fp32 / int8 / int4 (MatMulNBits)")
    for col in ("variant", "agree w/ fp32", "ROUGE-L", "delta", "flan-small p50 ms", "p95", "x int8 floor",
                "interleaved p50", "MB"):
        table.add_column(col)
    q = result.get("quality", {}).get("variants", {})
    lat = result.get("latency", {})
    for name, *_ in VARIANTS:
        if name not in names:
            continue
        qrow, lrow = q.get(name, {}), lat.get(name, {})
        table.add_row(name, f"{qrow['agree']:.1%}" if qrow else "-", f"{qrow['rouge_l']:.4f}" if qrow else "-",
                      f"{qrow['rouge_l_delta']:+.4f}" if qrow else "-",
                      f"{lrow['p50_ms']:.1f}" if lrow else "-", f"{lrow['p95_ms']:.1f}" if lrow else "-",
                      f"{lrow['floor_ratio']:.2f}" if lrow else "-",
                      f"{lrow['interleaved_p50_ms']:.1f}" if lrow else "-",
                      f"{lrow.get('bytes', qrow.get('bytes', 0)) / 1e6:.1f}")
    console = make_console()
    console.print(table)
    if "bandwidth_gb_s" in result:
        console.print(f"{result['cpu']}: single-core read bandwidth {result['bandwidth_gb_s']:.1f} GB/s, "
                      f"int8 floor for 30 tokens {result['int8_floor_ms']:.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
