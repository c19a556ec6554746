"""Facts about T5 that several packages need, written once: the Flan-T5 shapes, the LoRA target names,
T5 v1.0's decoder-output rescale, the quantization group size. No MLX or torch here."""

# Flan-T5 (T5 v1.1) architecture: gated-gelu, untied head, vocab 32128 (32,100 ids padded to a multiple of 128).
FLAN_T5 = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
               layer_norm_epsilon=1e-6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# the sizes differ only in width and depth
FLAN_T5_SHAPES = {
    "small": dict(FLAN_T5, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "base": dict(FLAN_T5, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "large": dict(FLAN_T5, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
}

# LoRA wraps these HF T5 Linear names (attention, then FFN: wi for ReLU, wi_0 / wi_1 for gated), never lm_head.
LORA_ATTENTION = ("q", "k", "v", "o")
LORA_FFN = ("wi", "wi_0", "wi_1", "wo")
LORA_LINEARS = LORA_ATTENTION + LORA_FFN
LORA_TARGETS = {"qv": ("q", "v"), "all": LORA_LINEARS}
LORA_PARENTS = ("SelfAttention", "EncDecAttention", "DenseReluDense")  # the modules those Linears sit in

# weights per scale in MLX affine quantization (QLoRA base, `mlx_t5.quantize`, `convert hf-to-mlx`)
GROUP_SIZE = 64


def parse_lora_targets(spec, name: str = "lora_targets", paths: bool = False) -> tuple[str, ...]:
    """"qv" -> ("q", "v"); "all" -> every attention and FFN Linear; else a comma list (or a sequence) of names.

    Args:
        name: what the message calls the setting.
        paths: also accept full module paths ("encoder.block.0.layer.0.SelfAttention.q").

    Raises:
        ValueError naming the setting and the unknown names.
    """
    if isinstance(spec, str) and spec in LORA_TARGETS:
        return LORA_TARGETS[spec]
    names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip())
    bad = [n for n in names if n not in LORA_LINEARS and not (paths and "." in n)]
    if not names or bad:
        raise ValueError(f"{name} must be qv, all or a comma list of {', '.join(LORA_LINEARS)}"
                         f"{' (or full module paths)' if paths else ''}; got {spec!r}"
                         + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return names


def lora_targets_label(paths) -> str:
    """The shortest spec for the adapted module paths: "qv", "all" or a comma list of names."""
    names = {p.rsplit(".", 1)[-1] for p in paths}
    if names == {"q", "v"}:
        return "qv"
    if set(LORA_ATTENTION) <= names and "wo" in names and ("wi" in names or {"wi_0", "wi_1"} <= names):
        return "all"
    return ",".join(n for n in LORA_LINEARS if n in names)


def decoder_output_scale(config):
    """T5 v1.0 ties its head to the embedding and scales the decoder output by d_model**-0.5 before it;
    v1.1 / Flan (untied head) do neither: None.

    `config`: an mlx_t5 ModelArgs or a transformers T5Config. Transformers 5 keeps the saved choice in
    scale_decoder_outputs (its in-memory tie_word_embeddings reads True regardless).
    """
    if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
        return config.d_model ** -0.5
    return None
