"""transformers T5 -> two ONNX graphs for ONNX Runtime: the encoder, and one decoder step.

    encoder.onnx   input_ids (B, S), attention_mask (B, S)
                   -> cross_key_0, cross_value_0, ... (B, heads, S, d_kv): each decoder layer's
                      cross-attention keys and values
    decoder.onnx   input_ids (B, n), distances (n, t + n), attention_mask (B, S), the cross K/V,
                   past_key_0, past_value_0, ... (B, heads, t, d_kv)
                   -> logits (B, n, vocab), present_key_0, present_value_0, ... (B, heads, t + n, d_kv)

The decoder runs n new positions against the past: n = 1 is a plain decoding step; n > 1 checks the
drafts of speculative decoding in one pass (reformulation.speculative). Attention is ONNX Runtime's fused
``MultiHeadAttention`` (with the past K/V and T5's additive bias), so a decoder pass is ~240 kernels;
``distances`` (row i: how far back each key position lies from new position i, negative for the
positions after it, which are masked) index a table of T5's decoder position bias, which stops changing
at ``relative_attention_max_distance``.

Every projection (and the LM head) becomes ONNX Runtime's ``MatMulNBits`` with 8-bit weights in blocks
of 128 along the input (one scale each, symmetric) and ``accuracy_level=4``: activations are quantized to
int8 per row and block on the fly and the products accumulate in int32 (AVX-512 VNNI / AVX2 / NEON
kernels in MLAS). Why not the ONNX standard ``MatMulInteger`` from ``onnxruntime.quantization.
quantize_dynamic``: measured 4.8 ms against 2.6 ms per decoder step for flan-t5-small, 1 thread.

Export runs transformers' own encoder through torch's TorchScript-based exporter (the dynamo one fails
on transformers 5's mask functions; optimum's exporter needs transformers < 4.58); the decoder step is
written out below with the model's own modules.

bits=4 (``--bits 4``) writes 4-bit ``MatMulNBits`` instead (rtn, rtn-asym or hqq; blocks of 32/64/128): faster
but below the quality bar on the models measured, so 8 stays the default (BENCHMARKS.md, "4-bit weights").

    from onnx_t5.export import export
    export("runs/base/final", "runs/base/onnx")            # int8; quantize=False keeps float32
    python -m convert to-onnx --model runs/base/final --out runs/base/onnx
"""

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from reformulation.constants import decoder_output_scale
from reformulation.io import atomic_dir
from reformulation.speculative import DRAFTS_FILE

FORMAT = "onnx-t5"
MARKER = "onnx.json"
OPSET = 17
BLOCK_SIZE = 128
BITS = (8, 4)
METHODS = ("rtn", "rtn-asym", "hqq")  # 4-bit quantizers (quantize_matmuls)
DEFAULT_BITS = 8
DEFAULT_4BIT = {"block_size": 32, "method": "rtn-asym"}  # best 4-bit quality with a fast kernel (BENCHMARKS.md)


def quantization(bits: int = DEFAULT_BITS, block_size: Optional[int] = None, method: Optional[str] = None
                 ) -> tuple[int, int, str]:
    """(bits, block_size, method) with the defaults filled in: 8 bits: blocks of 128, rtn; 4 bits: the best
    measured variant."""
    if bits not in BITS:
        raise ExportError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if bits == 8:
        return bits, block_size or BLOCK_SIZE, method or "rtn"
    return bits, block_size or DEFAULT_4BIT["block_size"], method or DEFAULT_4BIT["method"]




class ExportError(RuntimeError):
    """A model that cannot be exported; the message says why."""


