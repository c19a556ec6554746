"""MLX data parallelism (mlx_t5.distributed): 2 ranks over the ring backend on 127.0.0.1 train exactly like
1 rank on the same global batch; mismatched launches fail fast; a dead or frozen rank stops the other.

Ranks are real processes: started by `mlx.launch` (the user's command) or, where a test must signal one
rank, directly with the environment mlx.launch gives them (MLX_RANK, MLX_HOSTFILE).
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from hf_models import make_model, save_word_tokenizer
from rich.console import Console
from runs import losses, tiny_run

from mlx_t5.trainer import TrainError, train
from reformulation.config import load_config
from reformulation.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")

pytestmark = [pytest.mark.usefixtures("blas_one_thread"),
              pytest.mark.skipif(not mx.distributed.is_available(), reason="this MLX build has no distributed backend")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, full_jsonl):
    """data.jsonl (40 rows), data-other.jsonl (one row changed), model/ (odd-heads shape, word tokenizer)."""
    root = tmp_path_factory.mktemp("dist")
    rows = read_jsonl(full_jsonl).examples[:200:5]
    lines = [json.dumps({"query": e.query, "subqueries": e.target}) + "\n" for e in rows]
    (root / "data.jsonl").write_text("".join(lines))
    (root / "data-other.jsonl").write_text("".join(lines[:-1]) + lines[0])
    tok = save_word_tokenizer([e.source for e in rows] + [e.target for e in rows], root / "model")
    make_model("odd-heads", vocab_size=len(tok)).save_pretrained(root / "model")
    save_word_tokenizer([e.source for e in rows] + [e.target for e in rows], root / "model-v1")
    make_model("v1-relu-tied", vocab_size=len(tok)).save_pretrained(root / "model-v1")  # widths of 64: QLoRA groups
    return root


def settings(workdir, out, **overrides) -> dict:
    return tiny_run(workdir, out, **{"batch_size": 7, "max_steps": 12, "eval_max_new_tokens": 8,
                                     "distributed_timeout": 60.0, **overrides})


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def single(values: dict) -> dict:
    return train(load_config(None, values), Console(file=io.StringIO()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(config: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 -- python -m mlx_t5.train --config ...` as a user types it."""
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--python",
           sys.executable, "--", "-m", "mlx_t5.train", "--config", str(config), *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def start_ranks(tmp_path: Path, configs: list[Path], *flags: str) -> list[subprocess.Popen]:
    """The ranks mlx.launch would start, as separate processes this test can signal."""
    port = free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return [subprocess.Popen([sys.executable, "-m", "mlx_t5.train", "--config", str(c), *flags], cwd=ROOT,
                             env=env() | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, c in enumerate(configs)]


def wait_for_steps(out: Path, steps: int, procs, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= steps:
            return
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps logged in {timeout} s")


def weights(folder: Path, name: str) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / name)).items()}


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_two_ranks_train_like_one_rank_on_the_same_global_batch(workdir, tmp_path, mode):
    """Batch 7 (shards of 4 and 3 rows, different padding) and an uneven last batch: losses of every step
    and the final weights agree within 1e-4 relative (float32 sums over shards of another shape round differently
    with the BLAS's kernel for each shape: ~2e-5 on AMD Zen 5); rank 0 alone writes the run folder."""
    extra = {"full": {}, "lora": dict(lora=True, lora_targets="all", learning_rate=5e-3),
             "qlora": dict(lora=True, quantize_base=8, learning_rate=5e-3, model=str(workdir / "model-v1"))}[mode]
    single(settings(workdir, tmp_path / "one", **extra))
    done = launch(write_config(tmp_path / "two.yaml", settings(workdir, tmp_path / "two", **extra)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("summary") <= 1 and "train_loss" in done.stdout  # one summary: rank 0's

    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"
    name = "model.safetensors" if mode == "full" else "adapters.safetensors"
    folder = "final" if mode == "full" else "adapter"
    a, b = weights(tmp_path / "one" / folder, name), weights(tmp_path / "two" / folder, name)
    assert a.keys() == b.keys()
    for k in a:  # per tensor, in norm: Adam's m / sqrt(v) turns rounding of a ~0 gradient into a full step
        assert np.linalg.norm(b[k] - a[k]) <= 1e-4 * np.linalg.norm(a[k]), k
    state = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_two_ranks_stop_together_on_a_signal_and_resume_with_two_ranks_only(workdir, tmp_path):
    """SIGINT reaches one rank only: the ranks still stop at the same step (the stop is voted in the step's
    all-reduce), rank 0 checkpoints; 2 ranks resume it exactly; 1 rank is refused with a clear message."""
    values = settings(workdir, tmp_path / "two", max_steps=400, lr_schedule="constant")
    single(values | dict(output_dir=str(tmp_path / "one"), max_steps=400))
    config = write_config(tmp_path / "two.yaml", values)
    ranks = start_ranks(tmp_path, [config, config])
    wait_for_steps(tmp_path / "two", 5, ranks)
    ranks[1].send_signal(signal.SIGINT)
    outs = [p.communicate(timeout=60) for p in ranks]
    assert [p.returncode for p in ranks] == [130, 130], outs
    stopped = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 5 <= stopped < 400

    with pytest.raises(TrainError, match=r"written by a run of 2 rank\(s\).*mlx.launch -n 2"):
        single(values | dict(resume="auto"))
    resumed = launch(config, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 401))
    for step in (1, stopped, stopped + 1, 400):  # 400 steps of shard-shaped rounding: ~1e-5 apart on AMD Zen 5
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"


@pytest.mark.parametrize("change, named", [
    (dict(learning_rate=2e-3), "config learning_rate"),
    (dict(data=["DATA-OTHER"]), "data file"),
])
def test_a_mismatched_launch_fails_fast_naming_the_difference(workdir, tmp_path, change, named):
    base = settings(workdir, tmp_path / "out")
    if change.get("data") == ["DATA-OTHER"]:
        change = dict(data=[str(workdir / "data-other.jsonl")])
    configs = [write_config(tmp_path / "rank0.yaml", base), write_config(tmp_path / "rank1.yaml", base | change)]
    ranks = start_ranks(tmp_path, configs)
    outs = [p.communicate(timeout=120) for p in ranks]
    for p, (out, err) in zip(ranks, outs):
        assert p.returncode == 2, (out, err)
        assert "launched with different" in err and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not losses(tmp_path / "out")  # not a step trained


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_lost_rank_stops_the_other_with_a_clear_error_not_a_hang(workdir, tmp_path, how):
    """SIGKILL closes the dead rank's sockets: the survivor fails at its next all-reduce. SIGSTOP leaves
    them open: the survivor's watchdog ends it after distributed_timeout (3 s here)."""
    config = write_config(tmp_path / "c.yaml", settings(workdir, tmp_path / "out", max_steps=100000,
                                                        distributed_timeout=3.0))
    ranks = start_ranks(tmp_path, [config, config])
    try:
        wait_for_steps(tmp_path / "out", 3, ranks)
        ranks[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        out, err = ranks[0].communicate(timeout=60)
        assert time.monotonic() - start < 30
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    if how == "kill":
        assert ranks[0].returncode == 2 and "lost the other ranks" in err and "Traceback" not in err, err
    else:
        assert ranks[0].returncode == 3 and "no answer from the other ranks for 3 s" in err, err
