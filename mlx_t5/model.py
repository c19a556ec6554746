"""T5 / Flan-T5 in MLX, numerically the same model as transformers' T5ForConditionalGeneration.

Module attributes mirror the HF parameter names (`encoder.block.0.layer.0.SelfAttention.q.weight`, ...), so an
HF checkpoint loads after `sanitize` drops the embedding aliases, and what we save loads in transformers.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from reformulation.constants import decoder_output_scale

NEG_INF = -1e9  # additive mask value: finite so a fully masked row gives a uniform softmax, not NaN


@dataclass
class ModelArgs:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    quantization: Optional[dict] = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown config keys, kept so save() round-trips

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        # HF: "gated-gelu" -> gated, gelu_new (tanh); "relu" -> plain; "gated-silu" -> gated silu.
        # Gating is read from the name, never from the key's presence (a saved ReLU config has it too).
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {self.feed_forward_proj!r} "
                             f"(expected [gated-]{{{'|'.join(ACTIVATIONS)}}})")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in fields(cls)} - {"extra"}
        args = {k: v for k, v in config.items() if k in known}
        args["extra"] = {k: v for k, v in config.items() if k not in known}
        return cls(**args)


ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # exact erf form
    "gelu_new": nn.gelu_approx,  # tanh form: what HF's "gated-gelu" (Flan-T5, T5 v1.1) means
    "silu": nn.silu,
}


def relative_position_bucket(relative_position: mx.array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> mx.array:
    """T5's log-spaced buckets for (key - query) distances; same arithmetic as transformers (fp32 log)."""
    buckets = mx.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(mx.int32) * num_buckets
        distance = mx.abs(relative_position)
    else:
        distance = -mx.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # max(distance, 1) only avoids log(0); those positions take the exact branch anyway.
    log_ratio = mx.log(mx.maximum(distance, 1).astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(mx.int32)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(distance < max_exact, distance, large)


class KVCache:
    """One decoder layer's cache: self-attention K/V in a buffer grown in chunks (no copy of the whole
    history per token), and the cross-attention K/V computed once."""

    step = 64  # positions added per growth; reformulations are short

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0
        self.cross = None  # (keys, values) over the encoder output
        self.position_bias = None  # decoder bias table for this request, kept by layer 0's cache

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = (L + self.step - 1) // self.step * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = prev + L
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def reorder(self, indices: mx.array, cross: bool = True):
        """Beam search: pick the batch rows the surviving beams came from. cross=False keeps the
        cross-attention K/V as they are: beams of one input share them, so reordering is a wasted copy."""
        if self.keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]
        if cross and self.cross is not None:
            self.cross = (self.cross[0][indices], self.cross[1][indices])


@mx.custom_function
def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T (nn.Linear without bias), with a weight gradient in row-major layout."""
    return x @ weight.T


@linear.vjp
def _linear_vjp(primals, cotangent, output):
    # MLX's own vjp gives the weight gradient as (x^T dy)^T, a transposed view: the gradient norm and
    # the optimizer then read every gradient column-wise (on CPU ~35% of a flan-t5-small training step).
    # dy^T x is the same matrix, produced row-major by the matmul itself.
    x, weight = primals
    dy = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    return dy @ weight, dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return linear(x, self.weight)


class Dropout(nn.Dropout):
    """nn.Dropout with its rate readable (MLX keeps only a private 1 - p): for attention's fused path, the
    trainer's keyed dropout and adapter_config.json."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.p = p


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, has_relative_bias: bool):
        super().__init__()
        inner = args.num_heads * args.d_kv
        self.num_heads, self.d_kv = args.num_heads, args.d_kv
        self.q = Linear(args.d_model, inner, bias=False)
        self.k = Linear(args.d_model, inner, bias=False)
        self.v = Linear(args.d_model, inner, bias=False)
        self.o = Linear(inner, args.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets, args.num_heads)
        self.dropout = Dropout(args.dropout_rate)

    def _heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, memory: Optional[mx.array], bias: mx.array,
                 cache: Optional[KVCache] = None) -> mx.array:
        """Self-attention when memory is None, else cross-attention over memory (K/V cached once)."""
        B, L, _ = x.shape
        q = self._heads(self.q(x))
        if memory is None:
            k, v = self._heads(self.k(x)), self._heads(self.v(x))
            if cache is not None:
                k, v = cache.update(k, v)
        elif cache is not None and cache.cross is not None:
            k, v = cache.cross
        else:
            k, v = self._heads(self.k(memory)), self._heads(self.v(memory))
            if cache is not None:
                cache.cross = (k, v)

        bias = None if bias is None else bias.astype(q.dtype)
        if self.training and self.dropout.p > 0:
            # dropout on the attention probabilities needs the unfused path. T5 has no 1/sqrt(d) scaling.
            scores = (q @ k.transpose(0, 1, 3, 2)).astype(mx.float32)
            scores = scores if bias is None else scores + bias
            probs = self.dropout(mx.softmax(scores, axis=-1).astype(q.dtype))
            out = probs @ v
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DenseReluDense(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.is_gated:
            self.wi_0 = Linear(args.d_model, args.d_ff, bias=False)
            self.wi_1 = Linear(args.d_model, args.d_ff, bias=False)
        else:
            self.wi = Linear(args.d_model, args.d_ff, bias=False)
        self.wo = Linear(args.d_ff, args.d_model, bias=False)
        self.act = ACTIVATIONS[args.activation]
        self.gated = args.is_gated
        self.dropout = Dropout(args.dropout_rate)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class SelfAttentionLayer(nn.Module):
    def __init__(self, args: ModelArgs, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(args, has_relative_bias)
        self.layer_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.dropout = Dropout(args.dropout_rate)

    def __call__(self, x, bias, cache=None):
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), None, bias, cache))


class CrossAttentionLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.EncDecAttention = Attention(args, has_relative_bias=False)
        self.layer_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.dropout = Dropout(args.dropout_rate)

    def __call__(self, x, memory, bias, cache=None):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), memory, bias, cache))


class FeedForwardLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.DenseReluDense = DenseReluDense(args)
        self.layer_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.dropout = Dropout(args.dropout_rate)

    def __call__(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = [SelfAttentionLayer(args, has_relative_bias)]
        if is_decoder:
            self.layer.append(CrossAttentionLayer(args))
        self.layer.append(FeedForwardLayer(args))

    def __call__(self, x, self_bias, memory=None, cross_bias=None, cache=None):
        x = self.layer[0](x, self_bias, cache)
        if self.is_decoder:
            x = self.layer[1](x, memory, cross_bias, cache)
        return self.layer[-1](x)


class Stack(nn.Module):
    """Encoder or decoder. Only block 0 owns a relative-bias table; its bias is shared by every block."""

    def __init__(self, args: ModelArgs, is_decoder: bool):
        super().__init__()
        n = args.num_decoder_layers if is_decoder else args.num_layers
        self.is_decoder = is_decoder
        self.num_buckets = args.relative_attention_num_buckets
        self.max_distance = args.relative_attention_max_distance
        self.block = [Block(args, is_decoder, has_relative_bias=i == 0) for i in range(n)]
        self.final_layer_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.dropout = Dropout(args.dropout_rate)

    def position_bias(self, query_length: int, key_length: int, offset: int = 0) -> mx.array:
        """(1, heads, query_length, key_length); decoder queries start at `offset` (the cached length)."""
        context = mx.arange(offset, offset + query_length)[:, None]
        memory = mx.arange(key_length)[None, :]
        buckets = relative_position_bucket(memory - context, not self.is_decoder, self.num_buckets,
                                           self.max_distance)
        values = self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)
        return values.transpose(2, 0, 1)[None]

    def causal_bias(self, length: int) -> mx.array:
        """Decoder self-attention bias for `length` positions: relative positions + causal mask."""
        causal = mx.arange(length)[None, :] > mx.arange(length)[:, None]
        return self.position_bias(length, length) + mx.where(causal, NEG_INF, 0.0)

    def cached_causal_bias(self, cache: list, offset: int, length: int) -> mx.array:
        """The rows for queries offset..offset+length of a table computed once per request (kept in
        cache[0]), instead of recomputing buckets on every decode step."""
        table = cache[0].position_bias
        if table is None or table.shape[-1] < offset + length:
            size = (offset + length + KVCache.step - 1) // KVCache.step * KVCache.step
            table = cache[0].position_bias = self.causal_bias(size)
        return table[:, :, offset:offset + length, :offset + length]

    def __call__(self, x, mask=None, memory=None, memory_mask=None, cache=None):
        """x: embedded inputs (B, L, D). mask: (B, L) 1/0 padding mask of the encoder input.
        memory/memory_mask: encoder output and its padding mask (decoder only). cache: list of KVCache."""
        L = x.shape[1]
        if self.is_decoder:
            if cache is not None:
                bias = self.cached_causal_bias(cache, cache[0].offset, L)
            else:
                bias = self.causal_bias(L)
            cross_bias = padding_bias(memory_mask)
        else:
            bias = self.position_bias(L, L)
            if mask is not None:
                bias = bias + padding_bias(mask)
            cross_bias = None
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, bias, memory, cross_bias, cache[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(x))


