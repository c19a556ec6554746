"""Greedy decoding for CPU serving, with the decoder step written out.

At batch 1, transformers' ``generate`` spends more time in its own machinery (cache objects, mask
building, logits processors, ~15 small ops per int8 projection) than flan-t5-small spends in its
matmuls. This loop runs the same computation in fewer, larger operations: q/k/v and wi_0/wi_1 as one
matmul each, the cross-attention K/V once per request, a preallocated self-attention cache, the
decoder position bias built once. It returns what ``model.generate(num_beams=1, do_sample=False)``
returns, for fp32 models and for the int8 models of ``torch_t5.int8`` (whose fused projections
are bit-identical: the activation scale of a row does not depend on which weights follow), token for token
wherever the BLAS rounds the fused and the separate matmuls alike; where it does not (OpenBLAS on AMD Zen 5), a
row may take the other of two near-tied tokens.

    from torch_t5.greedy import GreedyDecoder
    decoder = GreedyDecoder(model)          # once per model
    ids = decoder(input_ids, attention_mask, max_new_tokens=64)   # like model.generate(...)
"""

import weakref
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from reformulation.constants import decoder_output_scale

from .int8 import Int8Linear


# generation_config fields that make generate() add a logits processor this loop does not have
_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
               "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "sequence_bias": None, "min_length": 0, "exponential_decay_length_penalty": None,
               "renormalize_logits": False}
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, GreedyDecoder]" = weakref.WeakKeyDictionary()


