"""The tiny MLX training runs that several test files start: one config base, one way to read the losses."""

from pathlib import Path

from reformulation.reporting import read_metrics


def tiny_run(workdir: Path, out: Path, **overrides) -> dict:
    """Config values for a few steps on the test model and data in `workdir` (every row in train, no dropout, no
    evaluation, a log line per step); overrides win."""
    values = dict(model=str(workdir / "model"), data=[str(workdir / "data.jsonl")], split_fractions=[1.0, 0.0, 0.0],
                  output_dir=str(out), learning_rate=1e-3, dropout=0.0, eval_every=0, log_every=1)
    values.update(overrides)
    return values


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
