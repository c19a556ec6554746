"""onnx_t5: the exported graphs in ONNX Runtime against transformers (the oracle), float32 and int8."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from hf_models import QUERIES, SHAPES, ending_model, hf_generate, make_model, save_model
from onnx_t5 import OnnxLoadError, OnnxT5, load
from onnx_t5.export import ExportError, export, export_folder

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: tiny matmuls, one thread


def exported(model, folder, quantize: bool) -> OnnxT5:
    """The model exported into folder (no tokenizer), loaded."""
    export_folder(model, folder, quantize=quantize)
    return OnnxT5(folder)


def step_logits(onnx_model: OnnxT5, batch, decoder_ids: np.ndarray) -> np.ndarray:
    """(batch, steps, vocab) logits of the decoder graph fed decoder_ids one position at a time."""
    feed = onnx_model.begin(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    return np.stack([onnx_model.step(feed, decoder_ids[:, t], t) for t in range(decoder_ids.shape[1])], axis=1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_float32_export_is_transformers(shape, tokenizer, tmp_path):
    """Logits of every step within 1e-4 (relative to the logit scale) on a padded batch, and the same
    greedy tokens as generate, rows ending at different steps included."""
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    model = ending_model(shape, False, batch)
    expected = hf_generate(model, batch, max_new_tokens=24)
    ended = (expected == model.config.eos_token_id).any(dim=1)
    assert ended.any() and not ended.all()  # not vacuous: some rows end early, some run on
    onnx_model = exported(model, tmp_path, quantize=False)
    got = onnx_model.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=24)
    assert got.shape == tuple(expected.shape) and (got == expected.numpy()).all()

    decoder_ids = expected[:, :-1]
    with torch.inference_mode():
        want = model(**batch, decoder_input_ids=decoder_ids).logits.numpy()
    logits = step_logits(onnx_model, batch, decoder_ids.numpy())
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()

    # min_new_tokens masks EOS until then, like generate(min_new_tokens=...)
    expected = hf_generate(model, batch, max_new_tokens=12, min_new_tokens=12)
    got = onnx_model.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=12,
                              min_new_tokens=12)
    assert (got == expected.numpy()).all()


BEAMS = {  # together: every beam option; every shape but odd-heads has hypotheses ending at different steps
    "flan-small": dict(num_beams=3, num_return_sequences=2, early_stopping=True, max_new_tokens=24),
    "v1-relu-tied": dict(num_beams=4, num_return_sequences=3, length_penalty=0.6, max_new_tokens=12),
    "odd-heads": dict(num_beams=4, max_new_tokens=12),  # its beams never end: checks the cache reordering
    "deep-decoder": dict(num_beams=4, early_stopping="never", max_new_tokens=24),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_float32_beam_search_is_transformers(shape, tokenizer, tmp_path):
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    model = ending_model(shape, False, batch)
    options = BEAMS[shape]
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, use_cache=shape != "deep-decoder", **options)
    eos = model.config.eos_token_id
    # generate pads finished rows: cut each after its EOS (rows without one ran to max_new_tokens)
    expected = [row[:row.index(eos, 1) + 1] if eos in row[1:] else row for row in out.tolist()]
    if shape != "odd-heads":
        assert len({len(row) for row in expected}) > 1  # not vacuous: hypotheses of different lengths
    onnx_model = exported(model, tmp_path, quantize=False)
    got = onnx_model.beam_search(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), **options)
    assert got == expected


@pytest.mark.parametrize("shape", list(SHAPES))
def test_int8_export_quantizes_every_projection(shape, tokenizer, tmp_path):
    """Every projection and the LM head become 8-bit MatMulNBits (no float weight matrix left but the
    embedding), and the logits stay within a few percent of transformers' float ones."""
    model = make_model(shape)
    onnx_model = exported(model, tmp_path, quantize=True)
    config = model.config
    gated = config.is_gated_act
    for name, expected in (("encoder", config.num_layers * (4 + (3 if gated else 2)) + 1),  # + all cross K/V
                           ("decoder", config.num_decoder_layers * 6 + 1)):  # qkv, o, cross q/o, wi, wo; head
        graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        weights = {init.name for init in graph.initializer if len(init.dims) == 2 and init.data_type == 1}
        assert sum(node.op_type == "MatMulNBits" for node in graph.node) == expected
        attention = sum(node.op_type == "MultiHeadAttention" for node in graph.node)
        assert attention == (2 * config.num_decoder_layers if name == "decoder" else 0)
        assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    decoder_ids = hf_generate(model, batch, max_new_tokens=10)[:, :-1]
    with torch.inference_mode():
        want = model(**batch, decoder_input_ids=decoder_ids).logits.numpy()
    logits = step_logits(onnx_model, batch, decoder_ids.numpy())
    scale = np.abs(want).max()
    assert np.abs(logits - want).max() <= 0.1 * scale
    assert np.abs(logits - want).mean() <= 0.01 * scale


def test_steps_sampling_and_stop(tmp_path, tokenizer):
    onnx_model = exported(make_model("odd-heads"), tmp_path, quantize=True)
    ids = tokenizer(QUERIES[:2], return_tensors="np", padding=True)
    full = onnx_model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=10)
    steps = list(onnx_model.steps(ids["input_ids"], ids["attention_mask"], max_new_tokens=10))
    assert (np.stack(steps, axis=1) == full[:, 1:]).all()
    seen = []
    stopped = onnx_model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=10,
                                  on_token=lambda t: seen.append(t) or len(seen) < 3)
    assert (stopped == full[:, :4]).all()
    # sampling: reproducible with a seeded generator, and not the greedy answer at a high temperature
    sample = [onnx_model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=10, temperature=5.0,
                                  rng=np.random.default_rng(7)) for _ in range(2)]
    assert (sample[0] == sample[1]).all() and not (sample[0] == full).all()


def test_export_folder_and_cli(tmp_path, tokenizer_dir):
    model_dir = save_model("v1-relu-tied", tmp_path / "hf", tokenizer_dir)
    out = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, "-m", "convert", "to-onnx", "--model", str(model_dir), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int8" in proc.stdout and "--backend onnx" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"encoder.onnx", "decoder.onnx", "onnx.json", "config.json",
                                               "tokenizer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # no temp folder left behind
    model, tok = load(out)
    assert model.info["quantization"]["bits"] == 8
    from transformers import T5ForConditionalGeneration

    assert model.info["parameters"] == T5ForConditionalGeneration.from_pretrained(model_dir).num_parameters()

    # clear one-line errors: an int8 torch folder, an ONNX folder, a missing folder, a broken export
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "quantization.json").write_text("{}")
    with pytest.raises(ExportError, match="torch int8 weights"):
        export(tmp_path / "int8", tmp_path / "x")
    with pytest.raises(ExportError, match="already an ONNX folder"):
        export(out, tmp_path / "x")
    proc = subprocess.run([sys.executable, "-m", "convert", "to-onnx", "--model", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing" in proc.stderr
    (out / "decoder.onnx").unlink()
    with pytest.raises(OnnxLoadError, match="no decoder.onnx"):
        load(out)
    with pytest.raises(OnnxLoadError, match="no onnx.json"):
        load(model_dir)
