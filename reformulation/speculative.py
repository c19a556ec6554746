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


def propose(source: Sequence[int], output: Sequence[int], k: int, ngram_max: int = NGRAM_MAX,
            ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to k draft tokens: what follows the latest occurrence in `source` of the longest suffix of `output`
    (ngram_max .. ngram_min tokens) that occurs there, when something follows it; else none."""
    if k <= 0:
        return []
    source = list(source)
    for n in range(min(ngram_max, len(output)), ngram_min - 1, -1):
        suffix = list(output[-n:])
        for start in range(len(source) - n - 1, -1, -1):  # latest first; a match must be followed by a token
            if source[start: start + n] == suffix:
                return source[start + n: start + n + k]
    return []


def greedy(decode: Callable[[list[int], int], np.ndarray], truncate: Callable[[int], None], source: Sequence[int],
           start: int, eos: Sequence[int], max_new_tokens: int, draft_tokens: int = 8,
           stats: Optional[dict] = None, proposer: Callable = propose) -> list[int]:
    """Greedy decoding of one row with drafts from `proposer(source, output, k)` (prompt lookup): [start,
    token 1, ...] up to EOS (included) or max_new_tokens, the same tokens as plain greedy whatever the drafts.
    `stats` gets "passes" and "tokens" added to it."""
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