def padding_bias(mask: Optional[mx.array]) -> Optional[mx.array]:
    """(B, S) 1/0 mask -> additive (B, 1, 1, S) bias; None -> None (nothing padded)."""
    if mask is None:
        return None
    return mx.where(mask[:, None, None, :].astype(mx.bool_), 0.0, NEG_INF)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = Stack(args, is_decoder=False)
        self.decoder = Stack(args, is_decoder=True)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.d_model, args.vocab_size, bias=False)

    def encode(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None) -> mx.array:
        return self.encoder(self.shared(input_ids), mask=attention_mask)

    def decode(self, decoder_input_ids: mx.array, memory: mx.array, memory_mask: Optional[mx.array] = None,
               cache: Optional[list[KVCache]] = None) -> mx.array:
        """Logits for decoder_input_ids given the encoder output; with a cache, feed only the new tokens."""
        h = self.decoder(self.shared(decoder_input_ids), memory=memory, memory_mask=memory_mask, cache=cache)
        scale = decoder_output_scale(self.args)
        if scale is not None:
            # v1.0 rescales before the tied head; as_linear keeps working once the embedding is quantized.
            h = h * scale
            if isinstance(self.shared, nn.QuantizedEmbedding):
                return self.shared.as_linear(h)
            return linear(h, self.shared.weight)
        return self.lm_head(h)

    def __call__(self, input_ids: mx.array, decoder_input_ids: mx.array,
                 attention_mask: Optional[mx.array] = None) -> mx.array:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.decoder.block]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF checkpoint keys -> module keys: drop the aliases of `shared` and tensors T5 never uses."""
        drop = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                # present in the original T5 v1.0 checkpoints, ignored by transformers too
                "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
        if self.args.tie_word_embeddings:
            drop.add("lm_head.weight")
        return {k: v for k, v in weights.items() if k not in drop}


def _cross_entropy(logits: mx.array, targets: mx.array):
    """Per-token cross-entropy, and the exponentials and their sum (the softmax's parts)."""
    shift = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    exp = mx.exp(logits - shift)
    total = exp.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (shift + mx.log(total) - picked).squeeze(-1), exp, total


@mx.custom_function
def token_cross_entropy(logits: mx.array, targets: mx.array):
    """Per-token cross-entropy, and the softmax it computed (kept for the backward pass).

    The vjp reuses the forward's probabilities instead of exponentiating the (tokens x 32k vocabulary)
    logits a second time: exp is the costliest op of a T5 step on CPUs where MLX has no vectorised exp."""
    losses, exp, total = _cross_entropy(logits, targets)
    return losses, exp / total


@token_cross_entropy.vjp
def _token_cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    return cotangents[0][..., None] * (outputs[1] - onehot), mx.zeros_like(targets)


def token_loss(logits: mx.array, labels: mx.array, keep_softmax: bool = True) -> tuple[mx.array, mx.array]:
    """(sum of the float32 token cross-entropies over labels != -100, their count): padding never counts.

    keep_softmax: through token_cross_entropy (the training step's fast backward); False computes the same
    arithmetic without keeping a tokens x vocabulary softmax alive (evaluation; autodiff still works)."""
    valid = labels != -100
    logits, targets = logits.astype(mx.float32), mx.where(valid, labels, 0)
    losses = (token_cross_entropy if keep_softmax else _cross_entropy)(logits, targets)[0]
    return (losses * valid).sum(), valid.sum()


def summed_token_loss(model: Model, input_ids: mx.array, attention_mask: mx.array, decoder_input_ids: mx.array,
                      labels: mx.array) -> tuple[mx.array, mx.array]:
    return token_loss(model(input_ids, decoder_input_ids, attention_mask), labels)


def loss_fn(model: Model, input_ids: mx.array, attention_mask: mx.array, decoder_input_ids: mx.array,
            labels: mx.array) -> tuple[mx.array, mx.array]:
    """Mean token cross-entropy over labels != -100 (padding never counts), and the token count."""
    total, ntoks = token_loss(model(input_ids, decoder_input_ids, attention_mask), labels, keep_softmax=False)
    return total / mx.maximum(ntoks, 1), ntoks
