"""python -m convert: HF <-> MLX checkpoints, MLX <-> PEFT adapters, fusing, and every error path."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import save_model
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from transformers import T5ForConditionalGeneration

import mlx_t5
from convert.__main__ import main
from mlx_t5.lora import apply_lora, load_adapters, save_adapters

IDS = np.array([[37, 1782, 14, 8, 3, 9, 2968, 58, 1], [363, 19, 8, 1784, 13, 1410, 1, 0, 0]])
MASK = np.array([[1] * 9, [1] * 7 + [0, 0]])
DEC = np.array([[0, 37, 1782, 14, 9], [0, 363, 19, 8, 1784]])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_model(name, root / name, tokenizer_dir) for name in ("v1-relu-tied", "odd-heads")}


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what model saving printed before
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                     decoder_input_ids=torch.tensor(DEC)).logits.float().numpy()


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS), mx.array(DEC), mx.array(MASK)).astype(mx.float32))


def with_random_adapters(model, targets="all", seed=0):
    """LoRA layers with non-zero lora_b (a fresh adapter is the identity and would prove nothing)."""
    apply_lora(model, rank=4, alpha=8.0, targets=targets)
    mx.random.seed(seed)
    params = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(params, strict=False)
    return model


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("shape", ["v1-relu-tied", "odd-heads"])
def test_hf_mlx_hf_round_trip_is_bit_exact(hf_dirs, tmp_path, capsys, shape):
    src = Path(shutil.copytree(hf_dirs[shape], tmp_path / "src"))
    (src / "drafts.json").write_text('{"format": "phrasebook", "vocab_size": 1, "entries": []}')  # as trainers write
    assert run(capsys, "hf-to-mlx", "--model", src, "--out", tmp_path / "mlx")[0] == 0
    rc, out = run(capsys, "mlx-to-hf", "--model", tmp_path / "mlx", "--out", tmp_path / "hf")
    assert rc == 0 and "wrote" in out
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "drafts.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes()
    before = T5ForConditionalGeneration.from_pretrained(src).eval()
    after = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert np.array_equal(hf_logits(after), hf_logits(before))


def test_pytorch_bin_source_and_bfloat16_cast(hf_dirs, tmp_path, capsys):
    hf = T5ForConditionalGeneration.from_pretrained(hf_dirs["odd-heads"])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    # config.json as saved (transformers 5 reports tie_word_embeddings=True on the loaded config of an untied model)
    (legacy / "config.json").write_bytes((hf_dirs["odd-heads"] / "config.json").read_bytes())
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")  # with the embed_tokens aliases, as old files have
    assert run(capsys, "hf-to-mlx", "--model", legacy, "--out", tmp_path / "fp32")[0] == 0
    model, _ = mlx_t5.load(tmp_path / "fp32", tokenizer=str(hf_dirs["odd-heads"]))
    assert np.abs(mlx_logits(model) - hf_logits(hf.eval())).max() <= 1e-4

    assert run(capsys, "hf-to-mlx", "--model", legacy, "--out", tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
    weights = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert np.array_equal(np.array(weights["shared.weight"].astype(mx.float32)),
                          hf.shared.weight.detach().bfloat16().float().numpy())
    assert run(capsys, "mlx-to-hf", "--model", tmp_path / "bf16", "--out", tmp_path / "hf_bf16")[0] == 0
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf_bf16", dtype=torch.bfloat16)
    assert back.shared.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("bits, bound", [(8, 0.02), (4, 0.3)])
def test_quantized_mlx_checkpoint_and_back_to_hf(hf_dirs, tmp_path, capsys, bits, bound):
    src = hf_dirs["odd-heads"]
    rc, out = run(capsys, "hf-to-mlx", "--model", src, "--out", tmp_path / "q", "--bits", bits, "--group-size", 32)
    assert rc == 0 and f"{bits}-bit" in out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
    quantized, _ = mlx_t5.load(tmp_path / "q")
    reference = hf_logits(T5ForConditionalGeneration.from_pretrained(src).eval())
    q_logits = mlx_logits(quantized)
    err = np.linalg.norm(q_logits - reference) / np.linalg.norm(reference)
    assert 0 < err < bound, err

    assert run(capsys, "mlx-to-hf", "--model", tmp_path / "q", "--out", tmp_path / "hf")[0] == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization" not in config
    dequantized = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(hf_logits(dequantized) - q_logits).max() <= 1e-4


def test_old_flag_names_still_work_unlisted(hf_dirs, tmp_path, capsys):
    """--hf, --mlx, --quantize (and --peft, --base) were the flags before --model / --adapters / --bits."""
    src = hf_dirs["odd-heads"]
    assert run(capsys, "hf-to-mlx", "--hf", src, "--out", tmp_path / "q", "--quantize", 8, "--group-size", 32)[0] == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    assert run(capsys, "mlx-to-hf", "--mlx", tmp_path / "q", "--out", tmp_path / "hf")[0] == 0
    for command, old in [("hf-to-mlx", ("--hf", "--quantize")), ("fuse", ("--base",)),
                         ("peft-to-adapters", ("--peft", "--base"))]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert "--model" in shown and not [flag for flag in old if flag in shown], shown


# ---------------------------------------------------------------- adapters


def test_mlx_adapters_to_peft_give_the_same_logits(hf_dirs, tmp_path, capsys):
    from peft import PeftModel

    src = hf_dirs["odd-heads"]
    model, _ = mlx_t5.load(src)
    with_random_adapters(model, targets="all")
    save_adapters(model, tmp_path / "mlx_adapters", {"base_model": str(src)})
    rc, out = run(capsys, "adapters-to-peft", "--adapters", tmp_path / "mlx_adapters", "--model", src,
                  "--out", tmp_path / "peft")
    assert rc == 0 and "r=4" in out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "encoder.block.0.layer.0.SelfAttention.q" in config["target_modules"]
    peft_model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(src), tmp_path / "peft").eval()
    assert np.abs(hf_logits(peft_model) - mlx_logits(model)).max() <= 1e-4

    # and back: the same tensors bit for bit
    rc, _ = run(capsys, "peft-to-adapters", "--adapters", tmp_path / "peft", "--model", src, "--out", tmp_path / "back")
    assert rc == 0
    a = mx.load(str(tmp_path / "mlx_adapters" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert meta["lora_parameters"]["scale"] == 2.0 and meta["lora_parameters"]["targets"] == "all"


@pytest.fixture(scope="module")
def torch_trained_peft(hf_dirs, tmp_path_factory):
    """A PEFT LoRA trained for a few steps of a plain torch loop; returns (folder, logits of the PEFT model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = T5ForConditionalGeneration.from_pretrained(hf_dirs["odd-heads"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v", "wo"],
                                            task_type="SEQ_2_SEQ_LM", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor(np.concatenate([DEC[:, 1:], [[1], [1]]], axis=1))
    losses = []
    for _ in range(4):
        loss = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    return folder, hf_logits(model.eval())


def test_torch_trained_peft_adapter_runs_in_mlx(hf_dirs, torch_trained_peft, tmp_path, capsys):
    peft_dir, expected = torch_trained_peft
    rc, out = run(capsys, "peft-to-adapters", "--adapters", peft_dir, "--out", tmp_path / "mlx")
    assert rc == 0 and "scale=4" in out
    model, _ = mlx_t5.load(hf_dirs["odd-heads"])
    load_adapters(model, tmp_path / "mlx")
    assert np.abs(mlx_logits(model) - expected).max() <= 1e-4


def test_fuse_peft_adapter_equals_unfused(hf_dirs, torch_trained_peft, tmp_path, capsys):
    peft_dir, expected = torch_trained_peft
    rc, out = run(capsys, "fuse", "--model", hf_dirs["odd-heads"], "--adapters", peft_dir, "--out", tmp_path / "fused")
    assert rc == 0 and "peft adapters merged" in out
    fused = T5ForConditionalGeneration.from_pretrained(tmp_path / "fused").eval()
    assert not any("lora" in k for k in fused.state_dict())
    assert np.abs(hf_logits(fused) - expected).max() <= 1e-4
    assert (tmp_path / "fused" / "tokenizer.json").is_file()


@pytest.mark.parametrize("quantized", [False, True])
def test_fuse_mlx_adapters_equals_unfused(hf_dirs, tmp_path, capsys, quantized):
    src = hf_dirs["v1-relu-tied"]
    base = src
    if quantized:  # QLoRA: adapters on a 8-bit base, fused into a float model
        rc, _ = run(capsys, "hf-to-mlx", "--model", src, "--out", tmp_path / "q8", "--bits", 8, "--group-size", 32)
        assert rc == 0
        base = tmp_path / "q8"
    model, _ = mlx_t5.load(base)
    with_random_adapters(model, targets="qv")
    expected = mlx_logits(model)
    save_adapters(model, tmp_path / "adapters")
    extra = ["--dequantize"] if quantized else []
    rc, out = run(capsys, "fuse", "--model", base, "--adapters", tmp_path / "adapters", "--out", tmp_path / "fused",
                  *extra)
    assert rc == 0 and "mlx adapters merged" in out
    fused, _ = mlx_t5.load(tmp_path / "fused")
    assert fused.args.quantization is None
    assert np.abs(mlx_logits(fused) - expected).max() <= 1e-4
    if not quantized:  # a float fused model is an HF checkpoint too
        hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "fused").eval()
        assert np.abs(hf_logits(hf) - expected).max() <= 1e-4


# ---------------------------------------------------------------- errors: one red line, exit 2


def error(capsys, *argv) -> str:
    rc, out = run(capsys, *argv)
    assert rc == 2, out
    assert out.startswith("error: ") and "Traceback" not in out
    return out


def test_checkpoint_errors(hf_dirs, tmp_path, capsys):
    src = hf_dirs["v1-relu-tied"]
    out = tmp_path / "out"
    assert "no such folder" in error(capsys, "hf-to-mlx", "--model", tmp_path / "nope", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error(capsys, "hf-to-mlx", "--model", tmp_path / "empty", "--out", out)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "invalid JSON" in error(capsys, "mlx-to-hf", "--model", broken, "--out", out)
    (broken / "config.json").write_text(json.dumps({"model_type": "bart"}))
    assert "'bart' is not a T5 model" in error(capsys, "hf-to-mlx", "--model", broken, "--out", out)
    (broken / "config.json").write_text((src / "config.json").read_text())
    assert "no model.safetensors" in error(capsys, "hf-to-mlx", "--model", broken, "--out", out)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in error(capsys, "hf-to-mlx", "--model", broken, "--out", out)

    weights = load_file(src / "model.safetensors")
    odd = dict(weights, **{"encoder.block.0.layer.0.SelfAttention.extra.weight": np.zeros((2, 2), np.float32)})
    del odd["decoder.final_layer_norm.weight"]
    odd["encoder.final_layer_norm.weight"] = np.ones(65, np.float32)
    save_file(odd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    message = error(capsys, "hf-to-mlx", "--model", broken, "--out", out)
    assert "unknown tensors (1): encoder.block.0.layer.0.SelfAttention.extra.weight" in message
    assert "missing tensors (1): decoder.final_layer_norm.weight" in message
    assert "encoder.final_layer_norm.weight (65,) != (64,)" in message

    untied = load_file(hf_dirs["odd-heads"] / "model.safetensors")
    save_file(untied, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf_dirs["odd-heads"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    assert "has its own lm_head.weight" in error(capsys, "hf-to-mlx", "--model", broken, "--out", out)

    assert "output folder is the input folder" in error(capsys, "mlx-to-hf", "--model", src, "--out", src)
    assert not out.exists()


def test_adapter_errors(hf_dirs, tmp_path, capsys, tokenizer_dir):
    src = hf_dirs["v1-relu-tied"]
    out = tmp_path / "out"
    assert "no adapter_config.json" in error(capsys, "adapters-to-peft", "--adapters", tmp_path, "--model", src,
                                             "--out", out)
    # trained on a 3-layer decoder, applied to a 2-layer one: decoder.block.2 does not exist in the base
    deep = save_model("deep-decoder", tmp_path / "deep", tokenizer_dir, d_model=64, d_kv=16, num_heads=4)
    model, _ = mlx_t5.load(deep)
    with_random_adapters(model, targets="qv")
    save_adapters(model, tmp_path / "deep_adapters")
    message = error(capsys, "adapters-to-peft", "--adapters", tmp_path / "deep_adapters", "--model", src, "--out", out)
    assert "modules that" in message and "decoder.block.2.layer.0.SelfAttention.q" in message
    assert "decoder.block.2" in error(capsys, "fuse", "--model", src, "--adapters", tmp_path / "deep_adapters",
                                      "--out", out)

    # right modules, wrong sizes: odd-heads adapters (d_model 96) on a d_model 64 base
    model, _ = mlx_t5.load(hf_dirs["odd-heads"])
    with_random_adapters(model, targets="qv")
    save_adapters(model, tmp_path / "wide")
    message = error(capsys, "adapters-to-peft", "--adapters", tmp_path / "wide", "--model", src, "--out", out)
    assert "adapter shapes do not match" in message and "in=96" in message

    (tmp_path / "wide" / "adapters.safetensors").unlink()
    assert "no adapters.safetensors" in error(capsys, "adapters-to-peft", "--adapters", tmp_path / "wide",
                                              "--model", src, "--out", out)
    assert "neither adapters.safetensors" in error(capsys, "fuse", "--model", src, "--adapters", tmp_path / "wide",
                                                   "--out", out)
    assert not out.exists()


def test_peft_errors(hf_dirs, torch_trained_peft, tmp_path, capsys):
    peft_dir, _ = torch_trained_peft
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    save_file(tensors, str(bad / "adapter_model.safetensors"))

    (bad / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    assert "use_dora=True" in error(capsys, "peft-to-adapters", "--adapters", bad, "--out", out)
    (bad / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    assert "only LORA" in error(capsys, "peft-to-adapters", "--adapters", bad, "--out", out)

    (bad / "adapter_config.json").write_text(json.dumps(config))
    extra = dict(tensors, **{"base_model.model.shared.lora_embedding_A": np.zeros((4, 8), np.float32)})
    save_file(extra, str(bad / "adapter_model.safetensors"))
    assert "unknown tensors" in error(capsys, "peft-to-adapters", "--adapters", bad, "--out", out)

    head = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((4, 96), np.float32),
                            "base_model.model.lm_head.lora_B.weight": np.zeros((32128, 4), np.float32)})
    save_file(head, str(bad / "adapter_model.safetensors"))
    assert "LoRA on lm_head" in error(capsys, "peft-to-adapters", "--adapters", bad, "--out", out)

    # an odd-heads adapter checked against the d_model 64 base
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    assert "do not match" in error(capsys, "peft-to-adapters", "--adapters", bad, "--model", hf_dirs["v1-relu-tied"],
                                   "--out", out)
    assert "do not match" in error(capsys, "fuse", "--model", hf_dirs["v1-relu-tied"], "--adapters", bad, "--out", out)
    assert not out.exists()
