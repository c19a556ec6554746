"""Generation for the MLX T5: greedy, sampling, beam search, streaming.

The encoder runs once per request; the decoder then takes one token per step through the per-layer
KV cache (the cross-attention K/V are computed on the first step and kept). Greedy and beam search
give the same tokens as transformers' `generate` (beam search follows its `_beam_search`: 2 x beams
candidates from fp32 log-softmax scores, finished-hypothesis bookkeeping, length penalty and early
stopping), so the MLX and PyTorch paths agree on a checkpoint.
"""

from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from reformulation.beam import BeamSearch
from reformulation.data import format_source, text_pieces

from .model import Model



def _check_options(max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences,
                   temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if num_beams > 1:
        if temperature > 0:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    elif temperature == 0 and num_return_sequences > 1:
        raise ValueError("greedy decoding returns one sequence per input: use num_beams >= num_return_sequences "
                         "or temperature > 0 for several")


def _eos_ids(model: Model) -> list[int]:
    eos = model.args.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)  # scores are compared across beams: fp32 as transformers does
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _make_next_token(temperature: float, top_k: int, top_p: float, vocab_size: int):
    """logits (B, V) fp32 -> token ids (B,). Sampling scales by temperature before top-k / top-p (the
    transformers order, so both paths mean the same thing) and then uses mlx-lm's sampler."""
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    top_k = 0 if top_k >= vocab_size else top_k
    sampler = make_sampler(1.0, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k)
    return lambda logits: sampler(_log_softmax(logits / temperature))


def _iterate(model: Model, input_ids: mx.array, attention_mask: mx.array, max_new_tokens: int,
             next_token, ignore_eos: bool) -> Iterator[np.ndarray]:
    """Greedy / sampling: yield each step's tokens (B,) until every row has hit EOS or max_new_tokens.

    Finished rows get pad tokens. Step n+1 is queued (async_eval) before step n's tokens are read on
    the host, so building the next graph overlaps the current compute: one host sync per step.
    """
    args = model.args
    eos, pad = mx.array(_eos_ids(model)), args.pad_token_id
    memory = model.encode(input_ids, attention_mask)
    cache = model.make_cache()
    eos_mask = None
    if ignore_eos:  # what transformers' min_new_tokens does: EOS can never be chosen
        eos_mask = mx.zeros((args.vocab_size,), mx.float32)
        eos_mask[eos] = -mx.inf

    def step(tokens, finished):
        logits = model.decode(tokens[:, None], memory, attention_mask, cache)[:, -1].astype(mx.float32)
        if eos_mask is not None:
            logits = logits + eos_mask
        tokens = mx.where(finished, pad, next_token(logits))
        return tokens, finished | (tokens[:, None] == eos).any(axis=-1)

    B = input_ids.shape[0]
    tokens, finished = step(mx.full((B,), args.decoder_start_token_id, mx.int32), mx.zeros((B,), mx.bool_))
    mx.async_eval(tokens, finished)
    for n in range(max_new_tokens):
        if n + 1 < max_new_tokens:
            next_tokens, next_finished = step(tokens, finished)
            mx.async_eval(next_tokens, next_finished)
        yield np.array(tokens)
        if np.array(finished).all():
            break
        if n + 1 < max_new_tokens:
            tokens, finished = next_tokens, next_finished


def speculative_tokens(model: Model, input_ids, attention_mask=None, max_new_tokens: int = 64,
                       draft_tokens: Optional[int] = None, drafts=None, stats: Optional[dict] = None
                       ) -> list[list[int]]:
    """Greedy decoding with looked-up drafts (reformulation.speculative.greedy; drafts: a speculative.Drafts,
    default prompt lookup by id), row by row: each row's new tokens (EOS last where produced), the same as plain
    greedy's, in fewer decoder passes. The decoder takes several positions against the KV cache (causal among
    themselves, relative positions from the cached length); rejected drafts are dropped by moving each layer's
    cache offset back."""
    from reformulation.speculative import DRAFT_TOKENS, Drafts, greedy

    drafts = drafts or Drafts()

    args = model.args
    input_ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    rows = []
    for ids, keep in zip(input_ids, mask == 1):
        source = ids[keep].tolist()
        memory = model.encode(mx.array([source]))
        cache = model.make_cache()

        def decode(tokens: list[int], t: int) -> np.ndarray:
            assert cache[0].offset == t, (cache[0].offset, t)
            return np.array(model.decode(mx.array([tokens]), memory, None, cache)[0].astype(mx.float32))

        def truncate(length: int) -> None:
            for layer in cache:
                layer.offset = min(layer.offset, length)

        out = greedy(decode, truncate, args.decoder_start_token_id, _eos_ids(model), max_new_tokens,
                     drafts.row(source), draft_tokens or DRAFT_TOKENS, stats)
        rows.append(out[1:])
    return rows


