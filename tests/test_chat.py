"""chat.py as a user runs it: JSON lines through a pipe, and the interactive REPL through a pseudo-terminal."""

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serving.backends import make_backend
from hf_models import save_model
from reformulation.data import parse_subqueries

pexpect = pytest.importorskip("pexpect", reason="the REPL tests need pexpect (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["Who lived longer, Nikola Tesla or Milutin Milankovic?", "What is the capital of France?"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color"}
PROMPT = "›"  # prompt_toolkit moves the cursor after it with escape codes, not a space


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return save_model("odd-heads", tmp_path_factory.mktemp("chat") / "model", tokenizer_dir)


def chat(model_dir, *args, stdin="", backend="mlx"):
    return subprocess.run([sys.executable, "chat.py", "--model", str(model_dir), "--backend", backend, *args],
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=180, env=ENV)


def test_jsonl_mode(model_dir):
    proc = chat(model_dir, "--max-new-tokens", "8", "--beams", "2", stdin=f"{QUERIES[0]}\n\n  \n{QUERIES[1]}\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is nothing but JSON lines
    assert [row["query"] for row in rows] == QUERIES  # blank lines skipped
    local = make_backend("mlx").load(model_dir)
    for row in rows:
        want = parse_subqueries(local.generate([row["query"]], num_beams=2, max_new_tokens=8)[0])
        assert row["subqueries"] == want and want
        assert row["latency_ms"] > 0
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--beams", "0"], "num_beams must be an integer >= 1"),
    (["--temperature", "0.5", "--beams", "2"], "do not mix"),
])
def test_jsonl_bad_options_are_json_errors(model_dir, args, needle):
    proc = chat(model_dir, *args, stdin=QUERIES[0] + "\n")
    assert proc.returncode == 2
    assert needle in json.loads(proc.stdout)["error"]
    assert "Traceback" not in proc.stderr


def test_jsonl_missing_model(tmp_path):
    proc = chat(tmp_path / "nowhere", stdin=QUERIES[0] + "\n")
    assert proc.returncode == 2
    assert "nowhere" in json.loads(proc.stdout)["error"]
    assert "Traceback" not in proc.stdout + proc.stderr


def spawn(model_dir, tmp_path, *args):
    log = io.StringIO()
    child = pexpect.spawn(sys.executable, ["chat.py", "--model", str(model_dir), "--backend", "mlx",
                                           "--history-file", str(tmp_path / "history"), *args],
                          cwd=str(ROOT), env=ENV, encoding="utf-8", timeout=90, dimensions=(50, 160),
                          # a test run started in the background (`cmd &`) ignores SIGINT, and children
                          # inherit that: the REPL's Ctrl-C must see a terminal's default disposition
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.logfile_read = log
    child.expect("/help for commands")
    child.expect(PROMPT)
    return child, log


def send(child, line, *patterns):
    """Type a line, wait for each pattern in order, then for the next prompt (which comes after them)."""
    child.sendline(line)
    for pattern in patterns:
        child.expect(pattern)
    child.expect(PROMPT)


def test_interactive_session(model_dir, tmp_path):
    child, log = spawn(model_dir, tmp_path)
    try:
        send(child, "/help", "/beams N", "/history", "Ctrl-C")
        send(child, "/beams 2", "beams=2 temp=0 max=64")
        send(child, "/max 5", "beams=2 temp=0 max=5")
        send(child, QUERIES[0], r"\d ms · beams=2 · mlx")
        send(child, "/history", "Who lived longer")
        send(child, "/beams two", "usage: /beams N")
        send(child, "/beams 99", "out of range")
        send(child, "/frobnicate", "unknown command '/frobnicate'")
        send(child, "/frob[/]", "unknown command")  # rich markup in user text is printed, not parsed
        send(child, "/model " + str(tmp_path / "no-such-[/red]-model"), "could not load", "still using")
        send(child, "/backend tensorflow", "unknown backend 'tensorflow'")
        send(child, QUERIES[1], r"\d ms · beams=2 · mlx")  # the old model still answers
        child.sendline("/quit")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    transcript = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", log.getvalue())  # colours and cursor moves
    assert child.exitstatus == 0, transcript
    assert "Traceback" not in transcript
    local = make_backend("mlx").load(model_dir)
    for query in QUERIES:
        expected = parse_subqueries(local.generate([query], num_beams=2, max_new_tokens=5)[0])
        assert f" 1. {expected[0]}" in transcript  # the numbered answer the user saw is the model's
    assert QUERIES[0] in (tmp_path / "history").read_text()  # prompt history persisted


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory, tokenizer_dir):
    # flan-t5-small's shape: ~20 ms a token on a CPU, so 512 tokens stream for seconds and Ctrl-C lands
    # mid-answer even on a fast machine (the tiny model streams 512 tokens in ~1 s)
    return save_model("flan-small", tmp_path_factory.mktemp("chat-slow") / "model", tokenizer_dir)


def test_ctrl_c_cancels_and_ctrl_d_exits(slow_model_dir, tmp_path):
    child, log = spawn(slow_model_dir, tmp_path)
    try:
        send(child, "/max 512", "max=512")  # a random model rarely stops early: this streams for a while
        child.sendline(QUERIES[0])
        child.expect(r" 1\. \S")  # streaming has begun
        child.sendintr()
        child.expect("cancelled")
        child.expect(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt only clears the line
        child.expect(PROMPT)
        send(child, "/max 4", "max=4")
        send(child, QUERIES[1], r"\d ms · greedy · mlx")
        child.sendcontrol("d")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, log.getvalue()
    assert "Traceback" not in log.getvalue()
