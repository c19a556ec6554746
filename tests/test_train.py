"""MLX training: parity with a plain torch loop, overfitting, exact resume, outputs, config errors, init.

Models are tiny transformers-made T5s with a word-level tokenizer over the test rows (a few hundred
embedding rows instead of 32,128), so every run takes seconds.
"""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from hf_models import make_model, save_word_tokenizer
from mlx.utils import tree_flatten
from rich.console import Console
from runs import losses, tiny_run
from transformers import T5ForConditionalGeneration, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import mlx_t5
from mlx_t5.init import SHAPES, init_model
from mlx_t5.model import loss_fn
from mlx_t5.trainer import (build_schedule, collate, enable_gradient_checkpointing, epoch_batches, predict,
                            to_mx, tokenize_split, train)
from reformulation.config import TrainConfig, load_config
from reformulation.data import read_jsonl
from reformulation.reporting import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def examples(full_jsonl):
    """48 rows, one paraphrase per target, short targets (so 32 of them can be memorised quickly)."""
    seen, picked = set(), []
    for e in read_jsonl(full_jsonl).examples:
        if e.target not in seen and len(e.target) < 60:
            seen.add(e.target)
            picked.append(e)
        if len(picked) == 48:
            return picked
    raise AssertionError("full.jsonl has too few short targets")


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"query": e.query, "subqueries": e.target}) + "\n" for e in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, examples):
    """data.jsonl (48 rows) and model/ (HF odd-heads shape: gated-gelu, untied, 3 heads; word tokenizer)."""
    root = tmp_path_factory.mktemp("train")
    write_rows(root / "data.jsonl", examples)
    tok = save_word_tokenizer([e.source for e in examples] + [e.target for e in examples], root / "model")
    make_model("odd-heads", vocab_size=len(tok)).save_pretrained(root / "model")
    return root


def config(workdir, out, **overrides) -> TrainConfig:
    return load_config(None, tiny_run(workdir, out, **{"batch_size": 4, "max_steps": 10, "eval_batch_size": 16,
                                                       "eval_max_new_tokens": 24, **overrides}))


pytestmark = pytest.mark.usefixtures("blas_one_thread")  # conftest: tiny models, one BLAS thread


def run(cfg: TrainConfig) -> dict:
    return train(cfg, Console(**QUIET))


# The command line in a child process whose steps take 0.2 s longer (same numerics), so the test can kill it
# mid-run like a crash or an OOM kill would.
SLOW_CHILD = """
import sys, time
import mlx_t5.trainer as trainer
step = trainer.train_step
def slow_step(*args):
    time.sleep(0.2)
    return step(*args)
trainer.train_step = slow_step
from mlx_t5.train import main
sys.exit(main(sys.argv[1:]))
"""


def train_and_kill(cfg: TrainConfig, tmp_path: Path) -> tuple[int, int]:
    """Train `cfg` in a child process and SIGKILL it once a checkpoint exists and a later step was logged.
    Returns (the checkpoint's step, the last logged step)."""
    out = Path(cfg.output_dir)
    path = cfg.save(tmp_path / f"{out.name}.yaml")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # as blas_one_thread in this process
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "--config", str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 120
        while not (state.is_file() and (out / "metrics.jsonl").is_file()
                   and max(losses(out), default=0) > json.loads(state.read_text())["step"]):
            assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return json.loads(state.read_text())["step"], max(losses(out))


# -- parity with torch -------------------------------------------------------------------------------------

