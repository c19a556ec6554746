"""T5 checkpoint -> GGUF for llama.cpp (architecture "t5": encoder-decoder, relative position buckets).

Tensor names come from gguf's TensorNameMap (`enc.blk.0.attn_q.weight`, `dec.blk.0.cross_attn_k.weight`, ...),
hyper-parameters and the SentencePiece (Unigram, tokenizer.ggml.model "t5") vocabulary follow llama.cpp's
own converter. Two llama.cpp facts shape what we write:
- a T5 v1.0 model ties its head to the embedding *and* scales the decoder output by d_model**-0.5; llama.cpp
  falls back to the raw embedding when `output.weight` is missing and never scales, so a tied model gets an
  explicit `output.weight` = shared * d_model**-0.5 (same logits as transformers);
- llama.cpp hard-codes relative_attention_max_distance = 128 and runs only "relu" and "gated-gelu" FFNs:
  other configs are refused rather than exported into a file that computes something else.
"""

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import mlx_t5  # noqa: F401, I001  (first: it preloads OpenBLAS before mlx is imported)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_t5.quantize import dequantize_model
from reformulation.constants import decoder_output_scale
from reformulation.io import read_json_object

from .checkpoints import load_checkpoint, read_config
from .errors import ConvertError

TYPES = ("f32", "f16", "q8_0")
LLAMA_CPP_MAX_DISTANCE = 128
LLAMA_CPP_FFN = ("relu", "gated-gelu")
ADDED_TOKEN_SCORE = -1000.0  # llama.cpp's converter scores added (user-defined) tokens so
UNUSED_SCORE = -10000.0

PathLike = Union[str, Path]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConvertError("the gguf package is not installed (pip install 'query-reformulation[convert]')") from None
    return gguf


# ---------------------------------------------------------------- tokenizer


def _sentencepiece_vocab(path: Path) -> dict:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM, what T5 uses and llama.cpp's "t5" tokenizer runs
        raise ConvertError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not Unigram")
    return {
        "tokens": [p.piece for p in proto.pieces],
        "scores": [p.score for p in proto.pieces],
        "types": [int(p.type) for p in proto.pieces],  # same numbering as gguf.TokenType
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
        "precompiled_charsmap": bytes(proto.normalizer_spec.precompiled_charsmap),
        "source": str(path),
    }


def _walk_normalizers(node):
    if not isinstance(node, dict):
        return
    yield node
    for child in node.get("normalizers") or []:
        yield from _walk_normalizers(child)


def _tokenizer_json_vocab(path: Path) -> dict:
    """The same fields from a `tokenizers` Unigram tokenizer.json (what transformers 5 saves: no spiece.model)."""
    import base64

    data = read_json_object(path, "a tokenizer folder", ConvertError)
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        raise ConvertError(f"{path}: tokenizer model {model.get('type')!r} is not Unigram (T5's SentencePiece)")
    added = {t["id"] for t in data.get("added_tokens") or []}
    n = len(model["vocab"])
    while n - 1 in added:  # the sentinels appended after the SentencePiece pieces
        n -= 1
    unk_id = model.get("unk_id")
    tokens = [piece for piece, _ in model["vocab"][:n]]
    scores = [float(score) for _, score in model["vocab"][:n]]
    types = [2 if i == unk_id else 1 for i in range(n)]
    for t in data.get("added_tokens") or []:  # <pad>, </s>, <unk> live inside the piece range: control tokens
        if t["id"] < len(tokens) and t["id"] != unk_id:
            types[t["id"]] = 3
    normalizers = list(_walk_normalizers(data.get("normalizer")))
    charsmap = next((n["precompiled_charsmap"] for n in normalizers if n.get("type") == "Precompiled"), None)
    pre_tokenizer = data.get("pre_tokenizer") or {}
    pres = [pre_tokenizer, *(pre_tokenizer.get("pretokenizers") or [])]
    pre = next((p for p in pres if p.get("type") == "Metaspace"), pre_tokenizer)
    # sentencepiece's remove_extra_whitespaces: a "  +" -> " " Replace (tokenizers' converter) or a
    # WhitespaceSplit pre-tokenizer (what transformers 5 saves)
    collapse = any(n.get("type") == "Replace" for n in normalizers) or \
        any(p.get("type") == "WhitespaceSplit" for p in pres)
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "add_space_prefix": pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True),
        "remove_extra_whitespaces": collapse,
        "precompiled_charsmap": base64.b64decode(charsmap) if charsmap else b"",
        "source": str(path),
    }


def _added_tokens(folder: Path) -> dict[int, str]:
    """id -> text of the tokens added on top of the SentencePiece model (T5's 100 <extra_id_N> sentinels)."""
    readers = (
        ("tokenizer.json", lambda d: {t["id"]: t["content"] for t in d.get("added_tokens") or []}),
        ("tokenizer_config.json",
         lambda d: {int(i): t["content"] for i, t in (d.get("added_tokens_decoder") or {}).items()}),
        ("added_tokens.json", lambda d: {int(i): text for text, i in d.items()}),
    )
    for name, read in readers:
        path = folder / name
        if path.is_file():
            try:
                return read(read_json_object(path, "a tokenizer folder", ConvertError))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ConvertError(f"{path}: cannot read its added tokens ({type(e).__name__}: {e})") from None
    return {}


