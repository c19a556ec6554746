"""Prompt-lookup speculative decoding: exact greedy decoding in fewer decoder passes, for any engine.

Subqueries mostly copy spans of the question ("Nikola Tesla lifespan|Milutin Milankovic lifespan"). After
each pass the last generated tokens are looked up in the input ids; the tokens that followed them there
are the draft. One decoder pass over [last token] + draft gives the model's own choice at every one of
those positions; the draft is kept up to its first disagreement, then the model's token there. Every token
kept is the argmax the model computes after exactly the tokens before it, so the output is plain greedy's,
token for token; a pass yields 1 + (accepted draft tokens) tokens instead of one.

An engine provides two functions over its own cache (onnx_t5.runtime.OnnxT5.speculative is one):
    decode(tokens, t) -> (len(tokens), vocab) logits for positions t, t + 1, ... (the cache grows by len(tokens))
    truncate(length)  -> the cache keeps its first `length` positions (the rejected drafts' K/V are dropped)
"""

from typing import Callable, Optional, Sequence

import numpy as np

NGRAM_MAX = 3  # the longest suffix of the output looked up in the input
NGRAM_MIN = 1


def propose(source: Sequence[int], output: Sequence[int], k: int, keys: Optional[Sequence] = None,
            ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to k draft tokens: what followed the latest earlier occurrence of the longest suffix of `output`
    (ngram_max .. ngram_min tokens), looked up in the output itself (a repeated pattern: "X Area|Y Area"),
    then in `source`. `keys[id]` (optional) is what ids are compared by: with the pieces' text without
    SentencePiece's word-start mark, "Philippine" after a "|" matches "▁Philippine" in the question."""
    if k <= 0 or not output:
        return []
    key = (lambda ids: list(ids)) if keys is None else (lambda ids: [keys[i] if i < len(keys) else i for i in ids])
    for n in range(min(ngram_max, len(output)), ngram_min - 1, -1):
        suffix = key(output[-n:])
        for seq in (list(output), list(source)):
            hay = key(seq)
            last = len(seq) - n - 1  # a match must be followed by a token (in the output: before the suffix)
            for start in range(last, -1, -1):
                if hay[start: start + n] == suffix:
                    return seq[start + n: start + n + k]
    return []


def piece_keys(tokenizer) -> list:
    """keys for propose(): each id's piece without the word-start mark "▁" (SentencePiece tokenizers)."""
    keys = [None] * len(tokenizer)
    for piece, i in tokenizer.get_vocab().items():
        if i < len(keys):
            keys[i] = piece.lstrip("▁") or piece
    return keys


def greedy(decode: Callable[[list[int], int], np.ndarray], truncate: Callable[[int], None], source: Sequence[int],
           start: int, eos: Sequence[int], max_new_tokens: int, draft_tokens: int = 8,
           stats: Optional[dict] = None, proposer: Optional[Callable] = None, keys: Optional[Sequence] = None
           ) -> list[int]:
    """Greedy decoding of one row with drafts from `proposer(source, output, k)` (prompt lookup): [start,
    token 1, ...] up to EOS (included) or max_new_tokens, the same tokens as plain greedy whatever the drafts.
    `stats` gets "passes" and "tokens" added to it; `keys` go to propose()."""
    proposer = proposer or (lambda src, out, k: propose(src, out, k, keys))
    tokens, t, passes, eos = [start], 0, 0, set(eos)
    while len(tokens) - 1 < max_new_tokens:
        room = max_new_tokens - (len(tokens) - 1) - 1  # a pass yields the accepted drafts + one more token
        draft = list(proposer(source, tokens[1:], min(draft_tokens, room)))[:room]
        choice = decode([tokens[-1]] + draft, t).argmax(axis=-1).tolist()
        passes += 1
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choice[accepted] and draft[accepted] not in eos:
            accepted += 1
        new = draft[:accepted] + [choice[accepted]]
        t += 1 + accepted  # the cache holds the fed last token and the accepted drafts
        truncate(t)
        tokens += new
        if new[-1] in eos:
            break
    if stats is not None:
        stats["passes"] = stats.get("passes", 0) + passes
        stats["tokens"] = stats.get("tokens", 0) + len(tokens) - 1
    return tokens
