"""GGUF export for llama.cpp, read back with gguf.GGUFReader: tensors, hyper-parameters, tokenizer, errors."""

import shutil

import numpy as np
import pytest
from hf_models import save_model
from safetensors.numpy import load_file

from convert.__main__ import main
from convert.errors import ConvertError
from convert.gguf_export import to_gguf, tokenizer_vocab

gguf = pytest.importorskip("gguf")

# every llama.cpp T5 key (llama_model_t5::load_arch_hparams, llm_load_hparams, llama_vocab::load)
HPARAMS = {
    "general.architecture": "t5", "t5.context_length": 512, "t5.block_count": 2, "t5.decoder_block_count": 2,
    "t5.embedding_length": 96, "t5.feed_forward_length": 160, "t5.attention.head_count": 3,
    "t5.attention.key_length": 20, "t5.attention.value_length": 20, "t5.attention.relative_buckets_count": 32,
    "t5.decoder_start_token_id": 0, "tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default",
    "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 2,
    "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True,
    "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.remove_extra_whitespaces": True,
}


@pytest.fixture(scope="module")
def odd(tmp_path_factory, tokenizer_dir):
    """odd-heads: gated-gelu, untied head, d_model 96 (q8_0 blocks fit) but 3 x 20 = 60-wide attention output.
    With spiece.model beside tokenizer.json, as in a hub checkpoint."""
    folder = save_model("odd-heads", tmp_path_factory.mktemp("gguf") / "odd-heads", tokenizer_dir)
    shutil.copy(tokenizer_dir / "spiece.model", folder)
    return folder, load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def exported(odd, tmp_path_factory):
    """{type: (fields, tensors)}: each file written and read back once (GGUFReader takes seconds per file)."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for kind in ("f32", "f16", "q8_0"):
        to_gguf(odd[0], root / f"{kind}.gguf", kind)
        out[kind] = read(root / f"{kind}.gguf")
    out["sizes"] = {kind: (root / f"{kind}.gguf").stat().st_size for kind in ("f32", "f16", "q8_0")}
    return out


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    """Float32 values in numpy (row-major, HF) order."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


NAMES = {  # a few HF -> llama.cpp names, spelled out so a wrong mapping fails here
    "shared.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "enc.blk.0.attn_rel_b.weight",
    "encoder.block.1.layer.1.DenseReluDense.wi_0.weight": "enc.blk.1.ffn_gate.weight",
    "encoder.block.1.layer.1.DenseReluDense.wi_1.weight": "enc.blk.1.ffn_up.weight",
    "decoder.block.1.layer.1.EncDecAttention.k.weight": "dec.blk.1.cross_attn_k.weight",
    "decoder.block.0.layer.2.DenseReluDense.wo.weight": "dec.blk.0.ffn_down.weight",
    "decoder.final_layer_norm.weight": "dec.output_norm.weight",
    "encoder.block.0.layer.1.layer_norm.weight": "enc.blk.0.ffn_norm.weight",
}


def test_f32_tensors_are_exact_and_metadata_complete(odd, exported):
    weights = odd[1]
    fields, tensors = exported["f32"]
    for key, value in HPARAMS.items():
        assert fields.get(key) == value, key
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["t5.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(tensors) == len(weights)  # every HF tensor, each once (no embed_tokens aliases in the file)
    for hf_name, name in NAMES.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(values(tensors[name]), weights[hf_name]), name
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, 2)
    for hf_name, value in weights.items():
        assert np.array_equal(values(tensors[names.get_name(hf_name, try_suffixes=(".weight",))]), value), hf_name


