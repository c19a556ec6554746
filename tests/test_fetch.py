"""datasets/fetch.py run as a script: the copy path and the checksum-mismatch path (no network here)."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "datasets" / "fetch.py"
PINNED = {
    "full.jsonl": "5c7d8400ca3f749de9be71d24cfb4081ff2bad7f403280fbc3d6d18a5e6d1e29",
    "dev.jsonl": "b95e790e4f3739960dff368c2178e8479e1a69fd5e6d0312cec91b715651347f",
}


def fetch(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def source(full_jsonl, dev_jsonl, tmp_path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    shutil.copy(full_jsonl, folder / "full.jsonl")
    shutil.copy(dev_jsonl, folder / "dev.jsonl")
    return folder


def test_copy_verifies_and_writes_both_files(source, tmp_path):
    out = tmp_path / "out"
    result = fetch("--from", source, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dev.jsonl", "full.jsonl"]  # no temp files
    for name, digest in PINNED.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        assert f"{name}: copied" in result.stdout
    again = fetch("--from", source, "--out", out)
    assert again.returncode == 0 and again.stdout.count("already present") == 2


def test_checksum_mismatch_deletes_the_temp_file_and_exits_1(source, tmp_path):
    with open(source / "dev.jsonl", "a") as f:
        f.write('{"query": "tampered", "subqueries": "x"}\n')
    actual = hashlib.sha256((source / "dev.jsonl").read_bytes()).hexdigest()
    out = tmp_path / "out"
    result = fetch("--from", source, "--out", out)
    assert result.returncode == 1
    expected = f"dev.jsonl: sha256 mismatch for {source / 'dev.jsonl'}: expected {PINNED['dev.jsonl']}, got {actual}"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    # the good file is in place, the bad one and its temp file are not
    assert sorted(p.name for p in out.iterdir()) == ["full.jsonl"]


def test_tampered_existing_copy_is_replaced(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "full.jsonl").write_text("stale\n")
    result = fetch("--from", source, "--out", out)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((out / "full.jsonl").read_bytes()).hexdigest() == PINNED["full.jsonl"]


def test_missing_source_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = fetch("--from", empty, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert f"full.jsonl: cannot read {empty / 'full.jsonl'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert fetch("--from", tmp_path / "nowhere").returncode == 1