def _trim(rows: np.ndarray, eos_ids: Sequence[int]) -> list[list[int]]:
    """(B, T) step tokens -> per row, the tokens through its first EOS (the pad after it dropped)."""
    out = []
    for row in rows.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:end])
    return out


def _beam_search(model: Model, input_ids: mx.array, attention_mask: mx.array, max_new_tokens: int,
                 num_beams: int, length_penalty: float, early_stopping, num_return_sequences: int,
                 ignore_eos: bool) -> list[list[int]]:
    """transformers' `_beam_search`, vectorised over (batch x beams) in MLX; the finished-hypothesis
    bookkeeping is reformulation.beam's, on the host (a few (B, 2 x beams) arrays per step)."""
    args = model.args
    eos_ids = _eos_ids(model)
    B, nb, V = input_ids.shape[0], num_beams, args.vocab_size
    search = BeamSearch(B, nb, max_new_tokens, eos_ids, length_penalty, early_stopping)
    K = search.candidates

    memory = mx.repeat(model.encode(input_ids, attention_mask), nb, axis=0)
    memory_mask = mx.repeat(attention_mask, nb, axis=0)
    cache = model.make_cache()
    eos_mask = None
    if ignore_eos:
        eos_mask = mx.zeros((V,), mx.float32)
        eos_mask[mx.array(eos_ids)] = -mx.inf
    tokens = mx.full((B * nb,), args.decoder_start_token_id, mx.int32)

    for t in range(max_new_tokens):
        logp = _log_softmax(model.decode(tokens[:, None], memory, memory_mask, cache)[:, -1])
        if eos_mask is not None:
            logp = logp + eos_mask
        scores = (logp + mx.array(search.running_scores).reshape(B * nb, 1)).reshape(B, nb * V)
        top = mx.argpartition(-scores, K - 1, axis=-1)[:, :K]
        vals = mx.take_along_axis(scores, top, axis=-1)
        mx.eval(vals, top)
        step = search.step(t, np.array(vals), np.array(top), V)
        if step is None:
            break
        source, next_tokens = step
        source = mx.array(source.astype(np.int32))
        for c in cache:
            c.reorder(source, cross=False)  # beams never move between inputs
        tokens = mx.array(next_tokens.astype(np.int32))

    return search.sequences(num_return_sequences)


def generate_tokens(model: Model, input_ids, attention_mask=None, *, max_new_tokens: int = 64, num_beams: int = 1,
                    length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                    num_return_sequences: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: Optional[int] = None, ignore_eos: bool = False, speculative: bool = False,
                    drafts=None) -> list[list[int]]:
    """Generate token ids for a batch of already tokenized inputs.

    Args:
        input_ids: (B, S) encoder token ids, right-padded (mx/numpy array or nested lists).
        attention_mask: (B, S) 1 for tokens, 0 for padding; None = no padding.
        max_new_tokens: most tokens generated per sequence (EOS included).
        num_beams: 1 = greedy or sampling; > 1 = beam search, token-identical to transformers.
        length_penalty, early_stopping: beam search only, as in transformers (score / length ** penalty;
            True, False or "never").
        num_return_sequences: per input; <= num_beams for beam search, or independent samples.
        temperature: 0 = greedy; > 0 samples, after top_k (0 = off) and top_p (1 = off) filtering.
        seed: seeds MLX's global random state for reproducible sampling.
        ignore_eos: EOS is never produced (its logit is masked, like transformers' min_new_tokens),
            so every sequence has exactly max_new_tokens tokens: for benchmarks.
        speculative: greedy decoding with looked-up drafts (speculative_tokens; drafts: speculative.Drafts),
            the same tokens in fewer decoder passes; greedy without ignore_eos only.

    Returns:
        B * num_return_sequences lists (input-major): the new tokens, ending with EOS where the model
        produced one; nothing after it (no decoder start token, no padding).
    """
    _check_options(max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences,
                   temperature, top_k, top_p)
    if not isinstance(input_ids, mx.array):
        try:
            input_ids = mx.array(np.asarray(input_ids, dtype=np.int32))
        except ValueError:
            raise ValueError("input_ids must be a rectangular (batch, length) array of token ids: right-pad the "
                             "rows and pass attention_mask") from None
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, length) array with length >= 1, got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = mx.ones(input_ids.shape, mx.int32)
    elif not isinstance(attention_mask, mx.array):
        attention_mask = mx.array(np.asarray(attention_mask, dtype=np.int32))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if input_ids.shape[0] == 0:
        return []

    if num_beams > 1:
        return _beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                            early_stopping, num_return_sequences, ignore_eos)
    if speculative and temperature == 0 and not ignore_eos:
        return speculative_tokens(model, np.array(input_ids), np.array(attention_mask), max_new_tokens,
                                  drafts=drafts)
    if seed is not None:
        mx.random.seed(seed)
    if num_return_sequences > 1:  # independent samples: each input repeated, input-major like transformers
        input_ids = mx.repeat(input_ids, num_return_sequences, axis=0)
        attention_mask = mx.repeat(attention_mask, num_return_sequences, axis=0)
    next_token = _make_next_token(temperature, top_k, top_p, model.args.vocab_size)
    steps = list(_iterate(model, input_ids, attention_mask, max_new_tokens, next_token, ignore_eos))
    return _trim(np.stack(steps, axis=1), _eos_ids(model))


