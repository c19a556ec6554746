"""Random-init transformers T5 models of the shapes the tests compare against (the oracle)."""

from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

# A padded batch of real-looking queries of very different lengths (one with a macron: normalisation).
QUERIES = [
    "Who lived longer, Nikola Tesla or Milutin Milankovic?",
    "capital of France",
    "Which came first: the invention of the telephone or the discovery of penicillin, and who was behind each?",
    "Māori population of New Zealand",
    "How tall is the Eiffel Tower?",
    "What do the founders of Apple, Microsoft and Google have in common?",
    "rain",
    "Compare the GDP of Japan and Germany in 2020",
    "Is the Amazon river longer than the Nile?",
]

VOCAB = 32128  # Flan-T5's embedding rows (tokenizer has 32,100 ids)

# name -> T5Config kwargs. Small enough for CI, covering every code path of the model.
SHAPES = {
    # flan-t5-small's real shape (../shared/tokenizers/flan-t5-small/config.json): gated-gelu, untied
    # head, 6 heads x 64 = 384 != d_model 512.
    "flan-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # T5 v1.0: ReLU FFN, tied embeddings, decoder output scaled by d_model**-0.5.
    "v1-relu-tied": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                         feed_forward_proj="relu", tie_word_embeddings=True),
    # odd head count, d_kv * heads != d_model.
    "odd-heads": dict(d_model=96, d_kv=20, d_ff=160, num_layers=2, num_decoder_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # encoder depth != decoder depth, small buckets / distance.
    "deep-decoder": dict(d_model=64, d_kv=16, d_ff=96, num_layers=1, num_decoder_layers=3, num_heads=4,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         relative_attention_num_buckets=16, relative_attention_max_distance=32),
}


def make_config(name: str, vocab_size: int = VOCAB, **overrides) -> T5Config:
    kwargs = dict(SHAPES[name], vocab_size=vocab_size, dropout_rate=0.0, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    kwargs.update(overrides)
    return T5Config(**kwargs)


def make_model(name: str, seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """A random model in eval mode; untied shapes get their own lm_head (transformers 5 ties otherwise)."""
    torch.manual_seed(seed)
    config = make_config(name, **overrides)
    tie = SHAPES[name]["tie_word_embeddings"] if "tie_word_embeddings" not in overrides else overrides["tie_word_embeddings"]
    model = T5ForConditionalGeneration(config)
    if not tie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
        model.config.tie_word_embeddings = False
    return model.eval()


def hf_generate(model, batch, **kwargs):
    # transformers 5.24's cache fails when the decoder is deeper than the encoder (IndexError)
    use_cache = model.config.num_decoder_layers <= model.config.num_layers
    with torch.inference_mode():
        return model.generate(**batch, do_sample=False, num_beams=1, use_cache=use_cache, **kwargs)


def ending_model(shape: str, int8: bool, batch):
    """A random model that ends some rows early: a token that some rows generate and others never
    does becomes EOS's twin (its head row, scaled up 5%), so EOS wins wherever that token would have."""
    model = make_model(shape, seed=1)
    if int8:
        from torch_t5.int8 import quantize_model

        quantize_model(model)
    generated = hf_generate(model, batch, max_new_tokens=24)[:, 1:]
    for token in generated.unique().tolist():
        rows = (generated == token).any(dim=1)
        if rows.any() and not rows.all():
            break
    eos, head = model.config.eos_token_id, model.lm_head
    with torch.no_grad():
        if int8:
            head.weight[eos], head.weight_scale[eos] = head.weight[token], head.weight_scale[token] * 1.05
        else:
            head.weight[eos] = head.weight[token] * 1.05
    return model


def save_model(name: str, path: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """Save a random model (and the real tokenizer, if given) as an HF folder; return the folder."""
    model = make_model(name, seed=seed, **overrides)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return Path(path)


def save_word_tokenizer(texts, path: Path):
    """A word-level tokenizer over `texts` (T5 ids: pad 0, </s> 1, <unk> 2; EOS appended), saved HF-style.

    With it a test model needs only a few hundred embedding rows instead of Flan-T5's 32,128, so training
    tests run in seconds; decoding joins words with spaces ("a | b"), which the metrics split on "|"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast
