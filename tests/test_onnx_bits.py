"""onnx_t5 4-bit weights (MatMulNBits bits=4): every projection quantized, each quantizer and block size, the
logits near float's, and the choice recorded in onnx.json and taken by `convert to-onnx --bits`."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from hf_models import QUERIES, hf_generate, make_model, save_model
from onnx_t5 import OnnxT5, load
from onnx_t5.export import ExportError, export_folder, quantization

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("method,block", [("rtn", 32), ("rtn-asym", 64), ("hqq", 128), ("rtn", 128)])
def test_int4_export(method, block, tokenizer, tmp_path):
    model = make_model("odd-heads")  # d_model 96: K not a multiple of 64 or 128 (padded blocks)
    marker = export_folder(model, tmp_path, bits=4, block_size=block, method=method)
    assert marker["quantization"]["bits"] == 4 and marker["quantization"]["quantizer"] == method
    graph = onnx.load(str(tmp_path / "decoder.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == model.config.num_decoder_layers * 6 + 1
    assert all({a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")} == {"bits": 4, "block_size": block}
               for n in nbits)
    onnx_model = OnnxT5(tmp_path)
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    decoder_ids = hf_generate(model, batch, max_new_tokens=8)[:, :-1]
    with torch.inference_mode():
        want = model(**batch, decoder_input_ids=decoder_ids).logits.numpy()
    feed = onnx_model.begin(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    logits = onnx_model.decode(feed, decoder_ids.numpy(), 0)
    scale = np.abs(want).max()
    assert np.abs(logits - want).mean() <= 0.05 * scale  # 4 bits: a coarser grid than int8's 1 %


def test_quantization_defaults_and_errors():
    assert quantization(8) == (8, 128, "rtn")
    bits, block, method = quantization(4)
    assert bits == 4 and block in (32, 64, 128) and method in ("rtn", "rtn-asym", "hqq")
    with pytest.raises(ExportError):
        quantization(3)


def test_cli_bits(tmp_path, tokenizer_dir):
    model_dir = save_model("v1-relu-tied", tmp_path / "hf", tokenizer_dir)
    out = tmp_path / "onnx4"
    proc = subprocess.run([sys.executable, "-m", "convert", "to-onnx", "--model", str(model_dir), "--out", str(out),
                           "--bits", "4", "--block-size", "64", "--quantizer", "rtn-asym"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int4" in proc.stdout
    model, _ = load(out)
    assert model.info["quantization"] | {} == {**model.info["quantization"], "bits": 4, "block_size": 64,
                                                "quantizer": "rtn-asym"}
