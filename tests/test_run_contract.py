"""One config, two trainers: the same evaluation rows, the same run folder (reformulation.run)."""

import json

import pytest
from rich.console import Console

from reformulation.config import load_config
from reformulation.data import Example
from reformulation.run import eval_indices, is_better

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")


def test_eval_indices_are_spread_fixed_and_independent_of_the_seed():
    picked = eval_indices(1000, 50)
    assert picked == sorted(set(picked)) and len(picked) == 50 and picked == eval_indices(1000, 50)
    assert max(picked) > 500  # spread over the split, not its first rows
    assert eval_indices(30, 50) == list(range(30)) and eval_indices(30, 0) == list(range(30))


def test_is_better_prefers_rouge_then_loss():
    assert is_better(0.1, 9.0, None, None)
    assert is_better(0.3, 2.0, 0.2, 1.0) and not is_better(0.1, 0.5, 0.2, 1.0)
    assert is_better(0.2, 0.9, 0.2, 1.0) and not is_better(0.2, 1.1, 0.2, 1.0)


pytestmark = pytest.mark.usefixtures("torch_one_thread", "blas_one_thread")  # tiny models: one thread each


@pytest.fixture(scope="module")
def tiny_v1_init(tmp_path_factory):
    """A T5 v1.0 shape (ReLU, tied head) small enough to train a few steps in seconds on either engine."""
    path = tmp_path_factory.mktemp("init") / "config.json"
    path.write_text(json.dumps(dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                    num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=400,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))
    return path


@pytest.fixture(scope="module")
def contract_runs(tmp_path_factory, full_jsonl, tiny_v1_init):
    from mlx_t5.trainer import Trainer
    from torch_t5 import train as torch_train

    root = tmp_path_factory.mktemp("contract")
    common = dict(init=str(tiny_v1_init), data=[str(full_jsonl)], split="target", sample_fraction=0.03,
                  tokenizer_vocab_size=400, max_source_length=32, max_target_length=24, batch_size=4, max_steps=4,
                  eval_every=2, eval_samples=6, eval_batch_size=8, eval_max_new_tokens=6, warmup_steps=0,
                  learning_rate=3e-3, lr_schedule="constant", dropout=0.0, log_every=2)
    configs = {name: load_config(None, dict(common, output_dir=str(root / name))) for name in ("mlx", "torch")}
    Trainer(configs["mlx"], Console(quiet=True)).train()
    torch_train.train(configs["torch"], console=Console(quiet=True))
    return configs


def test_both_trainers_evaluate_the_same_rows(contract_runs):
    from mlx_t5.trainer import Trainer
    from reformulation.recipe import task_tokenizer
    from torch_t5 import train as torch_train

    cfg = contract_runs["mlx"]
    trainer = Trainer(cfg, Console(quiet=True))
    splits = trainer._load_splits()
    tokenizer = task_tokenizer(cfg, splits.train)
    mlx_valid = trainer._tokenize_splits(tokenizer, splits)[1].examples
    torch_valid = torch_train.load_data(contract_runs["torch"], tokenizer)[1].examples
    assert len(mlx_valid) == 6 and all(isinstance(e, Example) for e in mlx_valid)
    assert mlx_valid == torch_valid


def test_both_trainers_write_the_same_run_folder(contract_runs):
    from pathlib import Path

    summaries = {}
    for name, cfg in contract_runs.items():
        out = Path(cfg.output_dir)
        for folder in ("final", "best"):
            assert (out / folder / "model.safetensors").is_file(), (name, folder)
            assert (out / folder / "tokenizer.json").is_file(), (name, folder)
        assert (out / "curves.png").is_file() and (out / "metrics.jsonl").is_file()
        summaries[name] = json.loads((out / "summary.json").read_text())
    for key in ("test_model_step", "test_rouge_l", "test_loss", "eval_rouge_l", "eval_loss"):
        assert all(key in s for s in summaries.values()), key
    evals = {name: [json.loads(line)["step"] for line in (Path(cfg.output_dir) / "metrics.jsonl").open()
                    if "eval_loss" in json.loads(line)] for name, cfg in contract_runs.items()}
    assert evals["mlx"] == evals["torch"] == [2, 4]
