"""LoRA / QLoRA: which layers are wrapped and trained, adapter files, fusing, and LoRA training runs."""

import io
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hf_models import make_model, save_word_tokenizer
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from rich.console import Console

import mlx_t5
from mlx_t5.lora import apply_lora, fuse_lora, load_adapters, lora_modules, save_adapters
from mlx_t5.quantize import quantize_model
from mlx_t5.trainer import collate, to_mx, tokenize_split, train
from reformulation.config import TrainConfig, load_config
from reformulation.data import read_jsonl
from reformulation.reporting import read_metrics


pytestmark = pytest.mark.usefixtures("blas_one_thread")  # conftest: tiny models, one BLAS thread


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, full_jsonl):
    """40 rows of full.jsonl and an HF model folder (flan-like: gated-gelu, untied; d_model 128 so the
    attention and FFN weights split into 64-wide quantization groups) with a word tokenizer."""
    root = tmp_path_factory.mktemp("lora")
    rows = read_jsonl(full_jsonl).examples[:200:5]
    (root / "data.jsonl").write_text("".join(json.dumps({"query": e.query, "subqueries": e.target}) + "\n"
                                             for e in rows))
    tok = save_word_tokenizer([e.source for e in rows] + [e.target for e in rows], root / "model")
    make_model("odd-heads", vocab_size=len(tok), d_model=128, d_kv=32, num_heads=4, d_ff=256).save_pretrained(
        root / "model")
    return root


@pytest.fixture
def model(workdir):
    return mlx_t5.load(workdir / "model")[0]


@pytest.fixture(scope="module")
def batch(workdir):
    tok = mlx_t5.utils.load_tokenizer(workdir / "model")
    split = tokenize_split(tok, read_jsonl(workdir / "data.jsonl").examples[:6], TrainConfig())
    return to_mx(collate(split.input_ids, split.labels))


def logits(model, batch):
    ids, mask, dec, _ = batch
    return np.array(model(ids, dec, mask))


def randomize_adapters(model, seed=0):
    """LoRA starts as the identity (lora_b = 0); give the adapters values so fusing has something to do."""

    keys = mx.random.split(mx.random.key(seed), 1000)
    weights = [(k, 0.05 * mx.random.normal(v.shape, key=keys[i]))
               for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))]
    model.load_weights(weights, strict=False)


def trainable_names(model) -> set[str]:
    return {k for k, _ in tree_flatten(model.trainable_parameters())}


def test_qv_wraps_q_and_v_of_every_attention_and_trains_only_adapters(model):
    paths = apply_lora(model, rank=4, alpha=8.0, targets="qv")
    args = model.args
    # encoder self-attention, decoder self- and cross-attention; q and v of each
    assert len(paths) == 2 * (args.num_layers + 2 * args.num_decoder_layers)
    assert "decoder.block.1.layer.1.EncDecAttention.v" in paths and "encoder.block.0.layer.0.SelfAttention.q" in paths
    assert all(p.rsplit(".", 1)[-1] in ("q", "v") for p in paths)
    assert trainable_names(model) == {f"{p}.{w}" for p in paths for w in ("lora_a", "lora_b")}
    layer = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0 and layer.lora_a.shape == (args.d_model, 4)


def test_all_wraps_every_attention_and_ffn_linear_but_not_the_head(model):
    paths = apply_lora(model, rank=2, targets="all")
    args = model.args
    per_encoder, per_decoder = 4 + 3, 4 + 4 + 3  # q k v o (x1 or x2) + wi_0 wi_1 wo
    assert len(paths) == per_encoder * args.num_layers + per_decoder * args.num_decoder_layers
    assert not any("lm_head" in p or "relative_attention_bias" in p for p in paths)


def test_bad_targets_are_refused(model):
    with pytest.raises(ValueError, match="LoRA targets"):
        apply_lora(model, targets="qkvz")


