"""Training logs: metrics.jsonl, loss/score curves, and the end-of-run summary table.

metrics.jsonl holds one JSON object per line. Trainers write (keys optional except ``step``):

    {"step": 10, "epoch": 0.1, "loss": 3.21, "learning_rate": 3e-4, "tokens_per_second": 5100}
    {"step": 200, "eval_loss": 1.9, "eval_rouge_l": 0.61, "eval_exact_match": 0.12, ...}

``plot_curves`` reads ``loss`` (or ``train_loss``), ``eval_loss``, ``eval_rouge_l`` and
``eval_exact_match``.
"""

import io
import json
import math
import warnings
from pathlib import Path

from .data import DataError
from .io import _json_default, atomic_write_bytes


class MetricsLog:
    """Append-only JSON-lines log, flushed after every line so a crash loses at most one line.

    Usage: ``with MetricsLog(out / "metrics.jsonl") as log: log.log({"step": 1, "loss": 2.3})``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        if not isinstance(record, dict):
            raise TypeError(f"MetricsLog.log takes a dict, got {type(record).__name__}")
        self._file.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped with a warning."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    last = max((i for i, text in enumerate(lines) if text.strip()), default=-1)
    records = []
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipped an incomplete last line", stacklevel=2)
                break
            raise DataError(path, i + 1, f"invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(path, i + 1, f"expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _series(records, key):
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in r and math.isfinite(value):
            xs.append(r["step"])
            ys.append(value)
    return xs, ys


def plot_curves(metrics_jsonl, out_png, title: str | None = None) -> Path:
    """PNG of train / eval loss (top) and eval ROUGE-L / exact match (bottom) against step."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (notebooks, servers).
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    fig = Figure(figsize=(8, 6.5))
    ax_loss, ax_score = fig.subplots(2, 1, sharex=True)
    # "train_loss" only when there is no per-step "loss": HF's end-of-run record has a
    # whole-run average under that name, which is not a point of the curve.
    xs, ys = _series(records, "loss")
    if not xs:
        xs, ys = _series(records, "train_loss")
    if xs:
        ax_loss.plot(xs, ys, "-", label="train loss")
    xs, ys = _series(records, "eval_loss")
    if xs:
        ax_loss.plot(xs, ys, "o-", label="eval loss", markersize=3)
    losses = [y for line in ax_loss.get_lines() for y in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:  # from-scratch runs: 10 -> 0.1
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    for key, label in (("eval_rouge_l", "ROUGE-L"), ("eval_exact_match", "exact match")):
        xs, ys = _series(records, key)
        if xs:
            ax_score.plot(xs, ys, "o-", label=label, markersize=3)
    ax_score.set_ylabel("eval score")
    ax_score.set_ylim(0, 1)
    ax_score.set_xlabel("step")
    ax_score.grid(alpha=0.3)
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or Path(metrics_jsonl).parent.name or "training")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(out_png, buffer.getvalue())


def _format(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key.endswith("runtime"):  # seconds
            minutes, seconds = divmod(value, 60)
            return f"{value:,.1f} s" + (f" ({int(minutes)}m{seconds:02.0f}s)" if minutes else "")
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4f}"
    return str(value)


def examples_table(examples, predictions, count: int = 6, seed: int = 0, title: str = "Test examples"):
    """A rich table of `count` examples (a seeded pick): query, the model's subqueries, the reference."""
    import random

    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("query", ratio=3)
    table.add_column("prediction", ratio=2)
    table.add_column("reference", ratio=2)
    for i in sorted(random.Random(seed).sample(range(len(examples)), min(count, len(examples)))):
        prediction, reference = predictions[i], examples[i].target
        style = "green" if prediction == reference else None
        table.add_row(escape(examples[i].query), escape(prediction), escape(reference), style=style)
    return table


def summary_table(summary: dict, title: str = "Training Log"):
    """A two-column rich table of whatever is in ``summary`` (train_runtime, eval_loss, ...)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(escape(str(key)), escape(_format(key, value)))
    return table
