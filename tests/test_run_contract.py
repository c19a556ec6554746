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
    from mlx_t5.trainer import train
    from torch_t5 import train as torch_train

    root = tmp_path_factory.mktemp("contract")
    common = dict(init=str(tiny_v1_init), data=[str(full_jsonl)], split="target", sample_fraction=0.03,
                  tokenizer_vocab_size=400, max_source_length=32, max_target_length=24, batch_size=4, max_steps=4,
                  eval_every=2, eval_samples=6, eval_batch_size=8, eval_max_new_tokens=6, warmup_steps=0,
                  learning_rate=3e-3, lr_schedule="constant", dropout=0.0, log_every=2)
    configs = {name: load_config(None, dict(common, output_dir=str(root / name))) for name in ("mlx", "torch")}
    train(configs["mlx"], Console(quiet=True))
    torch_train.train(configs["torch"], console=Console(quiet=True))
    return configs


def test_both_trainers_evaluate_the_same_rows(contract_runs):
    from mlx_t5.trainer import build_data, load_splits
    from reformulation.recipe import task_tokenizer
    from torch_t5 import train as torch_train

    cfg = contract_runs["mlx"]
    splits = load_splits(cfg, Console(quiet=True))
    tokenizer = task_tokenizer(cfg, splits.train)
    mlx_valid = build_data(cfg, tokenizer, splits).valid.examples
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


def test_both_trainers_save_the_same_phrasebook_with_every_model(contract_runs):
    """drafts.json (speculative decoding's phrasebook) beside final/ and best/: the train split's targets in the
    run's vocabulary, the same on both engines, and loadable for that tokenizer."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from mlx_t5.trainer import load_splits
    from reformulation.speculative import DRAFTS_FILE, Phrasebook

    books = {}
    for name, cfg in contract_runs.items():
        for folder in ("final", "best"):
            path = Path(cfg.output_dir) / folder
            books[name, folder] = Phrasebook.load(path, len(AutoTokenizer.from_pretrained(path)))
            assert (path / DRAFTS_FILE).is_file() and books[name, folder] is not None, (name, folder)
    assert len({json.dumps(sorted(map(list, b.table.items()))) for b in books.values()}) == 1
    cfg = contract_runs["mlx"]
    tok = AutoTokenizer.from_pretrained(Path(cfg.output_dir) / "final")
    target = tok(load_splits(cfg, Console(quiet=True)).train[0].target)["input_ids"]
    book = books["mlx", "final"]
    assert (0,) in book.table and (0, *target[:2]) in book.table and tuple(target[-3:-1]) in book.table


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, full_jsonl):
    """The same LoRA config (fuse on) on both engines, on one saved (random-weight) base model."""
    from mlx_t5.trainer import train
    from torch_t5 import train as torch_train

    from hf_models import make_model, save_word_tokenizer

    from reformulation.data import read_jsonl

    root = tmp_path_factory.mktemp("lora-contract")
    rows = read_jsonl(full_jsonl).examples
    tok = save_word_tokenizer([e.source for e in rows] + [e.target for e in rows], root / "base")
    make_model("v1-relu-tied", vocab_size=len(tok)).save_pretrained(root / "base")
    common = dict(model=str(root / "base"), data=[str(full_jsonl)], split="target", sample_fraction=0.02,
                  max_source_length=32, max_target_length=24, batch_size=4, max_steps=2,
                  eval_every=2, eval_samples=4, eval_batch_size=8, eval_max_new_tokens=4, learning_rate=3e-3,
                  dropout=0.0, log_every=1, lora=True, lora_targets="all", fuse=True)
    configs = {name: load_config(None, dict(common, output_dir=str(root / name))) for name in ("mlx", "torch")}
    train(configs["mlx"], Console(quiet=True))
    torch_train.train(configs["torch"], console=Console(quiet=True))
    return configs


def test_lora_runs_have_the_same_layout_on_both_engines(lora_runs):
    """adapter/: the adapters; final/: the fused model (an HF folder); best/: the best evaluation's adapters."""
    from pathlib import Path

    from reformulation.run import ADAPTER_DIR, BEST_DIR, FINAL_DIR, SHARED_SUMMARY_KEYS

    for name, cfg in lora_runs.items():
        out = Path(cfg.output_dir)
        assert (out / ADAPTER_DIR / "adapter_config.json").is_file(), name
        assert (out / FINAL_DIR / "model.safetensors").is_file() and (out / FINAL_DIR / "config.json").is_file(), name
        assert (out / BEST_DIR / "adapter_config.json").is_file(), name
        assert all((out / d / "drafts.json").is_file() for d in (ADAPTER_DIR, FINAL_DIR, BEST_DIR)), name
        summary = json.loads((out / "summary.json").read_text())
        assert set(SHARED_SUMMARY_KEYS) <= set(summary), (name, set(SHARED_SUMMARY_KEYS) - set(summary))


def test_resume_auto_refuses_the_other_engines_checkpoint(tmp_path):
    """An output folder holding only the other engine's checkpoint: a clear error on both, not a fresh start
    that would overwrite it."""
    from mlx_t5.checkpoint import TrainError, find_resume
    from reformulation.config import ConfigError
    from torch_t5.train import resolve_resume

    (tmp_path / "mlx" / "checkpoint").mkdir(parents=True)
    (tmp_path / "mlx" / "checkpoint" / "trainer_state.json").write_text("{}")
    (tmp_path / "torch" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / "torch" / "checkpoint-8" / "trainer_state.json").write_text("{}")
    def cfg(out, resume="auto"):
        return load_config(None, dict(init="small", output_dir=str(tmp_path / out), resume=resume))

    with pytest.raises(ConfigError, match="holds a MLX checkpoint.*python -m mlx_t5.train"):
        resolve_resume(cfg("mlx"))
    with pytest.raises(TrainError, match="holds a torch checkpoint.*python -m torch_t5.train"):
        find_resume(cfg("torch"), Console(quiet=True))
    with pytest.raises(ConfigError, match="is an MLX checkpoint"):
        resolve_resume(cfg("x", resume=str(tmp_path / "mlx")))
    assert find_resume(cfg("new"), Console(quiet=True)) is None  # nothing there: a fresh start