def torch_batch(batch: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@pytest.mark.parametrize("shape", ["odd-heads", "v1-relu-tied"])
def test_step0_gradients_match_torch(tmp_path, shape, examples):
    """Every parameter's gradient of the masked loss on a padded batch equals transformers' (HF names)."""
    tok = save_word_tokenizer([e.source for e in examples] + [e.target for e in examples], tmp_path)
    hf = make_model(shape, vocab_size=len(tok))
    hf.save_pretrained(tmp_path)
    model, _ = mlx_t5.load(tmp_path)
    split = tokenize_split(tok, examples[:6], TrainConfig())
    batch = collate(split.input_ids, split.labels)
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any(), "the batch must be padded"

    model.train()
    (_, _), grads = nn.value_and_grad(model, lambda *b: loss_fn(model, *b))(*to_mx(batch))
    grads = dict(tree_flatten(grads))
    hf.train()
    hf(**torch_batch(batch)).loss.backward()
    expected = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    assert set(grads) == set(expected)
    for name, g in expected.items():
        err = np.abs(np.array(grads[name]) - g).max() / max(np.abs(g).max(), 1e-8)
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"


def torch_training_losses(workdir, cfg: TrainConfig, tokenizer) -> list[float]:
    """A plain torch loop with the trainer's batches: token-weighted loss over the accumulation group,
    AdamW (no decay on norm weights, like the HF Trainer), global-norm clipping, HF's linear schedule."""
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration.from_pretrained(workdir / "model").train()
    split = tokenize_split(tokenizer, read_jsonl(workdir / "data.jsonl").examples, cfg)
    decay = [p for n, p in hf.named_parameters() if "layer_norm" not in n]
    no_decay = [p for n, p in hf.named_parameters() if "layer_norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.999),
                            eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    out, epoch, batches, index = [], 0, epoch_batches(split.lengths, cfg.batch_size, cfg.seed, 0), 0
    while len(out) < cfg.max_steps:
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = epoch_batches(split.lengths, cfg.batch_size, cfg.seed, epoch)
        group = [torch_batch(split.batch(b, hf.config)) for b in batches[index: index + cfg.grad_accum]]
        index += len(group)
        ntoks = sum(int((b["labels"] != -100).sum()) for b in group)
        total = 0.0
        for b in group:
            logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        decoder_input_ids=b["decoder_input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                                     reduction="sum") / ntoks
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(total)
    return out


def test_losses_match_a_torch_training_loop(workdir, tmp_path):
    """Trainer (AdamW + bias correction, weight decay, warmup + linear decay, clipping, accumulation 2 with
    uneven micro-batches across an epoch end) vs a plain torch loop: per-step losses within 1e-4 relative."""
    cfg = config(workdir, tmp_path / "run", max_steps=12, batch_size=5, grad_accum=2, learning_rate=3e-3,
                 warmup_steps=3, weight_decay=0.1, max_grad_norm=0.5, eval_samples=8)
    summary = run(cfg)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))
    tokenizer = mlx_t5.utils.load_tokenizer(workdir / "model")
    expected = torch_training_losses(workdir, cfg, tokenizer)
    for step, want in enumerate(expected, start=1):
        assert abs(got[step] - want) <= 1e-4 * abs(want), f"step {step}: mlx {got[step]} torch {want}"
    assert expected[-1] < expected[0] - 0.5  # it actually trains
    assert summary["total_steps"] == 12 and summary["epochs"] > 1  # crossed an epoch boundary


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_transformers(kind):
    cfg = TrainConfig(init="small", learning_rate=2e-3, warmup_steps=5, lr_schedule=kind)
    schedule = build_schedule(cfg, 40)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    sched = make(opt, 5, 40)
    for step in range(41):  # (past the end HF's cosine rises again; training never gets there)
        assert abs(schedule(mx.array(step)).item() - opt.param_groups[0]["lr"]) <= 1e-9 + 1e-6 * cfg.learning_rate
        opt.step()
        sched.step()


# -- learning, resume, outputs ---------------------------------------------------------------------------

def test_overfits_32_examples_and_saves_a_loadable_checkpoint(workdir, tmp_path, examples):
    rows = examples[:32]
    write_rows(tmp_path / "data.jsonl", rows)
    cfg = config(workdir, tmp_path / "run", data=[str(tmp_path / "data.jsonl")], batch_size=32, max_steps=100,
                 learning_rate=3e-3, lr_schedule="constant", log_every=10)
    run(cfg)
    out = tmp_path / "run"
    assert {"final", "checkpoint", "config.yaml", "metrics.jsonl", "curves.png", "summary.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "best").exists()  # no validation split: nothing to select on

    model, tokenizer = mlx_t5.load(out / "final")
    predictions = predict(model, tokenizer, [e.query for e in rows])
    targets = tokenizer.batch_decode(tokenizer([e.target for e in rows])["input_ids"], skip_special_tokens=True)
    wrong = [(p, t) for p, t in zip(predictions, targets) if p != t]
    assert not wrong, f"{len(wrong)} of 32 not memorised, e.g. {wrong[0]}"

    # the final folder is an HF checkpoint: transformers loads it and agrees with MLX
    hf = T5ForConditionalGeneration.from_pretrained(out / "final").eval()
    batch = collate(*(lambda s: (s.input_ids[:4], s.labels[:4]))(tokenize_split(tokenizer, rows, cfg)))
    with torch.no_grad():
        want = hf(**{k: v for k, v in torch_batch(batch).items() if k != "labels"}).logits.numpy()
    got = np.array(model(*(mx.array(batch[k]) for k in ("input_ids", "decoder_input_ids", "attention_mask"))))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_after_a_kill_equals_the_uninterrupted_run(workdir, tmp_path, optimizer):
    """Dropout on (the RNG must be restored), an epoch boundary inside, a checkpoint every 4 steps and a process
    killed after a later step: resuming from the checkpoint replays the lost steps and the losses of all 14
    steps are the same."""
    common = dict(max_steps=14, batch_size=8, dropout=0.1, save_every=4, lr_schedule="cosine", warmup_steps=2,
                  optimizer=optimizer, weight_decay=0.01)
    full = run(config(workdir, tmp_path / "full", **common))
    saved, logged = train_and_kill(config(workdir, tmp_path / "killed", **common), tmp_path)
    assert saved % 4 == 0 and saved < logged < 14

    resumed = run(config(workdir, tmp_path / "killed", resume=str(tmp_path / "killed"), **common))
    want, got = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 15))  # the killed run's steps after the checkpoint were dropped, not duplicated
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), f"step {step}"
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)


