"""Speculative decoding with looked-up drafts: exact greedy decoding in fewer decoder passes, for any engine.

Subqueries mostly copy spans of the question and fill a few templates ("Nikola Tesla lifespan|Milutin
Milankovic lifespan"). Before each pass a draft of the next tokens is looked up, with no draft model:
  - prompt lookup: the answer's last 1-3 tokens found earlier in the answer itself ("X Area|Y Area") or in the
    question; what followed them there is drafted (the copied names);
  - the phrasebook: what most often followed those tokens in the training targets (the relation words,
    "▁Birth ▁Date", "▁Area ▁km 2", "|"), saved beside the model as drafts.json by both trainers.
The two are chained until the draft is long enough. One decoder pass over [last token] + draft gives the
model's own choice at every one of those positions; the draft is kept up to its first disagreement, then the
model's token there. Every token kept is the argmax the model computes after exactly the tokens before it,
so the output is plain greedy's, token for token, whatever the drafts; good drafts only make it faster.

An engine provides two functions over its own cache (onnx_t5.runtime.OnnxT5.speculative is one):
    decode(tokens, t) -> (len(tokens), vocab) logits for positions t, t + 1, ... (the cache grows by len(tokens))
    truncate(length)  -> the cache keeps its first `length` positions (the rejected drafts' K/V are dropped)
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .io import atomic_write_text

NGRAM_MAX = 3  # the longest context looked up
DRAFTS_FILE = "drafts.json"  # the phrasebook, in a model folder beside its tokenizer
PHRASE_LENGTH = 8  # tokens the phrasebook keeps after each context
DRAFT_TOKENS = 4  # draft length per pass: faster than 8 on both trained models (BENCHMARKS.md, "Speculative")


class Phrasebook:
    """For every context of 1..NGRAM_MAX tokens in the training targets, the continuation (up to PHRASE_LENGTH
    tokens) that most often followed it, counted over distinct targets. Token ids of the model's tokenizer."""

    def __init__(self, table: dict[tuple, tuple], vocab_size: int):
        self.table, self.vocab_size = table, vocab_size

    @classmethod
    def from_targets(cls, sequences: Iterable[Sequence[int]], start: int, vocab_size: int) -> "Phrasebook":
        """sequences: the training targets' token ids (EOS last); start: the decoder start token, which every
        answer begins with (so the first tokens have a context too)."""
        counts: dict[tuple, Counter] = defaultdict(Counter)
        for seq in sorted({tuple(s) for s in sequences}):
            seq = (start,) + seq
            for end in range(1, len(seq)):
                for n in range(1, min(NGRAM_MAX, end) + 1):
                    counts[seq[end - n:end]][seq[end:end + PHRASE_LENGTH]] += 1
        return cls({context: after.most_common(1)[0][0] for context, after in counts.items()}, vocab_size)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, start: int) -> "Phrasebook":
        return cls.from_targets(tokenizer(list(texts))["input_ids"], start, len(tokenizer))

    def next(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens after the longest context that ends `tokens` and is in the table."""
        for n in range(min(NGRAM_MAX, len(tokens)), 0, -1):
            after = self.table.get(tuple(tokens[-n:]))
            if after:
                return list(after[:k])
        return []

    def save(self, folder) -> Path:
        entries = [[list(context), list(after)] for context, after in self.table.items()]
        doc = {"format": "phrasebook", "vocab_size": self.vocab_size, "entries": entries}
        return atomic_write_text(Path(folder) / DRAFTS_FILE, json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, folder, vocab_size: Optional[int] = None) -> Optional["Phrasebook"]:
        """The phrasebook saved in `folder`, or None if there is none. A file for another vocabulary (or not a
        phrasebook) raises ValueError naming the file."""
        path = Path(folder) / DRAFTS_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != "phrasebook":
                raise ValueError("not a phrasebook")
            table = {tuple(context): tuple(after) for context, after in doc["entries"]}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a readable phrasebook ({err})") from None
        if vocab_size is not None and doc.get("vocab_size") != vocab_size:
            raise ValueError(f"{path}: made for a vocabulary of {doc.get('vocab_size')} tokens, the tokenizer has "
                             f"{vocab_size}")
        return cls(table, doc["vocab_size"])


def piece_keys(tokenizer) -> list:
    """What prompt lookup compares ids by: each id's piece without the word-start mark "▁" (SentencePiece), so
    "Philippine" after a "|" matches "▁Philippine" in the question."""
    keys = [None] * len(tokenizer)
    for piece, i in tokenizer.get_vocab().items():
        if i < len(keys):
            keys[i] = piece.lstrip("▁") or piece
    return keys


class Drafts:
    """How a loaded model drafts: its piece keys and its phrasebook (either may be None)."""

    def __init__(self, keys: Optional[Sequence] = None, phrasebook: Optional[Phrasebook] = None):
        self.keys, self.phrasebook = keys, phrasebook

    @classmethod
    def for_model(cls, tokenizer, folder=None) -> "Drafts":
        """Keys from the tokenizer; the phrasebook saved in `folder` if there is one."""
        return cls(piece_keys(tokenizer), Phrasebook.load(folder, len(tokenizer)) if folder else None)

    def row(self, source: Sequence[int]) -> "Lookup":
        return Lookup(source, self.keys, self.phrasebook)


class Lookup:
    """The drafter of one row: `lookup(tokens, k)` -> up to k draft tokens after `tokens` (the answer so far,
    decoder start first). Indexes the question once and the answer as it grows (each n-gram -> where its latest
    occurrence ends), so a draft costs a few dict lookups."""

    def __init__(self, source: Sequence[int], keys: Optional[Sequence] = None,
                 phrasebook: Optional[Phrasebook] = None):
        self.keys, self.phrasebook = keys, phrasebook
        self.source = list(source)
        self.source_index = self._index({}, self._keyed(self.source), 1)
        self.tokens: list[int] = []
        self.output_keys: list = []
        self.output_index: dict = {}

    def _keyed(self, ids: Sequence[int]) -> list:
        keys = self.keys
        if keys is None:
            return list(ids)
        return [keys[i] if i < len(keys) else i for i in ids]

    @staticmethod
    def _index(index: dict, keyed: list, first_end: int) -> dict:
        # n-grams that a token follows (ending before the last position), later occurrences overwrite earlier
        for end in range(max(first_end, 1), len(keyed)):
            for n in range(1, min(NGRAM_MAX, end) + 1):
                index[tuple(keyed[end - n:end])] = end
        return index

    def _grow(self, tokens: Sequence[int]) -> None:
        old = len(self.tokens)
        if tokens[:old] != self.tokens:  # not a continuation (a new answer): start over
            self.tokens, self.output_keys, self.output_index, old = [], [], {}, 0
        self.tokens = list(tokens)
        self.output_keys += self._keyed(self.tokens[old:])
        self._index(self.output_index, self.output_keys, old)

    def _copy(self, context: list, k: int) -> list[int]:
        """What followed the longest suffix of `context` in the answer, else in the question."""
        keyed = self._keyed(context[-NGRAM_MAX:])
        for n in range(len(keyed), 0, -1):
            suffix = tuple(keyed[-n:])
            for index, ids in ((self.output_index, self.tokens), (self.source_index, self.source)):
                end = index.get(suffix)
                if end is not None:
                    return ids[end:end + k]
        return []

    def __call__(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not tokens:
            return []
        self._grow(tokens)
        draft: list[int] = []
        while len(draft) < k:  # chained: a copied name, then the phrase after it, then the next name ...
            context = self.tokens + draft
            more = self._copy(context, k - len(draft)) or \
                (self.phrasebook.next(context, k - len(draft)) if self.phrasebook else [])
            if not more:
                break
            draft += more
        return draft[:k]


def greedy(decode: Callable[[list[int], int], np.ndarray], truncate: Callable[[int], None], start: int,
           eos: Sequence[int], max_new_tokens: int, drafter: Callable[[list[int], int], Sequence[int]],
           draft_tokens: int = DRAFT_TOKENS, stats: Optional[dict] = None) -> list[int]:
    """Greedy decoding of one row with drafts from `drafter(tokens, k)` (a Lookup): [start, token 1, ...] up to
    EOS (included) or max_new_tokens, the same tokens as plain greedy whatever the drafts. `stats` gets
    "passes" and "tokens" added to it."""
    tokens, t, passes, eos = [start], 0, 0, set(eos)
    while len(tokens) - 1 < max_new_tokens:
        room = max_new_tokens - (len(tokens) - 1) - 1  # a pass yields the accepted drafts + one more token
        draft = list(drafter(tokens, min(draft_tokens, room)))[:room]
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
