"""Does a trained model copy names it has never seen? Test-split questions with their names swapped for made-up ones.

    python bench/copy_probe.py --model runs/quickstart/best
    python bench/copy_probe.py --model runs/quickstart/best --model /tmp/other/best     # side by side

For each test-split row whose reference copies names from the question (reformulation.augment.copied_spans), three
versions are answered greedily (torch_t5.infer.generate, what chat.py's torch backend runs, batches of 128):
  - test: the row as it is (its names are mostly absent from training: the split is by target);
  - letters: every copied name swapped, consistently in question and reference, for a name spelled by a LetterModel
    of the *validation* split's names (realistic spellings no trainer's augmentation uses);
  - syllables: the same with reformulation.augment.invented_name (the syllable generator).
"copied" is the share of the reference's names that the answer contains verbatim; ROUGE-L is against the (swapped)
reference. Writes a table and bench/results/copy_probe.json.
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name, make_console  # noqa: E402
from reformulation.augment import LetterModel, copied_spans, invented_name, swap  # noqa: E402
from reformulation.io import atomic_write_json  # noqa: E402

SHARED = ROOT.parent / "shared"


def copied(examples, predictions) -> float:
    pairs = [(span, p) for e, p in zip(examples, predictions) for span in copied_spans(e.query, e.subqueries)]
    return sum(span in p for span, p in pairs) / max(len(pairs), 1)


def probes(splits, seed: int = 123) -> dict:
    """name -> the test rows that copy names, as they are and with made-up names swapped in."""
    rows = [e for e in splits.test if copied_spans(e.query, e.subqueries)]
    letters = LetterModel([s for e in splits.valid for s in copied_spans(e.query, e.subqueries)])
    out = {"test": rows}
    for name, make in (("letters", letters.name), ("syllables", invented_name)):
        rng = random.Random(seed)
        out[name] = [swap(e, {s: make(rng, len(s.split())) for s in copied_spans(e.query, e.subqueries)}) for e in rows]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="trained HF folder (repeat to compare)")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "full.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "copy_probe.json"))
    args = parser.parse_args(argv)

    import torch
    from rich.table import Table

    from reformulation.data import load_examples, make_splits
    from reformulation.metrics import rouge_l
    from torch_t5 import infer

    torch.set_num_threads(args.threads)
    console = make_console()
    sets = probes(make_splits(load_examples([args.data]), "target"))
    result = {"cpu": cpu_name(), "rows": len(sets["test"]), "models": {}}
    for folder in args.model:
        model, tok = infer.load(folder, device="cpu")
        row = {}
        for name, examples in sets.items():
            with console.status(f"{folder}: {name}"):
                preds = infer.generate(model, tok, [e.query for e in examples], max_new_tokens=48, batch_size=128)
            row[name] = {"copied": copied(examples, preds), "rouge_l": rouge_l(preds, [e.target for e in examples]),
                         "examples": [[examples[i].query, preds[i], examples[i].target] for i in range(0, 200, 40)]}
        result["models"][folder] = row

    table = Table(title=f"names copied verbatim, {result['rows']} test questions that copy names")
    for col in ("model", "test: copied", "ROUGE-L", "letters names: copied", "ROUGE-L", "syllable names: copied",
                "ROUGE-L"):
        table.add_column(col)
    for folder, row in result["models"].items():
        table.add_row(folder, *(f"{row[n][k]:.1%}" if k == "copied" else f"{row[n][k]:.3f}"
                                for n in ("test", "letters", "syllables") for k in ("copied", "rouge_l")))
    console.print(table)
    atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
