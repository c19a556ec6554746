"""reformulation.metrics (hand-checked values) and reformulation.reporting (metrics.jsonl, curves, summary)."""

import numpy as np
import pytest

from reformulation.data import DataError
from reformulation.metrics import rouge_l, score
from reformulation.reporting import MetricsLog, plot_curves, read_metrics, summary_table


# -- ROUGE-L ------------------------------------------------------------------------------------

def test_rouge_l_hand_checked():
    # "a b c d" vs "a b e d": LCS a b d = 3 -> P = R = 3/4 -> F = 0.75
    assert rouge_l(["a b c d"], ["a b e d"]) == pytest.approx(0.75)
    # pred [al gore age], ref [al gore birth date]: LCS 2 -> P 2/3, R 1/2, F = 2PR/(P+R) = 4/7
    assert rouge_l(["Al Gore age"], ["Al Gore birth date"]) == pytest.approx(4 / 7)
    # mean over examples
    assert rouge_l(["a b c d", "Al Gore age"], ["a b e d", "Al Gore birth date"]) == pytest.approx((0.75 + 4 / 7) / 2)
    # "|" is a word break, case is ignored, no stemming ("dates" != "date")
    assert rouge_l(["x|y"], ["X Y"]) == pytest.approx(1.0)
    assert rouge_l(["birth dates"], ["birth date"]) == pytest.approx(0.5)


# -- score ---------------------------------------------------------------------------------------

def test_score_hand_checked():
    predictions = ["B|a", "a|c", ""]
    references = ["a|b", "a|b|d", "a"]
    # ex 1: same set, other order/case -> P = R = F = 1, EM 1
    # ex 2: {a,c} vs {a,b,d}: P = 1/2, R = 1/3, F = 2*(1/6)/(5/6) = 0.4, EM 0
    # ex 3: nothing predicted -> P = R = F = 0, EM 0
    s = score(predictions, references)
    assert s["count"] == 3
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["subquery_precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["subquery_recall"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert s["subquery_f1"] == pytest.approx((1 + 0.4 + 0) / 3)
    assert s["rouge_l"] == pytest.approx(rouge_l(predictions, references))
    assert all(0.0 <= v <= 1.0 for k, v in s.items() if k != "count")


def test_exact_match_normalisation():
    # repeats, whitespace, case and accents do not matter; a missing subquery does
    s = score(["nikola tesla  lifespan|Nikola Tesla lifespan | Maori people"],
              ["Nikola Tesla lifespan|Māori people"])
    assert s["exact_match"] == 1.0 and s["subquery_f1"] == 1.0
    s = score(["Nikola Tesla lifespan"], ["Nikola Tesla lifespan|Milutin Milankovic lifespan"])
    assert s["exact_match"] == 0.0
    assert s["subquery_precision"] == 1.0 and s["subquery_recall"] == 0.5
    assert s["subquery_f1"] == pytest.approx(2 / 3)
    # newline-separated output parses like "|"
    assert score(["a\nb"], ["b|a"])["exact_match"] == 1.0


def test_score_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="nothing to score"):
        score([], [])
    with pytest.raises(ValueError, match=r"predictions\[1\] must be a string"):
        score(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])


# -- reporting ---------------------------------------------------------------------------------

def test_metrics_log_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.log({"step": 1, "loss": np.float32(2.5), "learning_rate": 3e-4})
        # flushed per line: readable while the log is still open
        assert read_metrics(path) == [{"step": 1, "loss": 2.5, "learning_rate": 3e-4}]
        log.log({"step": 2, "eval_loss": 2.0, "eval_rouge_l": 0.5})
    with MetricsLog(path) as log:  # appends, as a resumed run does
        log.log({"step": 3, "loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with pytest.raises(TypeError, match="takes a dict"):
        MetricsLog(path).log([1, 2])


def test_read_metrics_tolerates_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:2: skipped an incomplete last line"):
        assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(path)


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 51):
            log.log({"step": step, "loss": 3.0 / step, "learning_rate": 1e-4})
            if step % 10 == 0:
                log.log({"step": step, "eval_loss": 2.0 / step, "eval_rouge_l": step / 60,
                         "eval_exact_match": step / 100})
    out = plot_curves(path, tmp_path / "plots" / "curves.png", title="test run")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left
    # an empty log still gives a (blank) figure instead of an error
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png").stat().st_size > 0


def test_summary_table_renders_what_it_is_given():
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(summary_table({"train_runtime": 125.5, "train_samples_per_second": 12.3456, "eval_loss": 0.1234,
                                 "eval_rouge_l": 0.9, "train_steps": 12000, "note": "[bold]x"}, "Training Log"))
    text = console.export_text()
    for expected in ("Training Log", "train_runtime", "125.5 s (2m06s)", "12.3456", "0.1234", "12,000", "[bold]x"):
        assert expected in text