def test_resume_auto_starts_fresh_then_continues_its_output_folder(workdir, tmp_path):
    common = dict(max_steps=6, batch_size=8, save_every=2, resume="auto")
    saved, logged = train_and_kill(config(workdir, tmp_path / "a", **common), tmp_path)  # nothing to resume
    assert sorted(losses(tmp_path / "a")) == list(range(1, logged + 1)) and saved < logged < 6
    run(config(workdir, tmp_path / "a", **common))  # continues from checkpoint/
    assert sorted(losses(tmp_path / "a")) == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_data_order(workdir, tmp_path):
    from mlx_t5.trainer import TrainError

    run(config(workdir, tmp_path / "a", max_steps=2, save_every=1))
    with pytest.raises(TrainError, match="batch_size"):
        run(config(workdir, tmp_path / "a", max_steps=4, batch_size=3, resume=str(tmp_path / "a" / "checkpoint")))


def test_bfloat16_with_evaluation_keeps_the_best_checkpoint(workdir, tmp_path):
    """bf16 compute on float32 master weights; evals every 4 steps score the valid split, keep best/,
    and the test split is scored at the end with the best model."""
    out = tmp_path / "run"
    summary = run(config(workdir, out, dtype="bfloat16", max_steps=8, learning_rate=3e-3,
                         split_fractions=[0.6, 0.2, 0.2], eval_every=4))
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(0 <= r["eval_rouge_l"] <= 1 for r in evals)
    assert losses(out)[8] < losses(out)[1]
    best = max(evals, key=lambda r: (r["eval_rouge_l"], -r["eval_loss"]))
    assert summary["test_model_step"] == best["step"] and "test_rouge_l" in summary
    assert json.loads((out / "summary.json").read_text())["eval_loss"] == evals[-1]["eval_loss"]
    mlx_t5.load(out / "best")  # a loadable HF folder
    weights = mx.load(str(out / "checkpoint" / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())


def test_gradient_checkpointing_keeps_the_gradients(workdir, examples, monkeypatch):
    """Without dropout: the plain model's gradients. With dropout: the recomputation redraws exactly the
    forward's masks (the same keyed block run without mx.checkpoint gives the same gradients)."""
    from mlx_t5.trainer import set_dropout

    def gradients(model, seed=0):
        mx.random.seed(seed)
        _, grads = nn.value_and_grad(model, lambda *b: loss_fn(model, *b)[0])(*batch)
        return tree_flatten(grads)

    def assert_same(got, want):
        for (name, g), (_, w) in zip(got, want):
            assert np.allclose(np.array(g), np.array(w), atol=1e-5), name

    model, tok = mlx_t5.load(workdir / "model")
    split = tokenize_split(tok, examples[:4], TrainConfig())
    batch = to_mx(collate(split.input_ids, split.labels))
    model.train()
    want = gradients(model)
    enable_gradient_checkpointing(model)
    assert_same(gradients(model), want)

    model = mlx_t5.load(workdir / "model")[0]
    set_dropout(model, 0.3)
    model.train()
    enable_gradient_checkpointing(model)
    got = gradients(model, seed=7)
    monkeypatch.setattr(mx, "checkpoint", lambda fn: fn)  # the same keyed blocks, no recomputation
    assert_same(got, gradients(model, seed=7))


# -- batching --------------------------------------------------------------------------------------------

def test_batches_are_bucketed_padded_and_reproducible():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=(100, 2))
    first = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert [b.tolist() for b in first] == [b.tolist() for b in epoch_batches(lengths, 8, seed=1, epoch=0)]
    assert [b.tolist() for b in first] != [b.tolist() for b in epoch_batches(lengths, 8, seed=1, epoch=1)]
    assert sorted(np.concatenate(first).tolist()) == list(range(100))

    batch = collate([[5, 6, 1], [7, 1]], [[9, 1], [4, 4, 4, 4, 4, 4, 4, 4, 1]])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 16)
    assert batch["labels"][0].tolist() == [9, 1] + [-100] * 14
    assert batch["decoder_input_ids"][0].tolist() == [0, 9, 1] + [0] * 13
    assert batch["attention_mask"].tolist()[1] == [1, 1] + [0] * 6


