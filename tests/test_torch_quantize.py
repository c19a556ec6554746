"""torch_t5.int8 and python -m torch_t5.quantize (int8 dynamic, CPU), torch_t5.infer (the torch engine) on tiny T5s."""

import copy
import json

import pytest
import torch

from hf_models import make_model, save_model
from torch_t5 import infer
from torch_t5.int8 import WEIGHTS_FILE, Int8Linear, QuantizeError, load_int8, quantize_model
from torch_t5.quantize import main

QUERIES = [
    "Who lived longer, Nikola Tesla or Milutin Milankovic?",
    "capital of France",
    "What is the tallest mountain in Europe and how tall is it compared to Mont Blanc?",
    "Which came first, the printing press or the telescope?",
    "Who directed the movie that won Best Picture in 1998?",
    "  Māori  population of New Zealand ",
    "population of tokyo",
    "Are Aston Villa and Birmingham City in the same league, and who has more titles?",
] * 2  # 16 queries of varied length: several padded batches


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: tiny matmuls, one thread


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (40,)
    x = torch.randn(3, 5, 96)
    expected = linear(x)
    got = q(x)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 0.02
    assert torch.equal(q(torch.zeros(2, 96)), linear.bias.expand(2, 40).detach())  # zero rows stay exact


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_int8_linear_rows_do_not_depend_on_their_batch(kernel, monkeypatch):
    """Each row is quantized on its own with either kernel: a row alone gives bit for bit what it gives
    inside a batch of very different rows (what lets the server batch requests without changing answers)."""
    from torch_t5 import int8

    if kernel == "fbgemm" and not int8._FBGEMM:
        pytest.skip("fbgemm is not this CPU's quantized engine (x86 only); the _int_mm case covers the path")
    monkeypatch.setattr(int8, "_FBGEMM", kernel == "fbgemm")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(5, 96) * torch.tensor([[0.01], [1.0], [30.0], [1.0], [500.0]])  # ranges 5e4 apart
    batched = q(x)
    for i in range(len(x)):
        assert torch.equal(q(x[i:i + 1]), batched[i:i + 1])
    expected = linear(x)
    assert ((batched - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 0.02
    fused = Int8Linear.concat([q, Int8Linear.from_linear(torch.nn.Linear(96, 8, bias=False))])
    assert torch.equal(fused(x)[:, :40], batched)  # q/k/v fused into one matmul: same values


def test_int8_linear_repacks_after_in_place_change():
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(2, 32)
    before = q(x)
    with torch.no_grad():
        q.weight_scale[3] *= 2  # e.g. a test or a tool editing the loaded weights
    after = q(x)
    assert torch.allclose(after[:, 3], 2 * before[:, 3]) and torch.equal(after[:, 4:], before[:, 4:])


@pytest.mark.parametrize("shape", ["odd-heads", "v1-relu-tied"])
def test_quantize_save_load_round_trip(shape, tmp_path, tokenizer_dir, capsys):
    src = save_model(shape, tmp_path / "fp32", tokenizer_dir)
    out = tmp_path / "int8"
    assert main(["--model", str(src), "--out", str(out)]) == 0
    assert "linear layers in int8" in capsys.readouterr().out

    marker = json.loads((out / "quantization.json").read_text())
    assert "lm_head" in marker["modules"] and any(m.endswith("DenseReluDense.wo") for m in marker["modules"])
    assert not (out / "model.safetensors").exists()  # from_pretrained must not read int8 as floats
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.int8
        assert f.get_tensor("shared.weight").dtype == torch.float32  # embeddings stay float

    fp32, tokenizer = infer.load(src, device="cpu")
    in_memory = quantize_model(copy.deepcopy(fp32))
    assert len(in_memory) == len(marker["modules"])
    int8, _ = load_int8(out)
    assert isinstance(int8.lm_head, Int8Linear)

    batch = tokenizer([f"reformulate: {q}" for q in QUERIES[:8]], return_tensors="pt", padding=True)
    decoder = torch.randint(2, 32000, (8, 6), generator=torch.Generator().manual_seed(0))
    decoder[:, 0] = 0
    with torch.no_grad():
        expected = fp32(**batch, decoder_input_ids=decoder).logits
        reloaded = int8(**batch, decoder_input_ids=decoder).logits
    # what was quantized is what is served: same int8 weights, same logits
    quantized = copy.deepcopy(fp32)
    quantize_model(quantized)
    with torch.no_grad():
        torch.testing.assert_close(reloaded, quantized(**batch, decoder_input_ids=decoder).logits, atol=0, rtol=0)
    error = ((reloaded - expected).norm() / expected.norm()).item()
    top1 = (reloaded.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert error < 0.05 and top1 > 0.8, (error, top1)

    # greedy outputs: 8 forced tokens each, so a random model cannot agree by stopping at once
    a = infer.generate(fp32, tokenizer, QUERIES, max_new_tokens=8, min_new_tokens=8)
    b = infer.generate(int8, tokenizer, QUERIES, max_new_tokens=8, min_new_tokens=8)
    rate = sum(x == y for x, y in zip(a, b)) / len(QUERIES)
    print(f"{shape}: int8 vs fp32 greedy agreement {rate:.0%} of {len(QUERIES)}, top-1 {top1:.1%}, rel err {error:.3f}")
    assert len(set(a)) > 2  # not one degenerate string that agrees trivially
    assert rate >= 0.5


def test_skip_keeps_modules_in_float(tmp_path, tokenizer_dir):
    src = save_model("odd-heads", tmp_path / "fp32", tokenizer_dir)
    assert main(["--model", str(src), "--out", str(tmp_path / "int8"), "--skip", "lm_head", "wo"]) == 0
    model, _ = infer.load(tmp_path / "int8")
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wi_0, Int8Linear)


def test_generate_keeps_order_across_padded_batches(tokenizer):
    model = make_model("odd-heads")
    one_by_one = infer.generate(model, tokenizer, QUERIES[:8], batch_size=1, max_new_tokens=6, min_new_tokens=6)
    batched = infer.generate(model, tokenizer, QUERIES[:8], batch_size=3, max_new_tokens=6, min_new_tokens=6)
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1  # different queries, different outputs: order is really checked
    beams = infer.generate(model, tokenizer, QUERIES[:2], num_beams=3, max_new_tokens=6, min_new_tokens=6)
    assert len(beams) == 2 and all(isinstance(s, str) for s in beams)


def test_generate_applies_the_training_prompt(tokenizer):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kwargs):
            seen.extend(tokenizer.batch_decode(input_ids, skip_special_tokens=True))
            return torch.zeros(len(input_ids), 2, dtype=torch.long)

    assert infer.generate(Spy(), tokenizer, ["  Māori  language "]) == [""]
    assert seen == ["reformulate: Maori language"]


def test_errors_are_clear(tmp_path, tokenizer_dir, capsys):
    src = save_model("v1-relu-tied", tmp_path / "fp32", tokenizer_dir)
    with pytest.raises(QuantizeError, match="no quantization.json"):
        load_int8(src)
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(infer.InferError, match="float16"):
        infer.load(src, dtype="float16")
    with pytest.raises(infer.InferError, match="list of strings"):
        infer.generate(None, None, "one query")