def _decode(tokenizer, ids: list[int]) -> str:
    # no clean-up of spaces: it would rewrite text across token boundaries and break streaming
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _sources(queries, raw: bool) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings; wrap a single query as [query]")
    queries = list(queries)
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise TypeError(f"queries[{i}] must be a str, got {type(q).__name__}")
    return queries if raw else [format_source(q) for q in queries]


def generate(model: Model, tokenizer, queries: Sequence[str], *, raw: bool = False, max_new_tokens: int = 64,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
             num_return_sequences: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, ignore_eos: bool = False, batch_size: int = 32,
             speculative: bool = False, drafts=None) -> list[str]:
    """Reformulate queries: text in, generated text out.

    Each query goes through `reformulation.data.format_source` (the "reformulate: " prompt prefix and the
    same unicode normalisation as training) unless raw=True, which feeds the strings as they are.

    Args:
        queries: list of strings.
        max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, temperature, top_k,
            top_p, seed, ignore_eos: as in `generate_tokens`.
        batch_size: queries encoded and decoded together (padded to the longest of them).

    Returns:
        len(queries) * num_return_sequences strings, query-major, special tokens removed.
    """
    sources = _sources(queries, raw)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    options = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                   temperature=temperature, top_k=top_k, top_p=top_p)
    _check_options(**options)
    if seed is not None:  # once, not per batch: batches must not repeat each other's random draws
        mx.random.seed(seed)
    out = []
    for i in range(0, len(sources), batch_size):
        enc = tokenizer(sources[i:i + batch_size], padding=True, return_tensors="np")
        ids = generate_tokens(model, enc["input_ids"], enc["attention_mask"], ignore_eos=ignore_eos,
                              speculative=speculative, drafts=drafts, **options)
        out.extend(_decode(tokenizer, seq) for seq in ids)
    return out


def stream_generate(model: Model, tokenizer, query: str, *, raw: bool = False, max_new_tokens: int = 64,
                    num_beams: int = 1, length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                    num_return_sequences: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: Optional[int] = None) -> Iterator[str]:
    """Yield the reformulation of one query as text pieces, as the tokens are produced.

    Takes the options of `generate`, but decodes greedily or by sampling only (beam search knows its
    answer only at the end): num_beams and num_return_sequences must be 1. Each step decodes the whole
    prefix and yields the new suffix (reformulation.data.text_pieces), so SentencePiece word-start spaces
    come out right; the pieces join to what `generate` returns with the same options, stripped of
    surrounding whitespace. The prompt is built as in `generate`.
    """
    if num_beams != 1 or num_return_sequences != 1:
        raise ValueError("stream_generate decodes one sequence greedily or by sampling: num_beams and "
                         "num_return_sequences must be 1 (use generate for beam search)")
    _check_options(max_new_tokens, 1, length_penalty, early_stopping, 1, temperature, top_k, top_p)
    (source,) = _sources([query], raw)
    enc = tokenizer([source], return_tensors="np")
    if seed is not None:
        mx.random.seed(seed)
    eos_ids = _eos_ids(model)
    next_token = _make_next_token(temperature, top_k, top_p, model.args.vocab_size)

    def tokens():
        for step in _iterate(model, mx.array(enc["input_ids"]), mx.array(enc["attention_mask"]), max_new_tokens,
                             next_token, ignore_eos=False):
            yield int(step[0])
            if int(step[0]) in eos_ids:
                return

    yield from text_pieces(tokenizer, tokens())