# -- command line ----------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (["--init", "small", "--learning-rate", "-1"], "learning_rate must be > 0"),
    (["--init", "small", "--preset", "nope"], "unknown preset 'nope'"),
    (["--init", "small", "--dtype", "fp16"], "fp16"),
    (["--init", "small", "--data", "missing/rows.jsonl"], "data file not found: missing/rows.jsonl"),
    (["--resume", "no/such/run"], "no/such/run: no checkpoint"),
]


@pytest.mark.parametrize("flags, message", BAD_CONFIGS)
def test_bad_config_fails_before_any_work(tmp_path, capsys, flags, message):
    from mlx_t5.train import main

    out = tmp_path / "run"
    assert main([*flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_config_on_the_command_line_exits_2_without_traceback(tmp_path):
    flags, message = BAD_CONFIGS[0]
    proc = subprocess.run([sys.executable, "-m", "mlx_t5.train", *flags, "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


# -- random init -----------------------------------------------------------------------------------------

def test_init_follows_t5_scheme_and_seed():
    model = init_model("small", seed=3)
    params = dict(tree_flatten(model.parameters()))
    assert sum(v.size for v in params.values()) == 76_961_152  # google/flan-t5-small
    args = model.args
    expected = {
        "shared.weight": 1.0, "lm_head.weight": 1.0,
        "encoder.block.0.layer.0.SelfAttention.q.weight": (args.d_model * args.d_kv) ** -0.5,
        "encoder.block.0.layer.0.SelfAttention.k.weight": args.d_model ** -0.5,
        "decoder.block.1.layer.1.EncDecAttention.o.weight": (args.num_heads * args.d_kv) ** -0.5,
        "decoder.block.0.layer.2.DenseReluDense.wi_0.weight": args.d_model ** -0.5,
        "encoder.block.2.layer.1.DenseReluDense.wo.weight": args.d_ff ** -0.5,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": args.d_model ** -0.5,
    }
    for name, std in expected.items():
        value = np.array(params[name])
        noise = 5 / math.sqrt(value.size)  # sampling error of the mean / std estimates
        assert abs(value.mean()) < noise * std and abs(value.std() / std - 1) < noise, name
    assert np.all(np.array(params["decoder.final_layer_norm.weight"]) == 1.0)
    tiny = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 50}
    same = [dict(tree_flatten(init_model(tiny, seed=s).parameters())) for s in (3, 3, 4)]
    name = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    assert mx.array_equal(same[0][name], same[1][name]) and not mx.array_equal(same[0][name], same[2][name])
    assert (SHAPES["base"]["d_model"], SHAPES["large"]["num_heads"], SHAPES["large"]["d_ff"]) == (768, 16, 2816)


def test_from_scratch_with_task_tokenizer_and_augmentation_trains_resumes_and_loads_in_transformers(
        workdir, tmp_path, examples):
    """A random init with a task tokenizer learned on the train split and entity-swapped copies: it trains,
    resumes exactly (the checkpoint carries the tokenizer), prints test examples, and final/ is an HF
    checkpoint whose own tokenizer transformers loads and whose greedy answers equal MLX's."""
    from transformers import AutoTokenizer

    shape = dict(SHAPES["small"], d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                 feed_forward_proj="relu", tie_word_embeddings=True)
    (tmp_path / "shape.json").write_text(json.dumps(shape))
    common = dict(model=None, init=str(tmp_path / "shape.json"), split_fractions=[0.75, 0.0, 0.25],
                  tokenizer_vocab_size=320, augment_copies=2, augment_names="letters", max_steps=8, batch_size=8,
                  save_every=4, learning_rate=3e-3, eval_max_new_tokens=8)
    console_out = io.StringIO()
    full = train(config(workdir, tmp_path / "full", **common), Console(file=console_out, width=120))
    assert "entity-swapped" in console_out.getvalue() and "Test examples" in console_out.getvalue()
    train_and_kill(config(workdir, tmp_path / "killed", **common), tmp_path)
    assert (tmp_path / "killed" / "checkpoint" / "tokenizer.json").is_file()
    resumed = run(config(workdir, tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint"), **common))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)

    final = tmp_path / "full" / "final"
    model, tokenizer = mlx_t5.load(final)
    assert len(tokenizer) <= 320 and model.args.vocab_size == len(tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(final)
    hf = T5ForConditionalGeneration.from_pretrained(final).eval()
    queries = [e.source for e in examples[:4]]
    batch = hf_tokenizer(queries, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = hf.generate(**batch, max_new_tokens=8, do_sample=False, num_beams=1)
    want = hf_tokenizer.batch_decode(want, skip_special_tokens=True)
    got = predict(model, tokenizer, [e.query for e in examples[:4]], max_new_tokens=8)
    assert got == want
