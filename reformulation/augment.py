"""Entity-swap augmentation: training pairs that can't be memorised, only copied.

A target mostly copies spans of its query ("Who lived longer, Nikola Tesla or Milutin Milankovic?" ->
"Nikola Tesla lifespan|Milutin Milankovic lifespan"). A model trained from scratch on 2.5k distinct targets
memorises them and, on a test question about unseen entities, answers with training entities. Replacing each
copied span, consistently in the query and in the target, by another string (an invented name, or a span
of another *training* row) keeps the pattern and changes what must be copied: the only way to get such a
row right is to copy from the input.

Nothing from a held-out split is ever used: the replacement pool comes from the rows being augmented.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from dataclasses import replace
from typing import Callable, Iterable, Sequence

from .data import Example

_WORD = re.compile(r"\S+")
_TRIM = ".,;:!?\"'()[]{}"   # punctuation a query glues to a span ("Gore?") that the target doesn't copy
_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "sh", "st", "t", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "k", "m", "x", "nd", "rt"]


def _entity_like(span: str) -> bool:
    """A span worth swapping: a name, which starts with a capital letter ("Nikola Tesla", "State Highway 1").
    Numbers and units ("1990", "km2") stay: a swapped one would mostly make nonsense."""
    return span[0].isupper()


def copied_spans(query: str, subqueries: Sequence[str]) -> list[str]:
    """The longest word runs of each subquery that the query contains verbatim (at word boundaries) and that
    look like names, longest first."""
    spans = set()
    for sub in subqueries:
        words = [w.strip(_TRIM) for w in _WORD.findall(sub)]
        i = 0
        while i < len(words):
            best = None
            for j in range(len(words), i, -1):   # the longest run starting at word i
                run = " ".join(w for w in words[i:j] if w)
                if run and _contains(query, run):
                    best = (j, run)
                    break
            if best is None:
                i += 1
                continue
            j, run = best
            if _entity_like(run):
                spans.add(run)
            i = j
    return sorted(spans, key=lambda s: (-len(s), s))


@functools.lru_cache(maxsize=1 << 16)
def _boundary(span: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(span) + r"(?!\w)")


def _contains(text: str, span: str) -> bool:
    return _boundary(span).search(text) is not None


def invented_name(rng: random.Random, words: int) -> str:
    """A pronounceable name that is in no data set ("Brelk Vousand")."""
    def word():
        syllables = rng.choice((1, 2, 2, 3))
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(syllables)).capitalize()
    return " ".join(word() for _ in range(words))


class LetterModel:
    """Invented names spelled like the training names: a character model of order 3 over the words of the
    swappable spans ("Paleutian", "Chatute", "Murretar"). The syllable generator's names all share a few dozen
    onsets and codas; real unseen names ("Milankovic", "Otorohanga") do not, and a model that only learned to copy
    those garbles them. Words the pool holds are never produced, so every name is new."""

    ORDER = 3

    def __init__(self, spans: Iterable[str]):
        words = sorted({w for span in spans for w in span.split() if w.isalpha()})
        follow = collections.defaultdict(collections.Counter)
        for word in words:
            padded = "^" * self.ORDER + word.lower() + "$"
            for i in range(self.ORDER, len(padded)):
                follow[padded[i - self.ORDER:i]][padded[i]] += 1
        self.table = {ctx: (list(n), list(n.values())) for ctx, n in follow.items()}
        self.known = {w.lower() for w in words}

    def word(self, rng: random.Random) -> str:
        # a pool of few (or no) names may spell nothing new: then a syllable name
        for _ in range(100 if self.table else 0):
            ctx, out = "^" * self.ORDER, ""
            while True:
                ch = rng.choices(*self.table[ctx])[0]
                if ch == "$":
                    break
                out += ch
                ctx = ctx[1:] + ch
            if 3 <= len(out) <= 14 and out not in self.known:
                return out.capitalize()
        return invented_name(rng, 1)

    def name(self, rng: random.Random, words: int) -> str:
        return " ".join(self.word(rng) for _ in range(words))


def swap(example: Example, mapping: dict[str, str]) -> Example:
    """The example with every span in `mapping` replaced, longest first, in the query and every subquery."""
    if not mapping:
        return example
    # one pass over all spans, longest first: a replacement is never itself replaced again
    pattern = re.compile("|".join(_boundary(s).pattern for s in sorted(mapping, key=len, reverse=True)))

    def apply(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(0)], text)

    return replace(example, query=apply(example.query), subqueries=tuple(apply(s) for s in example.subqueries))


NAMES = ("syllables", "letters")


def augment(examples: Iterable[Example], copies: int, seed: int = 0, invented: float = 0.5,
            names: str = "syllables") -> list[Example]:
    """`copies` entity-swapped variants of every example that copies a span from its query (the originals are
    not included). Each swapped name gets an invented one with probability `invented`, else a name of another of
    these examples. Invented names: "syllables" (invented_name) or "letters" (a LetterModel of these examples'
    names). Deterministic for a seed."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    if not 0 <= invented <= 1:
        raise ValueError(f"invented must be in [0, 1], got {invented}")
    if names not in NAMES:
        raise ValueError(f"names must be one of {', '.join(NAMES)}, got {names!r}")
    examples = list(examples)
    found = [copied_spans(e.query, e.subqueries) for e in examples]
    pool = sorted({span for spans in found for span in spans})
    rng = random.Random(seed)
    invent: Callable[[random.Random, int], str] = LetterModel(pool).name if names == "letters" else invented_name
    out = []
    for example, spans in zip(examples, found):
        if not spans:
            continue
        for _ in range(copies):
            mapping = {span: invent(rng, len(span.split())) if rng.random() < invented else rng.choice(pool)
                       for span in spans}
            out.append(swap(example, mapping))
    return out