def supported(model: nn.Module) -> bool:
    """Whether GreedyDecoder reproduces model.generate(num_beams=1, do_sample=False) for this model:
    a float32 (or int8) T5 on the CPU in eval mode, plain Linear / Int8Linear projections, no extra
    logits processors."""
    gen = getattr(model, "generation_config", None)
    if model.training or getattr(model.config, "model_type", None) != "t5" or gen is None:
        return False
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return False  # the loop does float32 arithmetic (T5 in bf16 casts around its norms)
    if any(getattr(gen, name, default) not in (default, None) for name, default in _PROCESSORS.items()):
        return False
    linears = [m for m in model.decoder.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    return all(isinstance(m, Int8Linear) or (type(m) is nn.Linear and m.bias is None) for m in linears)


def decoder_for(model: nn.Module) -> "GreedyDecoder":
    """The model's GreedyDecoder, built on first use (it fuses copies of the projection weights)."""
    if model not in _DECODERS:
        _DECODERS[model] = GreedyDecoder(model)
    return _DECODERS[model]


def _projection(*layers: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Linear or Int8Linear layers that read the same input, as one matmul (outputs side by side).
    Int8Linear quantizes each input row on its own, so the fused matmul gives the layers' own values."""
    if all(isinstance(layer, Int8Linear) for layer in layers):
        return (Int8Linear.concat(list(layers)) if len(layers) > 1 else layers[0]).matmul_2d
    if all(type(layer) is nn.Linear and layer.bias is None for layer in layers):
        weight = torch.cat([layer.weight.detach() for layer in layers])
        return lambda x: F.linear(x, weight)
    raise TypeError(f"GreedyDecoder supports bias-free nn.Linear or Int8Linear, got {layers}")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5LayerNorm's arithmetic for float32 (F.rms_norm is 2x slower on one row on CPU)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The FFN activation as one op where transformers spells it out (gelu_new is 7 ops)."""
    from transformers.activations import NewGELUActivation

    return partial(F.gelu, approximate="tanh") if isinstance(act, NewGELUActivation) else act


class _Layer:
    """One decoder block's weights, as the step uses them."""

    def __init__(self, block: nn.Module):
        self_attn, cross, ffn = block.layer
        sa, ca, ff = self_attn.SelfAttention, cross.EncDecAttention, ffn.DenseReluDense
        self.norms = [(layer.layer_norm.weight, layer.layer_norm.variance_epsilon) for layer in block.layer]
        self.qkv, self.o = _projection(sa.q, sa.k, sa.v), _projection(sa.o)
        self.cross_q, self.cross_kv, self.cross_o = _projection(ca.q), _projection(ca.k, ca.v), _projection(ca.o)
        self.gated = hasattr(ff, "wi_0")
        self.wi = _projection(ff.wi_0, ff.wi_1) if self.gated else _projection(ff.wi)
        self.wo, self.act = _projection(ff.wo), _activation(ff.act)


class GreedyDecoder:
    """Greedy search for a T5ForConditionalGeneration in eval mode (fp32, or int8 from torch_t5.int8).

    Built once per model; holds views of its weights (fused copies of the small projections).
    Not thread safe: one decoder per worker thread.
    """

    def __init__(self, model: nn.Module):
        config = model.config
        if model.training:
            raise ValueError("GreedyDecoder needs a model in eval mode (dropout off)")
        # the parts, not the model: decoder_for's weak cache must not keep a dropped model alive
        self.encoder, self.embed = model.encoder, model.shared
        self.config = config
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.layers = [_Layer(block) for block in model.decoder.block]
        self.final_norm = (model.decoder.final_layer_norm.weight, model.decoder.final_layer_norm.variance_epsilon)
        self.head = model.lm_head.matmul_2d if isinstance(model.lm_head, Int8Linear) else model.lm_head
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
        self.eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else config.pad_token_id
        self.start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else \
            config.decoder_start_token_id
        self.bias_table = model.decoder.block[0].layer[0].SelfAttention
        self._bias = torch.empty(0)

    def _position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, length, length) decoder self-attention bias, grown on demand and kept."""
        if self._bias.shape[-1] < length:
            self._bias = self.bias_table.compute_bias(length, length)
        return self._bias

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, min_new_tokens: int = 0,
                 on_token: Optional[Callable[[torch.Tensor], bool]] = None) -> torch.Tensor:
        """(batch, 1 + generated) token ids, the decoder start token first, rows that ended padded with
        pad_token_id: model.generate's output. EOS cannot be chosen before min_new_tokens tokens.
        on_token(next_ids) is called after each step; returning False stops (streaming, cancel)."""
        tokens = [torch.full((input_ids.shape[0],), self.start, dtype=torch.long)]
        for next_ids in self.steps(input_ids, attention_mask, max_new_tokens, min_new_tokens):
            tokens.append(next_ids)
            if on_token is not None and on_token(next_ids) is False:
                break
        return torch.stack(tokens, dim=1)

    @torch.inference_mode()
    def steps(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              max_new_tokens: int = 64, min_new_tokens: int = 0) -> Iterator[torch.Tensor]:
        """Yield the (batch,) next token ids step by step until every row has produced EOS."""
        config = self.config
        B, H, D = input_ids.shape[0], self.heads, self.d_kv
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        memory = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        S, d_model = memory.shape[1], memory.shape[2]
        # additive padding mask over the encoder positions (T5's cross-attention has no position bias)
        cross_bias = torch.zeros((B, 1, 1, S), dtype=memory.dtype)
        cross_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(memory.dtype).min)
        flat = memory.reshape(B * S, d_model)
        cross_kv = [layer.cross_kv(flat).view(B, S, 2, H, D).permute(2, 0, 3, 1, 4) for layer in self.layers]
        # positions > t are never read (attention slices :t + 1), so the buffer needs no zero fill
        cache = torch.empty((len(self.layers), 2, B, H, max_new_tokens, D), dtype=memory.dtype)
        self_bias = self._position_bias(max_new_tokens)

        eos, pad = self.eos, self.pad
        ids = torch.full((B,), self.start, dtype=torch.long)
        unfinished = torch.ones(B, dtype=torch.bool)
        scale = decoder_output_scale(config)
        for t in range(max_new_tokens):
            h = self.embed(ids)  # (B, d_model): one position per row
            bias = self_bias[:, :, t:t + 1, :t + 1]
            for layer, (keys, values), (cross_k, cross_v) in zip(self.layers, cache, cross_kv):
                (w0, eps0), (w1, eps1), (w2, eps2) = layer.norms
                q, k, v = layer.qkv(_rms_norm(h, w0, eps0)).view(B, 3, H, 1, D).unbind(1)
                keys[:, :, t:t + 1] = k
                values[:, :, t:t + 1] = v
                attn = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1], attn_mask=bias,
                                                      scale=1.0)
                h = h + layer.o(attn.view(B, H * D))
                q = layer.cross_q(_rms_norm(h, w1, eps1)).view(B, H, 1, D)
                attn = F.scaled_dot_product_attention(q, cross_k, cross_v, attn_mask=cross_bias, scale=1.0)
                h = h + layer.cross_o(attn.view(B, H * D))
                x = layer.wi(_rms_norm(h, w2, eps2))
                if layer.gated:
                    gate, linear = x.chunk(2, dim=1)
                    x = layer.act(gate) * linear
                else:
                    x = layer.act(x)
                h = h + layer.wo(x)
            h = _rms_norm(h, *self.final_norm)
            if scale is not None:  # T5 v1.0 (tied head)
                h = h * scale
            logits = self.head(h)
            if t < min_new_tokens:
                logits[:, eos] = float("-inf")
            ids = torch.where(unfinished, logits.argmax(dim=-1), pad)
            yield ids
            unfinished &= ~torch.isin(ids, eos)
            if not unfinished.any():
                return