def _modules():
    """The torch wrappers, built on first use: importing this module must not need torch."""
    import torch
    from torch import nn

    class Attention(torch.autograd.Function):
        """ONNX Runtime's com.microsoft.MultiHeadAttention as one node (q/k/v transposes, the cache concat,
        scores, bias, softmax and the weighted sum in one kernel); forward is the same arithmetic in torch,
        which the exporter traces for shapes. T5 does not scale its scores: scale 1.
        q (B, n, H*D); self-attention: k, v (B, n, H*D) and the past (B, H, t, D) -> (out, present k, present v);
        cross-attention: k, v (B, H, S, D), no past -> out."""

        @staticmethod
        def forward(ctx, q, k, v, bias, past_k, past_v, heads):
            B, N, HD = q.shape
            q = q.view(B, N, heads, HD // heads).transpose(1, 2)
            if past_k is not None:
                k = torch.cat([past_k, k.view(B, N, heads, HD // heads).transpose(1, 2)], dim=2)
                v = torch.cat([past_v, v.view(B, N, heads, HD // heads).transpose(1, 2)], dim=2)
            out = (torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v).transpose(1, 2).reshape(B, N, HD)
            return out if past_k is None else (out, k, v)

        @staticmethod
        def symbolic(g, q, k, v, bias, past_k, past_v, heads):
            # inputs 3 (projection bias) and 4 (key padding mask) stay empty: _empty_inputs writes them in
            if past_k is None or past_k.node().mustBeNone():
                outputs = [g.op("com.microsoft::MultiHeadAttention", q, k, v, bias, num_heads_i=heads, scale_f=1.0)]
            else:
                outputs = g.op("com.microsoft::MultiHeadAttention", q, k, v, bias, past_k, past_v, num_heads_i=heads,
                               scale_f=1.0, outputs=3)
            for out, like in zip(outputs, (q, past_k, past_v)):  # dtype and rank; every size is dynamic
                out.setType(like.type().with_sizes([None] * (3 if like is q else 4)))
            return outputs[0] if len(outputs) == 1 else outputs

    class Encoder(nn.Module):
        """transformers' encoder, then all decoder layers' cross-attention K/V projections as one matmul,
        split into one (B, heads, S, d_kv) key and value per layer."""

        def __init__(self, model):
            super().__init__()
            config = model.config
            self.encoder, self.heads, self.d_kv = model.encoder, config.num_heads, config.d_kv
            self.layers = len(model.decoder.block)
            attn = [block.layer[1].EncDecAttention for block in model.decoder.block]
            self.cross_kv = nn.Linear(config.d_model, 2 * self.layers * self.heads * self.d_kv, bias=False)
            self.cross_kv.weight = nn.Parameter(torch.cat([w for a in attn for w in (a.k.weight, a.v.weight)]))

        def forward(self, input_ids, attention_mask):
            memory = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            B, S = input_ids.shape
            kv = self.cross_kv(memory).view(B, S, 2 * self.layers, self.heads, self.d_kv).permute(2, 0, 3, 1, 4)
            return tuple(kv.unbind(0))  # key 0, value 0, key 1, ...

    class DecoderStep(nn.Module):
        """n decoder positions for a batch: T5Block's arithmetic with the cache passed in and out."""

        def __init__(self, model):
            super().__init__()
            config = model.config
            self.embed, self.heads, self.d_kv = model.shared, config.num_heads, config.d_kv
            self.blocks = model.decoder.block
            self.final_norm, self.lm_head = model.decoder.final_layer_norm, model.lm_head
            self.scale = decoder_output_scale(config)  # T5 v1.0 (tied head); traced as a constant
            # q, k, v and the two gated-FFN inputs as one matmul each
            self.qkv = nn.ModuleList()
            self.wi = nn.ModuleList()
            for block in self.blocks:
                sa, ff = block.layer[0].SelfAttention, block.layer[2].DenseReluDense
                self.qkv.append(_fused(torch, nn, [sa.q, sa.k, sa.v]))
                self.wi.append(_fused(torch, nn, [ff.wi_0, ff.wi_1] if hasattr(ff, "wi_0") else [ff.wi]))
            # decoder self-attention bias by distance back (0 = this position); constant from max_distance on
            attn0 = self.blocks[0].layer[0].SelfAttention
            distance = torch.arange(config.relative_attention_max_distance + 1)
            buckets = attn0._relative_position_bucket(-distance, bidirectional=False,
                                                      num_buckets=config.relative_attention_num_buckets,
                                                      max_distance=config.relative_attention_max_distance)
            self.register_buffer("position_bias", attn0.relative_attention_bias(buckets).detach())

        def forward(self, input_ids, distances, attention_mask, *cache):
            """cache: each layer's cross key and value, then each layer's past key and value."""
            B, H = input_ids.shape[0], self.heads
            HD = H * self.d_kv
            layers = len(self.blocks)
            cross, past = cache[:2 * layers], cache[2 * layers:]
            h = self.embed(input_ids)  # (B, n, d_model)
            bias = self.position_bias[distances.clamp(min=0, max=self.position_bias.shape[0] - 1)]  # (n, t + n, H)
            bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, n, t + n)
            bias = bias.masked_fill((distances < 0).unsqueeze(0).unsqueeze(0), torch.finfo(h.dtype).min)
            cross_bias = (1.0 - attention_mask.to(h.dtype)).reshape(B, 1, 1, -1) * torch.finfo(h.dtype).min
            cross_bias = cross_bias.expand(-1, -1, h.shape[1], -1)  # (B, 1, n, S): MultiHeadAttention wants n rows
            present = []
            for i, block in enumerate(self.blocks):
                self_layer, cross_layer, ff_layer = block.layer
                qkv = self.qkv[i](self_layer.layer_norm(h))
                attn, key, value = Attention.apply(qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:], bias,
                                                   past[2 * i], past[2 * i + 1], H)
                present += [key, value]
                h = h + self_layer.SelfAttention.o(attn)
                cross_attn = cross_layer.EncDecAttention
                q = cross_attn.q(cross_layer.layer_norm(h))
                attn = Attention.apply(q, cross[2 * i], cross[2 * i + 1], cross_bias, None, None, H)
                h = h + cross_attn.o(attn)
                ff = ff_layer.DenseReluDense
                x = self.wi[i](ff_layer.layer_norm(h))
                if hasattr(ff, "wi_0"):
                    gate, linear = x.chunk(2, dim=-1)
                    x = ff.act(gate) * linear
                else:
                    x = ff.act(x)
                h = h + ff.wo(x)
            h = self.final_norm(h)
            if self.scale is not None:
                h = h * self.scale
            return (self.lm_head(h), *present)

    return Encoder, DecoderStep


def cache_names(layers: int, kind: str) -> list[str]:
    """Graph input / output names of the per-layer K/V tensors: cross_key_0, cross_value_0, cross_key_1, ..."""
    return [f"{kind}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


def _empty_inputs(graph) -> None:
    """MultiHeadAttention's optional inputs 3 and 4 (unused here) as empty names, which torch cannot emit."""
    for node in graph.graph.node:
        if node.op_type == "MultiHeadAttention":
            names = list(node.input)
            del node.input[:]
            node.input.extend(names[:3] + ["", ""] + names[3:])


def _fused(torch, nn, layers):
    """Bias-free Linear layers reading the same input, as one Linear (outputs side by side)."""
    if len(layers) == 1:
        return layers[0]
    fused = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers), bias=False)
    fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]).detach())
    return fused


def _export(module, args, path: Path, names_in, names_out, dynamic, contrib: bool = False):
    """The traced module as an in-memory ONNX graph (path: where it will be saved, for the temp folder)."""
    import onnx
    import torch

    # torch writes a float model over 2 GiB as one external file per tensor: into a folder of its own
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # the TorchScript exporter warns that it is deprecated and about traced shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(Path(tmp) / path.name), input_names=names_in,
                              output_names=names_out, dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False,
                              custom_opsets={"com.microsoft": 1} if contrib else None)
        graph = onnx.load(str(Path(tmp) / path.name))
    _empty_inputs(graph)
    return graph


