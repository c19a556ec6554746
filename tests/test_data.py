"""reformulation.data: loading + validation, normalisation, prompt format, splits, tokenisation, report CLI."""

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from reformulation.data import (
    PROMPT_PREFIX,
    DataError,
    DuplicateRowsWarning,
    Example,
    build_report,
    format_source,
    format_target,
    load_examples,
    make_splits,
    normalize_text,
    pad_batch,
    parse_subqueries,
    random_split,
    read_jsonl,
    shift_right,
    split_by_target,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[1]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(query, subqueries):
    return json.dumps({"query": query, "subqueries": subqueries}, ensure_ascii=False)


def test_importing_the_core_pulls_in_no_framework():
    code = ("import sys, reformulation\n"
            "from reformulation import Example, TrainConfig, score, MetricsLog, atomic_dir, load_examples\n"
            "import reformulation.data, reformulation.config, reformulation.metrics, reformulation.reporting\n"
            "print(sorted(m for m in ('mlx', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- formats -----------------------------------------------------------------------------------

def test_pipe_and_legacy_backslash_n_formats_load_alike(tmp_path):
    pipe = write_lines(tmp_path / "pipe.jsonl", [row("Who is older, A or B?", "A birth date|B birth date")])
    # dev.jsonl's format: the two characters backslash + n between subqueries
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text('{"query": "Who is older, A or B?", "subqueries": "A birth date\\\\nB birth date"}\n')
    assert "\\\\n" in legacy.read_text()
    a, b = read_jsonl(pipe).examples, read_jsonl(legacy).examples
    assert a == b == [Example("Who is older, A or B?", ("A birth date", "B birth date"))]
    assert a[0].target == "A birth date|B birth date"
    assert a[0].source == "reformulate: Who is older, A or B?"


def test_real_files_both_formats(full_jsonl, dev_jsonl):
    full = read_jsonl(full_jsonl)
    assert len(full.examples) == 16_040 and full.duplicates == []
    assert len({e.target for e in full.examples}) == 3_208
    dev = read_jsonl(dev_jsonl)
    assert len(dev.examples) == 200
    assert any(len(e.subqueries) > 1 for e in dev.examples)
    assert not any("\\n" in e.target for e in dev.examples)
    # dev.jsonl is a subset of full.jsonl once both are parsed
    assert set(dev.examples) <= set(full.examples)


def test_load_examples_drops_duplicates_across_files_and_says_so(full_jsonl, dev_jsonl):
    message = r"dev\.jsonl: dropped 200 row\(s\) already loaded from .*full\.jsonl"
    with pytest.warns(DuplicateRowsWarning, match=message):
        examples = load_examples([full_jsonl, dev_jsonl])
    assert len(examples) == 16_040


# -- validation --------------------------------------------------------------------------------

GOOD = row("What is A?", "A definition")

BAD_ROWS = [
    ('{"query": "x", "subqueries": "y"', "invalid JSON"),
    ('["query", "subqueries"]', "expected a JSON object, got list"),
    ('{"subqueries": "y"}', 'missing "query"'),
    ('{"query": "x"}', 'missing "subqueries"'),
    (row("   ", "y"), '"query" is empty'),
    (row("x", ""), '"subqueries" is empty'),
    ('{"query": 3, "subqueries": "y"}', '"query" must be a string, got int'),
    ('{"query": "x", "subqueries": ["a", "b"]}', '"subqueries" must be a string, got list'),
    ('{"query": "x", "subqueries": null}', '"subqueries" must be a string, got NoneType'),
    (row("x", " | |\\n"), '"subqueries" has no subquery after splitting'),
]


@pytest.mark.parametrize("bad, what", BAD_ROWS, ids=[w for _, w in BAD_ROWS])
def test_each_bad_row_names_path_and_line(tmp_path, bad, what):
    # a blank line before the bad row: line numbers count it
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", GOOD.replace("A", "B"), bad, GOOD])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert what in str(info.value)
    assert info.value.line == 4


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"query": "caf\xe9", "subqueries": "x"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no data files"):
        load_examples([])


def test_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\r\n\r\n   \n{row('Q2', 'S2')}\n\n{{bad\r\n".encode())
    with pytest.raises(DataError, match=r"data\.jsonl:6: invalid JSON"):
        read_jsonl(path)
    path.write_bytes(path.read_bytes().replace(b"{bad", b""))
    assert [e.query for e in read_jsonl(path).examples] == ["What is A?", "Q2"]


def test_example_keeps_subqueries_a_tuple():
    assert Example("q", ["a", "b"]) == Example("q", ("a", "b"))
    assert len({Example("q", ["a"]), Example("q", ("a",))}) == 1
    with pytest.raises(TypeError, match="parse_subqueries"):
        Example("q", "a|b")


def test_duplicates_are_dropped_and_reported(tmp_path):
    lines = [GOOD, row("Q2", "S2"), GOOD, row("Q2", "S2 "), row("Q3", "S3")]
    path = write_lines(tmp_path / "dup.jsonl", lines)
    message = r"dup\.jsonl: dropped 2 duplicate row\(s\) at lines 3 \(same as 1\), 4 \(same as 2\)"
    with pytest.warns(DuplicateRowsWarning, match=message):
        result = read_jsonl(path)
    assert result.duplicates == [(3, 1), (4, 2)]
    assert [e.query for e in result.examples] == ["What is A?", "Q2", "Q3"]


def test_no_warning_without_duplicates(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [GOOD, row("Q2", "S2")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_jsonl(path).examples) == 2


# -- normalisation, prompt, parsing ---------------------------------------------------------------

def test_normalize_text():
    assert normalize_text("Māori") == "Maori"
    assert normalize_text("  Pokémon\t and  Ōtautahi \n") == "Pokemon and Otautahi"
    assert normalize_text("Area km²") == "Area km2"  # NFKC, as the tokenizer's own normaliser
    assert normalize_text("10\u2011kilometer run") == "10-kilometer run"  # no <unk> hyphen
    assert normalize_text("Ørsted") == "Orsted"
    assert normalize_text("한국어") == "한국어"  # decomposed then recomposed, not left as jamo
    assert normalize_text("plain ASCII") == "plain ASCII"


def test_normalize_flag(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [row("Who are the  Māori?", "Māori  people|Māori language")])
    (norm,) = read_jsonl(path).examples
    (raw,) = read_jsonl(path, normalize=False).examples
    assert norm == Example("Who are the Maori?", ("Maori people", "Maori language"))
    assert raw.subqueries == ("Māori people", "Māori language")  # parse still strips / collapses spaces
    assert raw.query == "Who are the  Māori?"
    # the model input is always the normalised query, as the servers send it
    assert raw.source == norm.source == "reformulate: Who are the Maori?"


def test_format_source_and_target():
    assert PROMPT_PREFIX == "reformulate: "
    query = "  Who lived longer,  Tesla or Milankovic? "
    assert format_source(query) == "reformulate: Who lived longer, Tesla or Milankovic?"
    assert format_source("Māori", normalize=False) == "reformulate: Māori"
    subqueries = ["Nikola Tesla lifespan", "Milutin Milankovic lifespan"]
    assert format_target(subqueries) == "Nikola Tesla lifespan|Milutin Milankovic lifespan"
    assert format_target(parse_subqueries("a|b|c")) == "a|b|c"


@pytest.mark.parametrize("text, expected", [
    ("a|b|c", ["a", "b", "c"]),
    ("  a  |  b c  ", ["a", "b c"]),
    ("a||b|", ["a", "b"]),
    ("a\nb\r\nc", ["a", "b", "c"]),
    ("Al Gore age|al gore  AGE|b|Al Gore age", ["Al Gore age", "b"]),  # case-insensitive de-dup, first kept
    ("", []),
    (" | \n ", []),
])
def test_parse_subqueries(text, expected):
    assert parse_subqueries(text) == expected


# -- splits --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples(full_jsonl):
    return load_examples(full_jsonl)


def targets_of(rows):
    return {e.target for e in rows}


def assignment(splits):
    return {e.target: name for name, rows in splits.items() for e in rows}


def test_target_split_is_leak_free_and_close_to_fractions(examples):
    splits = split_by_target(examples)
    train, valid, test = (targets_of(r) for r in (splits.train, splits.valid, splits.test))
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(splits.train) + len(splits.valid) + len(splits.test) == len(examples)
    n = len(train | valid | test)
    assert n == 3_208
    for got, want in zip((len(train), len(valid), len(test)), (0.8, 0.1, 0.1)):
        assert abs(got / n - want) < 0.02


def test_target_split_is_stable_under_shuffles_and_new_rows(examples):
    base = assignment(split_by_target(examples))
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert assignment(split_by_target(shuffled)) == base
    extra = [Example(f"new question {i}?", (f"new target {i}",)) for i in range(500)]
    grown = assignment(split_by_target(shuffled[:9000] + extra + shuffled[9000:]))
    assert {t: grown[t] for t in base} == base
    # a different salt is a different split
    assert assignment(split_by_target(examples, salt="v2")) != base


def test_target_split_ignores_python_hash_seed():
    code = (
        "from reformulation.data import Example, split_by_target\n"
        "ex = [Example(f'q{i}', (f't{i}',)) for i in range(300)]\n"
        "s = split_by_target(ex)\n"
        "print([e.target for e in s.test])\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    ex = [Example(f"q{i}", (f"t{i}",)) for i in range(300)]
    assert outputs.pop().strip() == str([e.target for e in split_by_target(ex).test])


def test_target_split_keeps_paraphrases_together(examples):
    splits = split_by_target(examples, fractions=(0.5, 0.25, 0.25))
    where = {}
    for name, rows in splits.items():
        for e in rows:
            assert where.setdefault(e.target, name) == name


def test_random_split_leaks_and_is_seeded(examples):
    splits = random_split(examples)  # 10% sample, 96/2/2, seed 42
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (1540, 32, 32)
    assert targets_of(splits.test) & targets_of(splits.train)  # paraphrases of test targets in train
    again = random_split(examples)
    assert again.test == splits.test and again.train == splits.train
    assert random_split(examples, seed=7).test != splits.test


def test_make_splits(examples):
    assert make_splits(examples, "target").test == split_by_target(examples).test
    assert make_splits(examples, "random", sample_fraction=0.1).test == random_split(examples).test
    full = make_splits(examples, "target", fractions=(0.9, 0.1, 0.0))
    assert full.test == [] and len(full.train) + len(full.valid) == len(examples)
    with pytest.raises(ValueError, match="unknown split kind 'rows'"):
        make_splits(examples, "rows")


def test_target_sample_fraction_is_nested_and_leak_free(examples):
    small = make_splits(examples, "target", sample_fraction=0.1)
    larger = make_splits(examples, "target", sample_fraction=0.2)
    small_targets = targets_of(small.train + small.valid + small.test)
    assert abs(len(small_targets) / 3208 - 0.1) < 0.02
    assert small_targets <= targets_of(larger.train + larger.valid + larger.test)
    # sampled targets keep the split they have in the full split
    base = assignment(split_by_target(examples))
    assert all(base[t] == s for t, s in assignment(small).items())


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0), (0.0, 0.5, 0.5)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        split_by_target([], fractions)
    with pytest.raises(ValueError, match="split fractions"):
        random_split([], fractions=fractions)


def test_bad_sample_fraction():
    with pytest.raises(ValueError, match="sample_fraction"):
        make_splits([], "target", sample_fraction=0.0)
    with pytest.raises(ValueError, match="sample_fraction"):
        make_splits([], "random", sample_fraction=1.5)


# -- tensors ------------------------------------------------------------------------------------

def test_shift_right():
    labels = np.array([[5, 6, 1, -100], [7, 1, -100, -100]])
    assert shift_right(labels).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]
    assert shift_right(labels, decoder_start_token_id=9, pad_token_id=3).tolist() == [[9, 5, 6, 1], [9, 7, 1, 3]]
    assert shift_right(np.array([4, 5, 1])).tolist() == [0, 4, 5]
    assert labels[0, 3] == -100  # input untouched


def test_pad_batch():
    out = pad_batch([[1, 2, 3], [4], []], pad_value=0)
    assert out.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]] and out.dtype == np.int32
    assert pad_batch([[1], [2, 3]], -100, length=4).tolist() == [[1, -100, -100, -100], [2, 3, -100, -100]]
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_batch([[1, 2, 3]], 0, length=2)


def test_tokenize(tokenizer):
    long_target = tuple(f"subquery number {i}" for i in range(40))
    examples = [Example("Who lived longer, Nikola Tesla or Milutin Milankovic?",
                        ("Nikola Tesla lifespan", "Milutin Milankovic lifespan")),
                Example("Māori?", long_target)]
    out = tokenize(tokenizer, examples, max_source_length=64, max_target_length=16)
    eos = tokenizer.eos_token_id
    assert all(ids[-1] == eos for ids in out["input_ids"] + out["labels"])
    assert tokenizer.decode(out["input_ids"][0], skip_special_tokens=True) == examples[0].source
    assert tokenizer.decode(out["input_ids"][1], skip_special_tokens=True) == "reformulate: Maori?"
    assert tokenizer.decode(out["labels"][0], skip_special_tokens=True) == examples[0].target
    assert len(out["labels"][1]) == 16  # truncated, EOS kept
    assert out["labels"][1][:15] == tokenizer(examples[1].target).input_ids[:15]
    assert out["truncated_targets"] == 1 and out["truncated_sources"] == 0
    tiny = tokenize(tokenizer, examples, max_source_length=4)
    assert tiny["truncated_sources"] == 2 and all(len(ids) == 4 and ids[-1] == eos for ids in tiny["input_ids"])
    with pytest.raises(ValueError, match="max_target_length must be >= 2"):
        tokenize(tokenizer, examples, max_target_length=1)


# -- report ---------------------------------------------------------------------------------------

def run_report(*args):
    return subprocess.run([sys.executable, "-m", "reformulation.data", "report", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_report_on_full(full_jsonl, tokenizer_dir, tmp_path, capsys):
    from reformulation.data import main

    out = tmp_path / "report.json"
    assert main(["report", str(full_jsonl), "--tokenizer", str(tokenizer_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "16,040" in printed and "3,208" in printed and "Tokens" in printed
    report = json.loads(out.read_text())
    assert report["rows"] == 16_040 and report["targets"] == 3_208 and report["duplicates_dropped"] == 0
    assert report["splits"]["target"]["leaked_targets"] == 0
    assert report["splits"]["target"]["test"]["targets_in_train"] == 0
    assert report["splits"]["random"]["leaked_targets"] > 0
    assert report["splits"]["random"]["test"]["targets_in_train"] > 0
    # the facts in ../shared/README.md: 927 strings with <unk> as stored, none after normalisation
    assert report["tokens_without_normalize"]["unk_strings"] == 927
    assert report["tokens"]["unk_strings"] == 0 and report["tokens"]["round_trip_failures_targets"] == 0
    assert report["tokens"]["target_lengths"]["max"] == 308


def test_report_cli_subprocess(full_jsonl, tmp_path):
    # token statistics are covered in-process above; here the CLI itself, without a tokenizer
    result = run_report(full_jsonl, "--tokenizer", tmp_path / "no-tokenizer")
    assert result.returncode == 0, result.stderr
    assert "16,040" in result.stdout and "3,208" in result.stdout
    assert "no token statistics: tokenizer folder not found" in result.stdout
    assert result.stderr == ""


def test_report_cli_on_malformed_file(full_jsonl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = full_jsonl.read_text(encoding="utf-8").splitlines()[:50]
    lines[36] = '{"query": "broken row", "subqueries": 7}'
    write_lines(bad, lines)
    out = tmp_path / "report.json"
    result = run_report(bad, "--json", out)
    assert result.returncode == 2
    assert f"{bad}:37:" in result.stderr and '"subqueries" must be a string' in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_report_counts_duplicates_without_a_tokenizer(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, row("Q2", "S2")])
    report = build_report([path])
    assert (report["rows"], report["examples"], report["duplicates_dropped"], report["targets"]) == (3, 2, 1, 2)
    assert "tokens" not in report
