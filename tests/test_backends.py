"""serving.backends and the engines: the one interface chat.py and api.py serve through, on a tiny random-init T5."""

import numpy as np
import pytest

from serving.backends import EngineError, default_backend, make_backend
from hf_models import save_model

QUERIES = ["Who lived longer, Nikola Tesla or Milutin Milankovic?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return save_model("odd-heads", tmp_path_factory.mktemp("backends") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def mlx_backend(model_dir):
    return make_backend("mlx").load(model_dir)


@pytest.mark.parametrize("name", ["mlx", "torch-int8", "onnx"])
def test_stream_joins_to_generate(model_dir, mlx_backend, name):
    """What the REPL streams is what generate (the API, the JSON-lines mode) returns."""
    backend = mlx_backend if name == "mlx" else make_backend(name).load(model_dir)
    for query in QUERIES:
        pieces = list(backend.stream(query, max_new_tokens=12))
        assert len(pieces) > 1  # streamed, not one piece at the end
        assert "".join(pieces).strip() == backend.generate([query], max_new_tokens=12)[0]
    beam = list(backend.stream(QUERIES[0], num_beams=2, max_new_tokens=6))
    assert beam == backend.generate([QUERIES[0]], num_beams=2, max_new_tokens=6)


def test_torch_int8_quantizes_an_hf_folder(model_dir):
    int8 = make_backend("torch-int8").load(model_dir)
    info = int8.describe()
    assert info["backend"] == "torch-int8" and info["dtype"] == "int8"
    # encoder: 2 x (q,k,v,o + wi_0,wi_1,wo); decoder: 2 x (self q,k,v,o + cross q,k,v,o + FFN); lm_head
    assert info["int8_linear_layers"] == 2 * (4 + 3) + 2 * (4 + 4 + 3) + 1
    # ignore_eos (the benchmark switch) generates exactly max_new_tokens tokens
    out = int8.generate(QUERIES, max_new_tokens=7, ignore_eos=True)
    assert [len(int8.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out] == [7, 7]


def test_parameter_count_is_the_float_models(model_dir, mlx_backend, tmp_path, tokenizer_dir):
    """describe() counts weights, not storage: int8 buffers and MLX's packed uint32 weights count as the
    float weights they replace (the REPL's and /v1/model's "parameters")."""
    from transformers import T5ForConditionalGeneration

    from mlx_t5.quantize import main as quantize_main

    expected = T5ForConditionalGeneration.from_pretrained(model_dir).num_parameters()
    assert mlx_backend.describe()["parameters"] == expected
    assert make_backend("torch").load(model_dir).describe()["parameters"] == expected
    assert make_backend("torch-int8").load(model_dir).describe()["parameters"] == expected
    assert make_backend("onnx").load(model_dir).describe()["parameters"] == expected
    tied = save_model("v1-relu-tied", tmp_path / "tied", tokenizer_dir)  # its int8 head copies the embedding
    tied_count = T5ForConditionalGeneration.from_pretrained(tied).num_parameters()
    assert make_backend("torch-int8").load(tied).describe()["parameters"] == tied_count
    assert make_backend("mlx").load(tied).describe()["parameters"] == tied_count
    assert quantize_main(["--model", str(model_dir), "--bits", "8", "--group-size", "32",
                          "--out", str(tmp_path / "q8")]) == 0
    assert make_backend("mlx").load(tmp_path / "q8").describe()["parameters"] == expected


def test_mlx_ignore_eos_and_options(mlx_backend):
    out = mlx_backend.generate(QUERIES, max_new_tokens=5, ignore_eos=True)
    assert [len(mlx_backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out] == [5, 5]
    with pytest.raises(EngineError, match="num_beams must be an integer >= 1"):
        mlx_backend.generate(QUERIES, num_beams=0)
    with pytest.raises(EngineError, match="do not mix"):
        mlx_backend.generate(QUERIES, num_beams=2, temperature=0.5)
    with pytest.raises(EngineError, match="not one string"):
        mlx_backend.generate(QUERIES[0])
    with pytest.raises(EngineError, match="query 1 is empty"):
        mlx_backend.generate([QUERIES[0], "  "])


def test_mlx_adapter_folder_is_fused_on_load(model_dir, mlx_backend, tmp_path):
    import mlx.core as mx
    import mlx_t5
    from mlx.utils import tree_flatten
    from mlx_t5.lora import apply_lora, fuse_lora, save_adapters

    model, _ = mlx_t5.load(model_dir)
    apply_lora(model, rank=4, alpha=8.0, targets="all")
    # lora_b starts at zero (a no-op): make the adapter change the answers
    rng = np.random.default_rng(0)
    updates = [(k, mx.array(rng.normal(0, 0.5, v.shape).astype(np.float32)))
               for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.load_weights(updates, strict=False)
    save_adapters(model, tmp_path / "adapter", meta={"base_model": str(model_dir)})
    want = mlx_t5.generate(fuse_lora(model), mlx_backend.tokenizer, QUERIES, max_new_tokens=8)

    served = make_backend("mlx").load(tmp_path / "adapter")
    got = served.generate(QUERIES, max_new_tokens=8)
    assert got == [w.strip() for w in want]
    assert got != mlx_backend.generate(QUERIES, max_new_tokens=8)  # the adapter did something


def test_load_errors_are_backend_errors(model_dir, tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        make_backend("mlx").load(tmp_path)
    (tmp_path / "quantization.json").write_text("{}")
    with pytest.raises(EngineError, match="--backend torch-int8"):
        make_backend("torch").load(tmp_path)
    with pytest.raises(EngineError, match="unknown backend 'tensorrt'"):
        make_backend("tensorrt")
    with pytest.raises(EngineError, match="torch int8 weights"):
        make_backend("onnx").load(tmp_path)
    with pytest.raises(EngineError, match="dtype 'bfloat16' does not apply"):
        make_backend("onnx").load(model_dir, dtype="bfloat16")
    with pytest.raises(EngineError, match="no model loaded"):
        make_backend("mlx").generate(QUERIES)
    import platform
    import sys

    import torch

    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    assert default_backend() == ("mlx" if apple else "torch" if torch.cuda.is_available() else "onnx")


@pytest.mark.parametrize("name", ["mlx", "torch-int8", "onnx"])
def test_set_threads_changes_what_describe_reports(model_dir, mlx_backend, name):
    """set_threads is part of every engine's contract: the library's thread count changes, answers do not."""
    import torch

    from mlx_t5 import blas

    backend = mlx_backend if name == "mlx" else make_backend(name).load(model_dir)
    key = {"mlx": "blas_threads", "torch-int8": "torch_threads", "onnx": "onnxruntime_threads"}[name]
    if name == "mlx" and blas.get_threads() is None:
        pytest.skip("no OpenBLAS under MLX here: MLX's own CPU ops have no thread setting")
    before, want = backend.describe()[key], backend.generate(QUERIES, max_new_tokens=8)
    torch_threads = torch.get_num_threads()
    try:
        backend.set_threads(2)
        assert backend.describe()[key] == 2
        assert backend.generate(QUERIES, max_new_tokens=8) == want
        with pytest.raises(EngineError, match="threads"):
            backend.set_threads(0)
    finally:
        backend.set_threads(before)
        torch.set_num_threads(torch_threads)


def test_decoding_limits_are_the_shared_ones(mlx_backend):
    from reformulation.engine import LIMITS

    assert mlx_backend.generate(QUERIES[:1], num_beams=LIMITS.max_beams, max_new_tokens=2)
    with pytest.raises(EngineError, match=f"num_beams must be an integer >= 1 and <= {LIMITS.max_beams}"):
        mlx_backend.generate(QUERIES, num_beams=LIMITS.max_beams + 1)
    with pytest.raises(EngineError, match=f"max_new_tokens must be an integer >= 1 and <= {LIMITS.max_new_tokens}"):
        list(mlx_backend.stream(QUERIES[0], max_new_tokens=LIMITS.max_new_tokens + 1))
    with pytest.raises(EngineError, match="temperature must be a number >= 0 and <= 2"):
        mlx_backend.generate(QUERIES, temperature=LIMITS.max_temperature + 0.5)
    with pytest.raises(EngineError, match="unexpected keyword argument 'beams'"):
        mlx_backend.generate(QUERIES, beams=2)
