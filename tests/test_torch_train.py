"""torch_t5.train on tiny random T5s (CPU): SFT, LoRA, resume, output folder, clean errors."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from hf_models import save_model
from reformulation.config import PRESETS, add_config_args, config_from_args, load_config
from torch_t5 import presets
from torch_t5 import train as torch_train

# A Flan-shaped (gated-gelu, untied head) T5 small enough to train a few dozen steps in seconds.
TINY = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128, d_model=64, d_kv=16,
            d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: tiny matmuls, one thread


def common_flags(full_jsonl, out, **extra):
    flags = dict(data=full_jsonl, sample_fraction=0.01, max_source_length=32, max_target_length=24, batch_size=4,
                 eval_batch_size=8, eval_samples=8, eval_max_new_tokens=6, log_every=2, warmup_steps=0,
                 preset="cpu", output_dir=out)
    flags.update(extra)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_config, full_jsonl, tokenizer_dir):
    out = tmp_path_factory.mktemp("sft") / "run"
    argv = ["--init", str(tiny_config), "--tokenizer", str(tokenizer_dir), "--max-steps", "12",
            "--learning-rate", "3e-3", "--lr-schedule", "constant", "--eval-every", "6"]
    assert torch_train.main(argv + common_flags(full_jsonl, out)) == 0
    return out


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_decreases(sft_run):
    losses = [r["loss"] for r in records(sft_run) if "loss" in r]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses


def test_sft_output_folder(sft_run, tiny_config):
    final = sft_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # explicit: transformers 5 and mlx_t5 would tie otherwise
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), "pt") as f:
        head, embed = f.get_tensor("lm_head.weight"), f.get_tensor("shared.weight")
    assert not torch.equal(head, embed)

    evals = [r for r in records(sft_run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0 <= r["eval_rouge_l"] <= 1 and "eval_exact_match" in r for r in evals)
    assert any("test_rouge_l" in r for r in records(sft_run))
    assert (sft_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((sft_run / "summary.json").read_text())
    for key in ("train_runtime", "train_samples_per_second", "eval_loss", "eval_rouge_l", "eval_runtime",
                "eval_samples_per_second", "test_rouge_l"):
        assert key in summary, key
    assert summary["eval_loss"] == evals[-1]["eval_loss"]  # the last step's eval, not a second pass

    cfg = load_config(sft_run / "config.yaml")
    assert cfg.max_steps == 12 and cfg.init == str(tiny_config) and cfg.preset == "cpu"


def test_sft_keeps_the_best_evaluation_and_scores_the_test_split_with_it(sft_run):
    # the run contract (reformulation.run): best/ = highest eval ROUGE-L, then lowest loss, as the MLX trainer keeps it
    evals = [r for r in records(sft_run) if "eval_loss" in r]
    best = max(evals, key=lambda r: (r["eval_rouge_l"], -r["eval_loss"]))
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["test_model_step"] == best["step"]
    from safetensors.torch import load_file

    kept, final = (load_file(str(sft_run / d / "model.safetensors")) for d in ("best", "final"))
    assert kept.keys() == final.keys()
    assert all(torch.equal(kept[k], final[k]) for k in kept) == (best["step"] == evals[-1]["step"])


@pytest.mark.parametrize("shape, lora", [("v1-relu-tied", False), ("odd-heads", False), ("odd-heads", True)])
def test_load_best_restores_the_saved_weights_in_place(shape, lora, tokenizer, tmp_path):
    from hf_models import make_model

    cfg = load_config(None, {"init": "small", "output_dir": str(tmp_path), "lora": lora, "lora_targets": "all"})
    model = make_model(shape)
    if lora:
        model = torch_train.apply_lora(model, cfg)
    torch_train.save_model(model, tokenizer, tmp_path / "best", cfg)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert not all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    torch_train.load_best(model, tmp_path / "best", cfg)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_final_folder_loads_in_mlx_with_equal_logits(sft_run):
    mlx_t5 = pytest.importorskip("mlx_t5")
    import mlx.core as mx
    from transformers import AutoModelForSeq2SeqLM

    model, tokenizer = mlx_t5.load(sft_run / "final")
    reference = AutoModelForSeq2SeqLM.from_pretrained(str(sft_run / "final")).eval()
    batch = tokenizer(["reformulate: Who lived longer, Nikola Tesla or Milutin Milankovic?",
                       "reformulate: capital of France"], return_tensors="np", padding=True)
    decoder = np.array([[0, 71, 1567, 5, 9], [0, 12, 3, 4, 1]])
    logits = model(mx.array(batch["input_ids"]), mx.array(decoder), attention_mask=mx.array(batch["attention_mask"]))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(batch["input_ids"]),
                             attention_mask=torch.tensor(batch["attention_mask"]),
                             decoder_input_ids=torch.tensor(decoder)).logits.numpy()
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-4, rtol=0)


def test_resume_auto_continues_then_max_minutes_stops(sft_run, tmp_path, full_jsonl, tiny_config, tokenizer_dir):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(sft_run / "checkpoint-12", out / "checkpoint-12")
    (out / "metrics.jsonl").write_text((sft_run / "metrics.jsonl").read_text())
    # resume at 12 towards 40, but the time budget is spent after the first step: checkpoint 13 and stop
    argv = ["--init", str(tiny_config), "--tokenizer", str(tokenizer_dir), "--max-steps", "40",
            "--learning-rate", "3e-3", "--lr-schedule", "constant", "--eval-every", "0", "--resume", "auto",
            "--max-minutes", "1e-6"]
    assert torch_train.main(argv + common_flags(full_jsonl, out)) == 0
    state = json.loads((out / "checkpoint-13" / "trainer_state.json").read_text())
    assert state["global_step"] == 13
    losses = [r["step"] for r in records(out) if "loss" in r]
    assert losses == [2, 4, 6, 8, 10, 12]  # the first run's log, kept once
    assert any(r.get("step") == 13 and "eval_loss" in r for r in records(out))  # evaluated where it stopped
    assert (out / "final" / "model.safetensors").is_file()


def test_lora_adapter_matches_trained_model(tmp_path, full_jsonl, tokenizer_dir):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base_dir = save_model("odd-heads", tmp_path / "base", tokenizer_dir)
    out = tmp_path / "lora"
    overrides = dict(model=str(base_dir), lora=True, lora_targets="all", lora_rank=4, fuse=True, max_steps=4,
                     learning_rate=1e-2, lr_schedule="constant", eval_every=0, data=[str(full_jsonl)],
                     sample_fraction=0.005, max_source_length=32, max_target_length=24, batch_size=4,
                     eval_samples=4, eval_max_new_tokens=4, warmup_steps=0, preset="cpu", output_dir=str(out))
    result = torch_train.train(load_config(None, overrides))

    adapter = out / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert adapter_config["base_model_name_or_path"] == str(base_dir)

    trained = result.model.eval()
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the adapter moved away from its zero init

    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(base_dir)), str(adapter)).eval()
    fused = AutoModelForSeq2SeqLM.from_pretrained(str(out / "final")).eval()
    batch = result.tokenizer(["reformulate: Who lived longer, Nikola Tesla or Milutin Milankovic?"],
                             return_tensors="pt")
    decoder = torch.tensor([[0, 71, 1567, 5]])
    with torch.no_grad():
        expected = trained(**batch, decoder_input_ids=decoder).logits
        base_logits = AutoModelForSeq2SeqLM.from_pretrained(str(base_dir))(**batch, decoder_input_ids=decoder).logits
        torch.testing.assert_close(reloaded(**batch, decoder_input_ids=decoder).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused(**batch, decoder_input_ids=decoder).logits, expected, atol=1e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 1e-3  # the comparison above is not base vs base


@pytest.mark.parametrize("flags, message", [
    (["--init", "huge"], "init must be one of"),
    (["--init", "small", "--dtype", "float16"], "fp16"),
    (["--init", "small", "--learning-rate", "-1"], "learning_rate must be > 0"),
    (["--model", "x", "--lora", "--quantize-base", "8"], "needs a CUDA GPU"),
    (["--init", "small", "--lora"], "lora trains adapters on a frozen pretrained base"),
    (["--init", "small", "--data", "BAD_JSONL"], ":2: invalid JSON"),
    (["--init", "small", "--data", "EMPTY_SAMPLE", "--sample-fraction", "0.001"], "no training examples"),
])
def test_bad_config_is_one_clean_line(flags, message, tmp_path, capsys, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a?", "subqueries": "a"}\n{"query": oops}\n')
    small = tmp_path / "small.jsonl"
    small.write_text('{"query": "a?", "subqueries": "a"}\n')
    flags = [{"BAD_JSONL": str(bad), "EMPTY_SAMPLE": str(small)}.get(f, f) for f in flags]
    base = tmp_path / "x"
    if "x" in flags:  # a real model folder, so the error is the GPU one and not a missing model
        save_model("odd-heads", base, tokenizer_dir)
        flags = [str(base) if f == "x" else f for f in flags]
    code = torch_train.main(flags + ["--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--preset", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name, expected", [
    ("Tesla T4", "t4"), ("NVIDIA L4", "l4"), ("NVIDIA A10G", "a10g"), ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA H100 80GB HBM3", "a100"),
])
def test_preset_detected_from_gpu_name(name, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: name)
    preset, why = presets.detect_preset()
    assert preset == expected and preset in PRESETS and name in why


def test_preset_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(presets.platform, "system", lambda: "Linux")
    assert presets.detect_preset()[0] == "cpu"
    monkeypatch.setattr(presets.platform, "system", lambda: "Darwin")
    assert presets.detect_preset()[0] == "m2"


def test_detected_preset_is_applied_below_flags(monkeypatch):
    monkeypatch.setattr(torch_train, "detect_preset", lambda: ("t4", "test"))
    args = torch_train.build_parser().parse_args(["--init", "small", "--batch-size", "3"])
    cfg = torch_train.resolve_config(args)
    assert cfg.preset == "t4"
    assert cfg.grad_accum == PRESETS["t4"]["grad_accum"]  # from the preset
    assert cfg.batch_size == 3  # the flag wins over the preset
    args = torch_train.build_parser().parse_args(["--init", "small", "--preset", "a100"])
    assert torch_train.resolve_config(args).preset == "a100"


def test_a_config_file_is_read_as_written_by_both_trainers(monkeypatch, tmp_path):
    # no detected preset under a config file: the cpu preset would train torch on a tenth of the data
    monkeypatch.setattr(torch_train, "detect_preset", lambda: ("cpu", "test"))
    path = tmp_path / "run.yaml"
    path.write_text("init: small\nlearning_rate: 1.0e-3\n")
    cfg = torch_train.resolve_config(torch_train.build_parser().parse_args(["--config", str(path)]))
    mlx_cfg = config_from_args(add_config_args(argparse.ArgumentParser()).parse_args(["--config", str(path)]))
    assert cfg == mlx_cfg
    assert cfg.preset is None and cfg.sample_fraction == 1.0 != PRESETS["cpu"]["sample_fraction"]
    flags = ["--config", str(path), "--preset", "cpu"]
    named = torch_train.resolve_config(torch_train.build_parser().parse_args(flags))
    assert named.sample_fraction == PRESETS["cpu"]["sample_fraction"] and named.learning_rate == 1.0e-3


def test_token_mean_loss_is_exact_over_accumulated_micro_batches(tokenizer):
    from hf_models import make_model

    model = make_model("deep-decoder")
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100], [9, 10, 1, -100], [11, 1, -100, -100]])
    inputs = torch.tensor([[3, 4, 1], [5, 1, 0], [6, 7, 1], [8, 1, 0]])
    with torch.no_grad():
        whole = model(input_ids=inputs, labels=labels)
        assert torch.allclose(torch_train.token_mean_loss(whole, labels), whole.loss)
        # two micro-batches of 7 and 4 label tokens: their losses must add up to the mean over all 11
        n = labels.ne(-100).sum()
        halves = [torch_train.token_mean_loss(model(input_ids=inputs[s], labels=labels[s]), labels[s], n)
                  for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(sum(halves), whole.loss)


def test_torchrun_two_processes_is_real_ddp(tmp_path, tiny_config, full_jsonl, tokenizer_dir):
    import os
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "ddp"
    argv = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "torch_t5.train", "--init", str(tiny_config),
            "--tokenizer", str(tokenizer_dir), "--max-steps", "2", "--eval-every", "0",
            *common_flags(full_jsonl, out, log_every=1, eval_samples=4, eval_max_new_tokens=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=torch_train._REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    from reformulation.data import load_examples, make_splits

    train_rows = len(make_splits(load_examples(full_jsonl), sample_fraction=0.01).train)
    first = next(r for r in records(out) if "loss" in r)
    # each optimizer step takes batch_size rows on each of the 2 processes: the epoch advances twice as fast
    assert first["epoch"] == pytest.approx(1 / -(-train_rows // 8), rel=0.01)
    assert (out / "final" / "model.safetensors").is_file()


def test_task_tokenizer_and_augmentation_from_scratch(tmp_path, tiny_config, full_jsonl, capsys):
    """The same from-scratch keys as the MLX trainer: a tokenizer learned on the train split (the model gets one
    embedding row per id) and entity-swapped rows; final/ loads in transformers with that tokenizer."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from reformulation.data import load_examples, make_splits
    from reformulation.recipe import training_examples

    out = tmp_path / "run"
    argv = ["--init", str(tiny_config), "--max-steps", "4", "--learning-rate", "3e-3", "--tokenizer-vocab-size",
            "400", "--augment-copies", "2", "--augment-names", "letters", "--eval-every", "0"]
    assert torch_train.main(argv + common_flags(full_jsonl, out, sample_fraction=0.02)) == 0
    printed = capsys.readouterr().out
    cfg = load_config(None, dict(data=[str(full_jsonl)], sample_fraction=0.02, augment_copies=2,
                                 augment_names="letters", init="small"))
    splits = make_splits(load_examples(cfg.data), "target", None, 0.02, cfg.seed)
    extra = len(training_examples(cfg, splits.train)) - len(splits.train)
    assert extra > 0 and f"+ {extra:,} entity-swapped" in printed and "Test examples" in printed

    final = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = T5ForConditionalGeneration.from_pretrained(final)
    assert len(tokenizer) <= 400 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.decode(tokenizer("Māori|x").input_ids, skip_special_tokens=True) == "Māori|x"


def test_evaluation_batches_keep_the_dataset_order(tokenizer, tmp_path):
    # transformers 5 length-groups evaluation batches too under group_by_length: GenerationMetrics pairs the
    # i-th prediction with the i-th reference, so a shuffled order scored every row against another's target
    from hf_models import make_model
    from transformers import DataCollatorForSeq2Seq

    cfg = load_config(None, {"init": "small", "output_dir": str(tmp_path), "eval_every": 5, "eval_batch_size": 4})
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(2, 40, size=24)]
    rows = [{"input_ids": [5] * (n - 1) + [1], "labels": [6, 1]} for n in lengths]
    model = make_model("deep-decoder")
    trainer = torch_train._trainer_class()(
        model=model, args=torch_train.training_arguments(cfg, has_eval=True), processing_class=tokenizer,
        eval_dataset=rows, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100))
    seen = [int(n) for batch in trainer.get_eval_dataloader(rows) for n in batch["attention_mask"].sum(1)]
    assert seen == lengths
