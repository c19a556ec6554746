"""mlx_t5.quantize: which layers get quantized, save/load round trip, dequantize, QLoRA on top, CLI."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hf_models import save_model
from mlx.utils import tree_flatten

import mlx_t5
from mlx_t5.quantize import dequantize_model, is_quantized, main, nbytes, quantize_model

IDS = mx.array([[37, 1782, 14, 8, 3, 9, 2968, 58, 1], [363, 19, 8, 1784, 13, 1410, 1, 0, 0]])
MASK = mx.array([[1] * 9, [1] * 7 + [0, 0]])
DEC = mx.array([[0, 37, 1782, 14, 9], [0, 363, 19, 8, 1784]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("quantize")
    return {name: save_model(name, root / name, tokenizer_dir) for name in ("v1-relu-tied", "odd-heads")}


def kinds(model) -> dict[str, str]:
    return {p: type(m).__name__ for p, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding))}


def rel_error(a, b) -> float:
    a, b = np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bits, bound", [(8, 0.02), (4, 0.3)])
def test_every_grouped_layer_quantized_bias_tables_kept(folders, bits, bound):
    model, _ = mlx_t5.load(folders["v1-relu-tied"])
    ref = model(IDS, DEC, MASK)
    fp32_bytes = nbytes(model)
    quantize_model(model, bits=bits, group_size=32)
    k = kinds(model)
    assert k["shared"] == "QuantizedEmbedding"  # the tied head runs through shared.as_linear
    bias_tables = [p for p in k if p.endswith("relative_attention_bias")]
    assert len(bias_tables) == 2 and all(k[p] == "Embedding" for p in bias_tables)
    others = [p for p in k if p not in bias_tables and p != "shared"]
    assert others and all(k[p] == "QuantizedLinear" for p in others)
    assert model.args.quantization == {"group_size": 32, "bits": bits}
    assert nbytes(model) < fp32_bytes * (bits + 2) / 32 + 16 * 1024  # + scales/biases, fp32 bias tables and norms
    err = rel_error(model(IDS, DEC, MASK), ref)
    assert 0 < err < bound, err


def test_partial_quantization_saves_and_reloads_the_same_layers(folders, tmp_path):
    """odd-heads: d_model 96 and d_ff 160 split into groups of 32, the 60-wide attention output does not."""
    model, tokenizer = mlx_t5.load(folders["odd-heads"])
    quantize_model(model, bits=4, group_size=32)
    k = kinds(model)
    assert k["encoder.block.0.layer.0.SelfAttention.q"] == "QuantizedLinear"
    assert k["encoder.block.0.layer.0.SelfAttention.o"] == "Linear"  # in = 3 heads x 20 = 60
    assert k["lm_head"] == "QuantizedLinear"
    expected = model(IDS, DEC, MASK)

    mlx_t5.save(model, tokenizer, tmp_path / "q4")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    reloaded, _ = mlx_t5.load(tmp_path / "q4")
    assert kinds(reloaded) == k
    assert np.array_equal(np.array(reloaded(IDS, DEC, MASK)), np.array(expected))


def test_dequantize_gives_float_layers_with_the_same_logits(folders):
    model, _ = mlx_t5.load(folders["odd-heads"])
    quantize_model(model, bits=8, group_size=32)
    q = model(IDS, DEC, MASK)
    scales = model.encoder.block[0].layer[0].SelfAttention.q
    expected_w = mx.dequantize(scales.weight, scales.scales, scales.biases, group_size=32, bits=8)
    dequantize_model(model)
    assert not is_quantized(model) and model.args.quantization is None
    assert np.array_equal(np.array(model.encoder.block[0].layer[0].SelfAttention.q.weight), np.array(expected_w))
    assert np.abs(np.array(model(IDS, DEC, MASK)) - np.array(q)).max() < 1e-4


def test_bad_settings_and_double_quantization_are_errors(folders):
    model, _ = mlx_t5.load(folders["v1-relu-tied"])
    with pytest.raises(ValueError, match="bits=7"):
        quantize_model(model, bits=7)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_model(model, group_size=48)
    quantize_model(model, bits=8, group_size=64)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)


def test_qlora_trains_adapters_on_a_quantized_model(folders):
    from mlx_t5.lora import apply_lora

    model, _ = mlx_t5.load(folders["odd-heads"])
    quantize_model(model, bits=4, group_size=32)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if not k.endswith(("lora_a", "lora_b"))}
    apply_lora(model, rank=4, alpha=8.0, targets="qv")
    assert all(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(model.trainable_parameters()))
    labels = mx.concatenate([DEC[:, 1:], mx.array([[1], [1]])], axis=1)
    step = nn.value_and_grad(model, lambda m: mlx_t5.loss_fn(m, IDS, MASK, DEC, labels)[0])
    opt = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(8):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    after = {k.replace(".linear.", "."): np.array(v) for k, v in tree_flatten(model.parameters())
             if not k.endswith(("lora_a", "lora_b"))}
    assert set(after) == set(frozen) and all(np.array_equal(after[k], frozen[k]) for k in frozen)


def test_cli_writes_a_loadable_quantized_checkpoint(folders, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["--model", str(folders["v1-relu-tied"]), "--bits", "8", "--group-size", "32", "--out", str(out)]) == 0
    assert "8-bit" in capsys.readouterr().out
    model, tokenizer = mlx_t5.load(out)
    assert model.args.quantization == {"group_size": 32, "bits": 8}
    assert tokenizer("capital of France").input_ids[-1] == 1

    assert main(["--model", str(out), "--bits", "4", "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_greedy_generation_on_the_quantized_model(folders, tokenizer):
    """Cached incremental decoding through quantized layers = the argmax of the full forward pass."""
    model, _ = mlx_t5.load(folders["odd-heads"])
    quantize_model(model, bits=4, group_size=32)
    out = mlx_t5.generate_tokens(model, IDS, MASK, max_new_tokens=6, ignore_eos=True)
    assert [len(o) for o in out] == [6, 6]
    for row, tokens in enumerate(out):
        dec = mx.array([[0] + tokens[:-1]])
        logits = np.array(model(IDS[row:row + 1], dec, MASK[row:row + 1]))[0]
        logits[:, 1] = -np.inf  # ignore_eos masks </s>
        assert logits.argmax(-1).tolist() == tokens
    texts = mlx_t5.generate(model, tokenizer, ["capital of France", "rain"], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