def test_adapters_round_trip_and_fuse_to_the_same_logits(model, batch, tmp_path):
    apply_lora(model, rank=4, alpha=16.0, targets="all")
    randomize_adapters(model)
    adapted = logits(model, batch)

    save_adapters(model, tmp_path / "adapters", {"base_model": "tiny-base"})
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["base_model"] == "tiny-base"
    assert config["lora_parameters"] == {"rank": 4, "alpha": 16.0, "scale": 4.0, "dropout": 0.0, "targets": "all"}
    assert config["target_modules"] == lora_modules(model)
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert set(saved) == trainable_names(model)  # only lora_a / lora_b

    fused = fuse_lora(model)
    assert not lora_modules(fused)
    assert np.abs(logits(fused, batch) - adapted).max() <= 1e-4 * np.abs(adapted).max()


def test_load_adapters_restores_the_adapted_model(workdir, batch, tmp_path):
    model = mlx_t5.load(workdir / "model")[0]
    apply_lora(model, rank=3, targets="q,v,wo")
    randomize_adapters(model, seed=1)
    want = logits(model, batch)
    save_adapters(model, tmp_path)
    other = mlx_t5.load(workdir / "model")[0]
    load_adapters(other, tmp_path)
    assert np.abs(logits(other, batch) - want).max() == 0

    (tmp_path / "adapters.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(mlx_t5.LoadError, match="adapters.safetensors"):
        load_adapters(mlx_t5.load(workdir / "model")[0], tmp_path)


def lora_config(workdir, out, **overrides) -> TrainConfig:
    values = dict(model=str(workdir / "model"), data=[str(workdir / "data.jsonl")], split_fractions=[0.8, 0.2, 0.0],
                  output_dir=str(out), batch_size=8, max_steps=12, learning_rate=1e-2, dropout=0.0, eval_every=0,
                  eval_samples=4, eval_max_new_tokens=8, log_every=1, lora=True, lora_rank=4, lora_alpha=8.0)
    values.update(overrides)
    return load_config(None, values)


def losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_lora_run_trains_only_adapters_and_fuses(workdir, batch, tmp_path):
    out = tmp_path / "run"
    train(lora_config(workdir, out, lora_targets="all", fuse=True), Console(file=io.StringIO()))
    assert np.mean(losses(out)[-3:]) < np.mean(losses(out)[:3])

    # adapter/ holds adapters only (the run contract, as on torch); the base it names is untouched by training
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model"] == str((workdir / "model").resolve())
    adapted = mlx_t5.load(workdir / "model")[0]
    base_logits = logits(adapted, batch)
    load_adapters(adapted, out / "adapter")
    want = logits(adapted, batch)
    assert np.abs(want - base_logits).max() > 1e-3  # the adapters changed something

    fused, _ = mlx_t5.load(out / "final")  # with fuse: final/ is the merged, plain model
    assert not lora_modules(fused)
    assert np.abs(logits(fused, batch) - want).max() <= 1e-4 * np.abs(want).max()

    # the checkpoint stores adapters, not the whole model
    ckpt = out / "checkpoint"
    assert (ckpt / "adapters.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_qlora_8bit_trains_and_its_adapters_load_back(workdir, batch, tmp_path):
    out = tmp_path / "run"
    train(lora_config(workdir, out, quantize_base=8), Console(file=io.StringIO()))
    assert np.mean(losses(out)[-3:]) < np.mean(losses(out)[:3])

    assert not (out / "final").exists()  # no fuse: no plain model
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_quantization"] == {"bits": 8, "group_size": 64}
    base = mlx_t5.load(workdir / "model")[0]
    quantize_model(base, **config["base_quantization"])
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in base.named_modules())
    before = logits(base, batch)
    load_adapters(base, out / "adapter")
    assert isinstance(base.encoder.block[0].layer[0].SelfAttention.q.linear, nn.QuantizedLinear)
    assert np.abs(logits(base, batch) - before).max() > 1e-3
    assert trainable_names(base) == {k for k in mx.load(str(out / "adapter" / "adapters.safetensors"))}