def tokenizer_vocab(folder: PathLike, vocab_size: int) -> dict:
    """The vocabulary llama.cpp's "t5" tokenizer needs, `vocab_size` entries long (the embedding rows).

    Read from spiece.model when the folder has one, else from tokenizer.json; both give the same result.
    Added tokens become USER_DEFINED, rows past the tokenizer `[PAD{id}]` UNUSED, as llama.cpp does.
    """
    folder = Path(folder)
    if (folder / "spiece.model").is_file():
        vocab = _sentencepiece_vocab(folder / "spiece.model")
    elif (folder / "tokenizer.json").is_file():
        vocab = _tokenizer_json_vocab(folder / "tokenizer.json")
    else:
        raise ConvertError(f"{folder}: no spiece.model or tokenizer.json; pass --tokenizer DIR")
    n = len(vocab["tokens"])
    if n > vocab_size:
        raise ConvertError(f"{vocab['source']}: {n} pieces but the model embeds only {vocab_size} ids")
    tokens = vocab["tokens"] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores = vocab["scores"] + [UNUSED_SCORE] * (vocab_size - n)
    types = vocab["types"] + [5] * (vocab_size - n)
    for i, text in _added_tokens(folder).items():
        if n <= i < vocab_size:
            tokens[i], scores[i], types[i] = text, ADDED_TOKEN_SCORE, 4
    unk = [i for i, t in enumerate(types) if t == 2]
    return dict(vocab, tokens=tokens, scores=scores, types=types, unk_token_id=unk[0] if unk else None)


# ---------------------------------------------------------------- tensors


def _tensor_type(gguf, name: str, array: np.ndarray, out_type: str):
    """Norms and relative-bias tables stay f32 (tiny, and every score depends on them); q8_0 needs rows that
    split into blocks of 32, else f16 (what llama.cpp's converter falls back to)."""
    q = gguf.GGMLQuantizationType
    if array.ndim < 2 or name.endswith("attn_rel_b.weight") or out_type == "f32":
        return q.F32
    if out_type == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def gguf_tensors(model, gguf) -> list[tuple[str, np.ndarray]]:
    """(gguf name, float32 array) for every tensor llama.cpp reads, in checkpoint order."""
    args = model.args
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    scale = decoder_output_scale(args)
    if scale is not None:
        weights["lm_head.weight"] = weights["shared.weight"] * np.float32(scale)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, max(args.num_layers, args.num_decoder_layers))
    out, unmapped = [], []
    for key, value in weights.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            unmapped.append(key)
        else:
            out.append((name, value))
    if unmapped:
        raise ConvertError(f"tensors with no llama.cpp T5 name: {', '.join(unmapped[:6])}")
    return out


# ---------------------------------------------------------------- file


def check_supported(args, where: str):
    if args.feed_forward_proj not in LLAMA_CPP_FFN:
        raise ConvertError(f"{where}: feed_forward_proj {args.feed_forward_proj!r}; llama.cpp's T5 runs only "
                           f"{' and '.join(LLAMA_CPP_FFN)}")
    if args.relative_attention_max_distance != LLAMA_CPP_MAX_DISTANCE:
        raise ConvertError(f"{where}: relative_attention_max_distance {args.relative_attention_max_distance}; "
                           f"llama.cpp hard-codes {LLAMA_CPP_MAX_DISTANCE}")


def to_gguf(model_dir: PathLike, out_file: PathLike, out_type: str = "f16", tokenizer_dir: Optional[PathLike] = None,
            progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Write `out_file` (atomically) from an HF or MLX checkpoint folder; returns a summary dict.

    Args:
        out_type: "f32", "f16" (1-D tensors and relative-bias tables stay f32) or "q8_0".
        tokenizer_dir: folder with spiece.model or tokenizer.json when `model_dir` has neither.
        progress: called as progress(done, total, tensor_name) while tensors are converted.
    """
    gguf = _gguf()
    if out_type not in TYPES:
        raise ConvertError(f"GGUF type {out_type!r} not supported (choose {', '.join(TYPES)})")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = dequantize_model(load_checkpoint(model_dir))
    args = model.args
    check_supported(args, str(model_dir / "config.json"))
    vocab = tokenizer_vocab(tokenizer_dir or model_dir, args.vocab_size)
    tensors = gguf_tensors(model, gguf)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.T5])
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(file_type)
        writer.add_context_length(int(config.get("n_positions", 512)))
        writer.add_embedding_length(args.d_model)
        writer.add_feed_forward_length(args.d_ff)
        writer.add_block_count(args.num_layers)
        writer.add_decoder_block_count(args.num_decoder_layers)
        writer.add_head_count(args.num_heads)
        writer.add_key_length(args.d_kv)
        writer.add_value_length(args.d_kv)
        writer.add_layer_norm_eps(args.layer_norm_epsilon)
        writer.add_layer_norm_rms_eps(args.layer_norm_epsilon)
        writer.add_relative_attn_buckets_count(args.relative_attention_num_buckets)
        writer.add_decoder_start_token_id(args.decoder_start_token_id)

        writer.add_tokenizer_model("t5")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_add_space_prefix(bool(vocab["add_space_prefix"]))
        writer.add_remove_extra_whitespaces(bool(vocab["remove_extra_whitespaces"]))
        if vocab["precompiled_charsmap"]:
            writer.add_precompiled_charsmap(vocab["precompiled_charsmap"])
        writer.add_eos_token_id(args.eos_token_id)
        writer.add_pad_token_id(args.pad_token_id)
        if vocab["unk_token_id"] is not None:
            writer.add_unk_token_id(vocab["unk_token_id"])
        writer.add_add_bos_token(False)  # T5 has no BOS; its tokenizer appends </s>
        writer.add_add_eos_token(True)

        counts = {}
        for i, (name, array) in enumerate(tensors):
            qtype = _tensor_type(gguf, name, array, out_type)
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            if progress is not None:
                progress(i + 1, len(tensors), name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out_file), "bytes": out_file.stat().st_size, "tensors": len(tensors), "types": counts,
            "tied_head_scaled": args.tie_word_embeddings, "tokenizer": vocab["source"]}