def export_folder(model, out_dir, quantize: bool = True, block_size: Optional[int] = None, tokenizer=None,
                  source: Optional[str] = None, bits: int = DEFAULT_BITS, method: Optional[str] = None) -> dict:
    """Write what onnx_t5.load reads for a T5ForConditionalGeneration into the existing folder out_dir:
    encoder.onnx, decoder.onnx, config.json, generation_config.json, onnx.json (returned) and the tokenizer
    if one is given."""
    import torch

    config = model.config
    if getattr(config, "model_type", None) != "t5":
        raise ExportError(f"onnx export handles T5 models, got model_type {getattr(config, 'model_type', None)!r}")
    bits, block_size, method = quantization(bits, block_size, method)
    model = model.float().eval()
    Encoder, DecoderStep = _modules()
    out_dir = Path(out_dir)
    L, H, D = len(model.decoder.block), config.num_heads, config.d_kv
    B, S, T = 2, 5, 3  # example shapes for tracing; every one of them is a dynamic axis
    ids = torch.full((B, S), 1, dtype=torch.long)
    mask = torch.ones((B, S), dtype=torch.long)
    cross, past, present = cache_names(L, "cross"), cache_names(L, "past"), cache_names(L, "present")
    encoder = _export(Encoder(model).eval(), (ids, mask), out_dir / "encoder.onnx", ["input_ids", "attention_mask"],
                      cross, {"input_ids": {0: "batch", 1: "source"}, "attention_mask": {0: "batch", 1: "source"},
                              **{name: {0: "batch", 2: "source"} for name in cross}})
    N = 2  # new positions: a step is 1, a speculative check more
    distances = torch.arange(T, T + N).unsqueeze(1) - torch.arange(T + N).unsqueeze(0)  # (N, T + N)
    step_args = (torch.zeros((B, N), dtype=torch.long), distances, mask,
                 *[torch.zeros((B, H, S, D)) for _ in cross], *[torch.zeros((B, H, T, D)) for _ in past])
    decoder = _export(DecoderStep(model).eval(), step_args, out_dir / "decoder.onnx",
                      ["input_ids", "distances", "attention_mask", *cross, *past], ["logits", *present],
                      {"input_ids": {0: "batch", 1: "positions"}, "distances": {0: "positions", 1: "length"},
                       "attention_mask": {0: "batch", 1: "source"}, **{name: {0: "batch", 2: "source"} for name in cross},
                       **{name: {0: "batch", 2: "past"} for name in past}, "logits": {0: "batch", 1: "positions"},
                       **{name: {0: "batch", 2: "length"} for name in present}}, contrib=True)
    marker = {"format": FORMAT, "opset": OPSET, "source": source, "decoder_positions": "many",
              "parameters": sum(p.numel() for p in model.parameters()), "quantization": None}  # tied: counted once
    for name, graph in (("encoder.onnx", encoder), ("decoder.onnx", decoder)):
        if quantize:
            quantize_matmuls(graph, block_size, bits, method)
        _save(graph, out_dir / name)
    if quantize:
        marker["quantization"] = {"method": "MatMulNBits", "bits": bits, "block_size": block_size,
                                  "symmetric": method == "rtn", "quantizer": method, "accuracy_level": 4}
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def _save(graph, path: Path) -> None:
    """graph -> path, its weights in path.data beside it where protobuf's 2 GiB limit requires (float32
    flan-t5-large)."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    big = sum(init.ByteSize() for init in graph.graph.initializer) > 1_800_000_000
    onnx.save(graph, str(path), save_as_external_data=big, location=path.name + ".data")


def quantize_matmuls(graph, block_size: int = BLOCK_SIZE, bits: int = 8, method: str = "rtn") -> int:
    """Replace every MatMul / Gemm whose weight is a 2-D initializer by MatMulNBits (blocks of block_size
    inputs, int8 activations); returns how many. Embedding tables (Gather) stay float.
    bits 8: symmetric, one scale per block. bits 4: method "rtn" (round to nearest, symmetric: ONNX Runtime's
    own quantize_matmul_4bits kernel), "rtn-asym" (the same with a 4-bit zero point per block) or "hqq"
    (Half-Quadratic Quantization, ONNX Runtime's implementation: float zero points, optimised per block)."""
    from onnx import helper, numpy_helper

    if bits not in BITS:
        raise ExportError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if bits == 8 and method != "rtn" or method not in METHODS:
        raise ExportError(f"quantization method {method!r}: 8 bits take rtn; 4 bits {', '.join(METHODS)}")
    g = graph.graph
    inits = {init.name: init for init in g.initializer}
    nodes, count = [], 0
    for node in g.node:
        weight = _weight_of(node, inits)
        if weight is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[weight]).astype(np.float32)
        if node.op_type == "MatMul":
            w = w.T  # MatMul's B is (in, out); MatMulNBits stores (out, in)
        N, K = w.shape
        base = f"{weight}.q{bits}"
        if bits == 8:
            q, scale, zero = _int8_blocks(w, block_size)
        else:
            q, scale, zero = _int4_blocks(w, block_size, method)
        g.initializer.append(numpy_helper.from_array(q, base))
        g.initializer.append(numpy_helper.from_array(scale.reshape(-1), base + ".scale"))
        inputs = [node.input[0], base, base + ".scale"]
        if zero is not None:
            g.initializer.append(numpy_helper.from_array(zero, base + ".zero"))
            inputs.append(base + ".zero")
        nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + f".q{bits}",
                                      domain="com.microsoft", K=K, N=N, bits=bits, block_size=block_size,
                                      accuracy_level=4))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {name for node in g.node for name in node.input}
    kept = [init for init in g.initializer if init.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _int8_blocks(w: np.ndarray, block_size: int):
    """(out, in) float weights -> MatMulNBits' 8-bit blocks (zero point 128, implicit), scales, None."""
    N, K = w.shape
    blocks = -(-K // block_size)
    padded = np.zeros((N, blocks * block_size), np.float32)
    padded[:, :K] = w
    padded = padded.reshape(N, blocks, block_size)
    scale = np.abs(padded).max(axis=-1) / 127.0
    q = np.round(padded / np.where(scale == 0, 1.0, scale)[..., None]).clip(-127, 127)
    return (q + 128).astype(np.uint8), scale.astype(np.float32), None


def _int4_blocks(w: np.ndarray, block_size: int, method: str):
    """(out, in) float weights -> MatMulNBits' 4-bit blocks (N, blocks, block_size / 2), scales, zero points
    (None: symmetric, implicit 8)."""
    N, K = w.shape
    blocks = -(-K // block_size)
    if method == "hqq":
        return _hqq_blocks(w, block_size)
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    symmetric = method == "rtn"
    padded = np.zeros((blocks * block_size, N), np.float32)  # the kernel takes (K, N), K padded to blocks
    padded[:K] = w.T
    packed = np.zeros((N, blocks, block_size // 2), np.uint8)
    zero = np.zeros((N, (blocks + 1) // 2), np.uint8)
    scale = np.zeros((N, blocks), np.float32)
    quantize_matmul_4bits(packed, padded, scale, zero, block_size, N, K, symmetric)
    return packed, scale, None if symmetric else zero


def _hqq_blocks(w: np.ndarray, block_size: int):
    """HQQ (ONNX Runtime's HQQWeightOnlyQuantizer.quantize_internal, the reference algorithm; torch): 4-bit
    codes with a float scale and zero point per block, fitted to minimise the reconstruction error."""
    import sys
    import types

    import torch

    # the quantizer's module imports onnx_ir for graph rewriting this function does not use
    sys.modules.setdefault("onnx_ir", types.ModuleType("onnx_ir"))
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer

    N, K = w.shape
    q, scale, zero = HQQWeightOnlyQuantizer(None).quantize_internal(torch.from_numpy(w.copy()), bits=4,
                                                                   group_size=block_size)
    q = q.numpy().astype(np.uint8)  # (N, padded K)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(N, -1, block_size // 2)
    return packed, scale.numpy().astype(np.float32), zero.numpy().astype(np.float32).reshape(-1)


def _weight_of(node, inits) -> Optional[str]:
    """The float 2-D weight initializer a MatMul (B) or a bias-free Gemm (B, transposed) multiplies by."""
    if node.op_type == "MatMul" and node.input[1] in inits:
        weight = node.input[1]
    elif node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits:
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("transA") and attrs["transA"].i or not (attrs.get("transB") and attrs["transB"].i):
            return None
        if any(name in attrs and attrs[name].f != 1.0 for name in ("alpha", "beta")):
            return None
        weight = node.input[1]
    else:
        return None
    init = inits[weight]
    return weight if len(init.dims) == 2 and init.data_type == 1 else None  # 1 = FLOAT


def export(model_path, out_dir, quantize: bool = True, block_size: Optional[int] = None,
           tokenizer: Optional[str] = None, bits: int = DEFAULT_BITS, method: Optional[str] = None) -> Path:
    """HF folder or hub id -> an ONNX folder (encoder.onnx, decoder.onnx, config, tokenizer, onnx.json) that
    onnx_t5.load reads. The folder is written next to out_dir and renamed into place when complete."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    source = Path(model_path).expanduser()
    if (source / "quantization.json").is_file():
        raise ExportError(f"{model_path} holds torch int8 weights: export the float checkpoint it came from")
    if (source / MARKER).is_file():
        raise ExportError(f"{model_path} is already an ONNX folder")
    if not source.exists() and (str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") > 1):
        raise ExportError(f"{model_path}: no such folder (and not a hub id)")
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no "Loading weights" bar or tying notes in a REPL or server log
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = T5ForConditionalGeneration.from_pretrained(str(model_path), dtype="float32")
            tok = AutoTokenizer.from_pretrained(tokenizer or str(model_path))
    except (OSError, ValueError) as err:
        raise ExportError(f"{model_path}: could not load a T5 checkpoint ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    out = Path(out_dir).expanduser()
    with atomic_dir(out) as tmp:  # a reader sees the old folder or the new one, never neither
        export_folder(model, tmp, quantize=quantize, block_size=block_size, tokenizer=tok, source=str(model_path),
                      bits=bits, method=method)
        drafts = Path(str(model_path)).expanduser() / DRAFTS_FILE
        if drafts.is_file():  # the trainers' phrasebook for speculative decoding travels with the model
            shutil.copyfile(drafts, tmp / DRAFTS_FILE)
    return out