def test_f16_and_q8_0_within_rounding(odd, exported):
    weights = odd[1]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, 2)
    f16, q8 = exported["f16"][1], exported["q8_0"][1]
    assert exported["f16"][0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert exported["q8_0"][0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    kinds = set()
    for hf_name, value in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        a, b = f16[name], q8[name]
        if value.ndim == 1 or "attn_rel_b" in name:  # norms and bias tables stay f32
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(values(a), value) and np.array_equal(values(b), value)
            continue
        assert a.tensor_type == gguf.GGMLQuantizationType.F16
        assert np.array_equal(values(a), value.astype(np.float16).astype(np.float32)), name
        kinds.add(b.tensor_type)
        if b.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            # one scale per 32 weights: error at most half a step (max |block| / 127 / 2), plus fp16 scale rounding
            blocks = value.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(values(b).reshape(-1, 32) - blocks)
            assert (err <= step * 0.5 + np.abs(blocks) * 2e-3 + 1e-7).all(), name
        else:  # rows of 60 (attention output in = 3 heads x 20) do not split into blocks of 32
            assert value.shape[-1] % 32 != 0 and b.tensor_type == gguf.GGMLQuantizationType.F16
    assert kinds == {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16}
    sizes = exported["sizes"]
    assert sizes["q8_0"] < 0.6 * sizes["f16"] and sizes["f16"] < 0.6 * sizes["f32"]


def test_tied_relu_model_with_a_deeper_decoder(tmp_path, tokenizer_dir):
    """T5 v1.0 (tied, ReLU) with 1 encoder and 3 decoder blocks. llama.cpp uses token_embd as the head when
    output.weight is missing and never rescales: the tied head is written explicitly, prescaled."""
    folder = save_model("deep-decoder", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True,
                        feed_forward_proj="relu", relative_attention_max_distance=128,
                        relative_attention_num_buckets=32)
    weights = load_file(folder / "model.safetensors")
    summary = to_gguf(folder, tmp_path / "tied.gguf", "f32")
    assert summary["tied_head_scaled"]
    fields, tensors = read(tmp_path / "tied.gguf")
    assert np.array_equal(values(tensors["token_embd.weight"]), weights["shared.weight"])
    expected = weights["shared.weight"] * np.float32(64 ** -0.5)
    assert np.array_equal(values(tensors["output.weight"]), expected)
    assert "enc.blk.0.ffn_gate.weight" not in tensors and "enc.blk.0.ffn_up.weight" in tensors  # ReLU: no gate
    assert fields["t5.block_count"] == 1 and fields["t5.decoder_block_count"] == 3
    assert "dec.blk.2.cross_attn_o.weight" in tensors and "enc.blk.1.attn_q.weight" not in tensors


def test_tokenizer_metadata_from_spiece_model(exported, tokenizer_dir):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tokenizer_dir / "spiece.model").read_bytes())
    fields = exported["f16"][0]
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == 32128  # the embedding rows
    n = len(proto.pieces)
    assert tokens[:n] == [p.piece for p in proto.pieces]
    assert np.array_equal(np.float32(scores[:n]), np.float32([p.score for p in proto.pieces]))
    assert types[:3] == [3, 3, 2] and set(types[3:n]) == {1}  # <pad>, </s> control; <unk> unknown
    assert tokens[n] == "<extra_id_99>" and tokens[n + 99] == "<extra_id_0>" and set(types[n:n + 100]) == {4}
    assert tokens[-1] == "[PAD32127]" and types[-1] == 5
    assert bytes(fields["tokenizer.ggml.precompiled_charsmap"]) == proto.normalizer_spec.precompiled_charsmap


def test_tokenizer_json_gives_the_same_vocabulary_as_spiece(tmp_path, tokenizer_dir):
    """Folders saved by transformers 5 have tokenizer.json only."""
    only_json = tmp_path / "json"
    only_json.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, only_json)
    a, b = tokenizer_vocab(tokenizer_dir, 32128), tokenizer_vocab(only_json, 32128)
    assert a["tokens"] == b["tokens"] and a["types"] == b["types"]
    assert np.array_equal(np.float32(a["scores"]), np.float32(b["scores"]))
    for key in ("add_space_prefix", "remove_extra_whitespaces", "precompiled_charsmap", "unk_token_id"):
        assert a[key] == b[key], key


def test_cli_and_errors(odd, tmp_path, tokenizer_dir, capsys):
    folder, _ = odd
    assert main(["to-gguf", "--model", str(folder), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out

    def fails(*argv) -> str:
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        return err

    deep = save_model("deep-decoder", tmp_path / "deep", tokenizer_dir)  # max_distance 32
    assert "hard-codes 128" in fails("to-gguf", "--model", deep, "--out", tmp_path / "x.gguf")
    silu = save_model("odd-heads", tmp_path / "silu", tokenizer_dir, feed_forward_proj="gated-silu")
    assert "gated-silu" in fails("to-gguf", "--model", silu, "--out", tmp_path / "x.gguf")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "spiece.model"))
    assert "pass --tokenizer" in fails("to-gguf", "--model", bare, "--out", tmp_path / "x.gguf")
    assert main(["to-gguf", "--model", str(bare), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "x.gguf")]) == 0
    with pytest.raises(ConvertError, match="q4_k"):
        to_gguf(folder, tmp_path / "y.gguf", "q4_k")
    assert not (tmp_path / "y.gguf").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # failed writes leave no temp file


def test_llama_cpp_runs_the_file(odd, tmp_path, tokenizer_dir):
    """Opt-in: needs llama-cpp-python (PyPI ships only an sdist that compiles llama.cpp, too slow for CI)."""
    llama = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (its PyPI sdist compiles "
                                "llama.cpp: minutes beyond the CI budget)")
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    folder, _ = odd
    to_gguf(folder, tmp_path / "m.gguf", "f32")
    text = "reformulate: Who lived longer, Nikola Tesla or Milutin Milankovic?"
    expected_ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(text).input_ids
    dec = [0, 8, 1782, 14, 37]
    with torch.no_grad():
        hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
        expected = hf(input_ids=torch.tensor([expected_ids]), decoder_input_ids=torch.tensor([dec])).logits[0].numpy()

    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(str(tmp_path / "m.gguf").encode(), llama.llama_model_default_params())
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 128
    ctx = llama.llama_init_from_model(model, params)
    vocab = llama.llama_model_get_vocab(model)
    buf = (llama.llama_token * 128)()
    n = llama.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 128, True, False)
    assert list(buf[:n]) == expected_ids  # the tokenizer metadata reproduces HF's tokenization
    assert llama.llama_encode(ctx, llama.llama_batch_get_one(buf, n)) == 0
    assert llama.llama_model_decoder_start_token(model) == 0
    batch = llama.llama_batch_init(len(dec), 0, 1)
    batch.n_tokens = len(dec)
    for i, t in enumerate(dec):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    assert llama.llama_decode(ctx, batch) == 0
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    got = np.array([np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                    for i in range(len(dec))])
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)
    # llama.cpp keeps its KV cache in f16: close, not bit-equal
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 5e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
