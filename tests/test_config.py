"""reformulation.config (precedence, validation, CLI flags, save/load) and reformulation.io (atomic writes,
JSON reads)."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest

from reformulation.config import (
    PRESET_DESCRIPTIONS,
    PRESETS,
    ConfigError,
    TrainConfig,
    add_config_args,
    config_from_args,
    load_config,
    print_config,
)
from reformulation.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text('{"query": "q", "subqueries": "s"}\n')
    return str(path)


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name="train.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_defaults():
    cfg = TrainConfig()
    assert cfg.model is None and cfg.init is None
    assert cfg.data == ["../shared/datasets/full.jsonl"] and cfg.split == "target"
    assert (cfg.batch_size, cfg.grad_accum, cfg.learning_rate, cfg.epochs) == (8, 1, 3e-4, 3.0)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.dtype, cfg.max_grad_norm) == ("adamw", "linear", "float32", 1.0)
    lora = (cfg.lora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.quantize_base)
    assert lora == (False, 8, 16.0, "qv", None)
    assert TrainConfig().data is not cfg.data  # no shared mutable default


def test_precedence_defaults_preset_yaml_overrides(data, write_yaml):
    # YAML 1.1 reads "1e-4" as a string: it must still become a float
    path = write_yaml(f"preset: t4\ninit: small\ndata: [{data}]\nlearning_rate: 1e-4\nepochs: 2\n")
    cfg = load_config(path, {"epochs": 7, "seed": None})
    assert cfg.epochs == 7.0  # override beats YAML
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)  # YAML beats preset
    assert (cfg.batch_size, cfg.grad_accum, cfg.warmup_steps) == (8, 4, 100)  # preset beats defaults
    assert cfg.seed == 42  # None in overrides = not given
    assert cfg.max_source_length == 64  # default
    # a preset named in the overrides replaces the one in the file
    cfg = load_config(path, {"preset": "a100"})
    assert (cfg.preset, cfg.batch_size, cfg.dtype, cfg.learning_rate) == ("a100", 64, "bfloat16", 1e-4)


def test_null_in_yaml_clears_a_value(data, write_yaml):
    cfg = load_config(write_yaml(f"init: small\ndata: [{data}]\nmax_grad_norm: null\ndropout: 0.1\n"))
    assert cfg.max_grad_norm is None and cfg.dropout == 0.1


def test_unknown_keys_are_named(data, write_yaml):
    with pytest.raises(ConfigError, match=r"train\.yaml: unknown key\(s\) batchsize, lr"):
        load_config(write_yaml(f"init: small\ndata: [{data}]\nlr: 1\nbatchsize: 4\n"))
    with pytest.raises(ConfigError, match=r"overrides: unknown key\(s\) learning_rte"):
        load_config(None, {"learning_rte": 1e-3})


def test_bad_yaml_and_types(write_yaml):
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: invalid YAML"):
        load_config(write_yaml("init: small\n  batch_size: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_yaml("- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="batch_size must be int, got 'eight'"):
        load_config(write_yaml("batch_size: eight\n", "t.yaml"))
    with pytest.raises(ConfigError, match="batch_size must be int, got 2.5"):
        load_config(None, {"batch_size": 2.5})
    with pytest.raises(ConfigError, match="lora must be bool"):
        load_config(None, {"lora": "maybe"})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/train.yaml")


VALID = {"init": "small"}
ERRORS = [
    ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"preset": "h100"}, "unknown preset 'h100'; known presets: m2, cpu, t4, l4, a10g, a100"),
    ({"dtype": "float16"}, "T5 overflows in fp16; use bfloat16 or float32"),
    ({"dtype": "fp16"}, "T5 overflows in fp16"),
    ({"dtype": "int8"}, "dtype must be one of float32, bfloat16"),
    ({"data": ["missing/nowhere.jsonl"]}, "data file not found: missing/nowhere.jsonl"),
    ({"split": "rows"}, "split must be one of target, random"),
    ({"split_fractions": [0.8, 0.3, 0.1]}, "split_fractions must be three numbers"),
    ({"split_fractions": [0.9, 0.1]}, "split_fractions must be three numbers"),
    ({"sample_fraction": 0}, "sample_fraction must be in (0, 1]"),
    ({"model": "google/flan-t5-small"}, "set either model (fine-tune) or init (random init), not both"),
    ({"init": None}, "set model (an HF folder or hub id) or init"),
    ({"init": "huge"}, "init must be one of small, base, large or a config.json path"),
    ({"init": "nowhere/config.json"}, "init config not found: nowhere/config.json"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"epochs": 0}, "epochs must be > 0"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"optimizer": "sgd"}, "optimizer must be one of adamw, adafactor"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of linear, cosine, constant"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"max_grad_norm": 0}, "max_grad_norm must be > 0"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"max_source_length": 1}, "max_source_length must be >= 2"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"eval_num_beams": 0}, "eval_num_beams must be >= 1"),
    ({"log_every": 0}, "log_every must be >= 1"),
    ({"lora": True, "lora_rank": 0}, "lora_rank must be >= 1"),
    ({"lora": True, "lora_alpha": 0}, "lora_alpha must be > 0"),
    ({"lora": True, "lora_targets": "qx"}, "lora_targets must be qv, all or a comma list"),
    ({"lora": True, "lora_targets": "q,wq"}, "(unknown: wq)"),
    ({"lora": True, "quantize_base": 3}, "quantize_base must be 4, 8 or none"),
    ({"quantize_base": 4}, "quantize_base trains LoRA adapters on a quantized base: it needs lora: true"),
    ({"fuse": True}, "fuse merges LoRA adapters into the model: it needs lora: true"),
    ({"resume": "runs/does-not-exist"}, "resume checkpoint not found: runs/does-not-exist"),
    ({"init": None, "resume": "auto"}, "set model (an HF folder or hub id) or init"),
]


@pytest.mark.parametrize("overrides, message", ERRORS, ids=[m for _, m in ERRORS])
def test_each_config_error(data, overrides, message):
    values = {**VALID, "data": [data], **overrides}
    cfg = TrainConfig(**values)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_all_problems_in_one_message(data):
    with pytest.raises(ConfigError) as info:
        TrainConfig(init="small", data=[data], batch_size=0, learning_rate=-1).validate()
    assert "batch_size must be >= 1" in str(info.value) and "learning_rate must be > 0" in str(info.value)


def test_valid_configs(data, tmp_path):
    assert TrainConfig(init="small", data=[data]).validate().init == "small"
    assert TrainConfig(model="some/hub-id", data=[data], lora=True, quantize_base=4, fuse=True,
                       lora_targets="q,k,wo").validate().lora_modules() == ("q", "k", "wo")
    assert TrainConfig(init="small", data=[data], lora_targets="all").lora_modules()[:4] == ("q", "k", "v", "o")
    config_json = tmp_path / "config.json"
    config_json.write_text("{}")
    TrainConfig(init=str(config_json), data=[data]).validate()
    # resume alone is enough: the checkpoint names the model
    TrainConfig(resume=str(tmp_path), data=[data]).validate()
    TrainConfig(resume="auto", init="small", data=[data]).validate()  # the latest checkpoint in output_dir
    # dtype aliases
    assert load_config(None, {"init": "small", "data": [data], "dtype": "bf16"}).dtype == "bfloat16"


def test_presets_are_valid_and_described(data):
    assert set(PRESETS) == set(PRESET_DESCRIPTIONS) >= {"m2", "cpu", "t4", "l4", "a10g", "a100"}
    for name in PRESETS:
        cfg = load_config(None, {"preset": name, "init": "small", "data": [data]})
        assert cfg.preset == name and cfg.dtype in ("float32", "bfloat16")
    m2 = load_config(None, {"preset": "m2", "init": "small", "data": [data]})
    assert (m2.batch_size, m2.grad_accum, m2.learning_rate, m2.epochs, m2.sample_fraction, m2.warmup_steps,
            m2.weight_decay) == (2, 2, 3e-5, 3.0, 0.1, 50, 0.01)
    t4 = load_config(None, {"preset": "t4", "init": "small", "data": [data]})
    assert (t4.batch_size, t4.grad_accum, t4.learning_rate, t4.epochs, t4.dtype) == (8, 4, 3e-5, 5.0, "float32")
    assert load_config(None, {"preset": "a100", "init": "small", "data": [data]}).dtype == "bfloat16"


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_cli_flags(data, write_yaml):
    path = write_yaml(f"init: small\ndata: [{data}]\nlora: true\nbatch_size: 4\nlearning_rate: 1e-4\n")
    cfg = parse(["--config", str(path), "--learning-rate", "1e-3", "--lora-targets", "all", "--max-grad-norm", "none"])
    assert cfg.learning_rate == 1e-3 and cfg.lora_targets == "all" and cfg.max_grad_norm is None
    assert cfg.batch_size == 4 and cfg.lora is True  # not typed: the file's values stand
    assert parse(["--config", str(path), "--no-lora"]).lora is False
    cfg = parse(["--init", "base", "--data", f"{data},{data}", "--split-fractions", "0.7,0.2,0.1", "--preset", "cpu",
                 "--epochs", "2"])
    assert cfg.data == [data, data] and cfg.split_fractions == [0.7, 0.2, 0.1]
    assert cfg.epochs == 2.0 and cfg.eval_samples == PRESETS["cpu"]["eval_samples"]


def test_cli_bad_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--batch-size", "eight"])
    assert info.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_cli_flags_cover_every_field():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flags
    assert {"--config", "--lora", "--no-lora", "--fuse", "--no-fuse"} <= flags
    assert "10%" in parser.format_help()  # help texts with % render


def test_save_and_reload(data, tmp_path):
    cfg = load_config(None, {"init": "small", "data": [data], "preset": "l4", "learning_rate": 1e-3,
                             "split_fractions": [0.6, 0.2, 0.2]})
    out = tmp_path / "run" / "config.yaml"
    cfg.save(out)
    assert load_config(out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]
    assert cfg.to_dict()["learning_rate"] == 1e-3


def test_print_config():
    from rich.console import Console

    console = Console(record=True, width=120)
    print_config(TrainConfig(init="small", learning_rate=1e-3), console)
    text = console.export_text()
    assert "learning_rate" in text and "0.001" in text and "../shared/datasets/full.jsonl" in text


# -- io ----------------------------------------------------------------------------------------

class FolderError(RuntimeError):
    pass


@pytest.mark.parametrize("content, needle", [
    (None, "no config.json (not a model folder)"),
    ("{", "config.json: invalid JSON"),
    ("[1, 2]", "config.json: expected a JSON object, got list"),
])
def test_read_json_object_errors_name_the_file(tmp_path, content, needle):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FolderError, match=re.escape(needle)):  # the caller's error class
        read_json_object(path, "a model folder", FolderError)
    path.write_text('{"d_model": 8}')
    assert read_json_object(path, "a model folder", FolderError) == {"d_model": 8}


def test_atomic_writes(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2], "p": Path("p")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "p": "p"}
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.bin", "file.txt", "sub", "x.json"]


def test_atomic_write_failure_leaves_old_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_on_success(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.exists()
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("v2")
        assert (final / "a.txt").read_text() == "v1"  # old version visible until the swap
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp or old folder left


def test_atomic_dir_leaves_old_dir_intact_when_the_body_raises(tmp_path):
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "model.safetensors").write_text("old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert (final / "model.safetensors").read_text() == "old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    # and a first write that fails leaves nothing behind
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "new"):
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists() and len(os.listdir(tmp_path)) == 1
