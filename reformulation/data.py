"""Query-reformulation data: loading, validation, prompt format, splits and tokenisation.

One row is ``{"query": "...", "subqueries": "a|b|c"}``; ``dev.jsonl`` of the original project
joins subqueries with the two characters backslash + ``n`` instead of ``|``. Both load to the same
``Example``. ``format_source`` is the one prompt function used by the trainers and the servers.

Run ``python -m reformulation.data report PATH [PATH...]`` for a summary of a data file.
"""

import argparse
import hashlib
import json
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

PROMPT_PREFIX = "reformulate: "
SEPARATOR = "|"
LEGACY_SEPARATOR = "\\n"  # dev.jsonl: a literal backslash followed by "n"

_WHITESPACE = re.compile(r"\s+")
# Letters and dashes that have no decomposition and no piece in the T5 vocabulary (each one
# encodes as <unk>; U+2010 hyphen is in full.jsonl, and NFKC turns U+2011 into it).
_FOLD = str.maketrans({
    "\u2010": "-", "\u2012": "-", "\u2015": "-", "\u2212": "-",  # hyphen, figure dash, bar, minus
    "×": "x", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th",
})
_SPLIT = re.compile(r"[|\r\n]")


class DataError(ValueError):
    """A problem with a data file, reported as ``path:line: what``."""

    def __init__(self, path, line: int | None, what: str):
        self.path, self.line, self.what = str(path), line, what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {what}")


class DuplicateRowsWarning(UserWarning):
    """Exact duplicate rows were dropped while loading."""


@dataclass(frozen=True)
class Example:
    """One training pair. ``source`` always normalises the query, exactly as the servers do, so a
    model sees the same input in training and in serving; loading with ``normalize=False`` keeps
    ``query`` and the targets as stored."""

    query: str
    subqueries: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.subqueries, str):
            raise TypeError("Example.subqueries must be a sequence of strings; use parse_subqueries(text)")
        if not isinstance(self.subqueries, tuple):  # keep Example hashable when given a list
            object.__setattr__(self, "subqueries", tuple(self.subqueries))

    @property
    def source(self) -> str:
        return format_source(self.query)

    @property
    def target(self) -> str:
        return format_target(self.subqueries)


@dataclass
class LoadResult:
    examples: list[Example]
    duplicates: list[tuple[int, int]]  # (line, line of its first occurrence), 1-based
    path: Path


@dataclass
class Splits:
    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def items(self):
        return (("train", self.train), ("valid", self.valid), ("test", self.test))


def normalize_text(text: str) -> str:
    """Fold to what the T5 vocabulary can spell: strip accents, collapse whitespace.

    NFKD splits "ā" into "a" + a combining macron, which is dropped (the vocabulary has no macron
    vowels, so "Māori" would otherwise encode as "M<unk>ori"); NFKC then recomposes what was
    decomposed but kept (Hangul, ...) and folds compatibility forms ("km²" -> "km2") exactly as
    the tokenizer's own NFKC normaliser would. A few letters and dashes without a decomposition
    that the vocabulary lacks are spelled in ASCII ("ø" -> "o", "\u2010" -> "-").
    """
    if text.isascii():  # most rows: nothing to fold
        return _WHITESPACE.sub(" ", text).strip()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    folded = unicodedata.normalize("NFKC", stripped).translate(_FOLD)
    return _WHITESPACE.sub(" ", folded).strip()


def format_source(query: str, normalize: bool = True) -> str:
    """The model input for a user query: the same function for training and serving."""
    query = normalize_text(query) if normalize else query.strip()
    return PROMPT_PREFIX + query


def format_target(subqueries) -> str:
    return SEPARATOR.join(subqueries)


def parse_subqueries(text: str) -> list[str]:
    """Split a target or model output on ``|`` (or newlines) into subqueries.

    Each part is stripped with inner whitespace collapsed; empty parts are dropped; repeats are
    dropped case-insensitively ("Al Gore age|al gore age" -> ["Al Gore age"]), keeping the first
    spelling and the original order.
    """
    out, seen = [], set()
    for part in _SPLIT.split(text):
        part = _WHITESPACE.sub(" ", part).strip()
        key = part.casefold()
        if part and key not in seen:
            seen.add(key)
            out.append(part)
    return out


def text_pieces(tokenizer, token_ids) -> Iterator[str]:
    """Streaming detokenisation: after each token decode the whole prefix and yield what it adds, so
    SentencePiece word-start spaces come out right. The pieces join to the decoded sequence, stripped.
    No clean-up of spaces: it would rewrite text across token boundaries."""
    ids, text = [], ""
    for token in token_ids:
        ids.append(int(token))
        new = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        if new.startswith(text) and len(new) > len(text):
            yield new[len(text):]
            text = new


def _parse_row(path, line: int, raw: str, normalize: bool) -> Example:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(path, line, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(row).__name__}")
    values = {}
    for key in ("query", "subqueries"):
        if key not in row:
            raise DataError(path, line, f'missing "{key}"')
        value = row[key]
        if not isinstance(value, str):
            raise DataError(path, line, f'"{key}" must be a string, got {type(value).__name__}')
        if normalize:
            value = normalize_text(value)
        if not value.strip():
            raise DataError(path, line, f'"{key}" is empty')
        values[key] = value
    query = values["query"] if normalize else values["query"].strip()
    subqueries = parse_subqueries(values["subqueries"].replace(LEGACY_SEPARATOR, SEPARATOR))
    if not subqueries:
        raise DataError(path, line, f'"subqueries" has no subquery after splitting: {row["subqueries"]!r}')
    return Example(query, tuple(subqueries))


def read_jsonl(path, *, normalize: bool = True) -> LoadResult:
    """Read and validate one JSONL file.

    Blank lines are skipped (line numbers still count them). Any malformed row raises
    ``DataError`` naming ``path:line``. Exact duplicates (same query and target after
    normalisation) are dropped, returned in ``duplicates`` and reported with a
    ``DuplicateRowsWarning``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, f"cannot read ({e.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    examples, duplicates, first_line = [], [], {}
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, line, f"not valid UTF-8 (byte {e.start + 1})") from None
        if not text.strip():
            continue
        example = _parse_row(path, line, text, normalize)
        if example in first_line:
            duplicates.append((line, first_line[example]))
            continue
        first_line[example] = line
        examples.append(example)
    if duplicates:
        _warn_duplicates(str(path), duplicates)
    return LoadResult(examples, duplicates, path)


def _warn_duplicates(where: str, duplicates: list[tuple]) -> None:
    shown = ", ".join(f"{line} (same as {first})" for line, first in duplicates[:5])
    more = f", and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
    warnings.warn(
        f"{where}: dropped {len(duplicates)} duplicate row(s) at lines {shown}{more}",
        DuplicateRowsWarning,
        stacklevel=3,
    )


def load_examples(paths, *, normalize: bool = True) -> list[Example]:
    """Load one or more JSONL files into one list, dropping duplicates within and across files."""
    return _load(paths, normalize)[0]


def _load(paths, normalize: bool):
    """Examples, rows read (blank lines aside), and how many duplicate rows were dropped."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no data files given")
    examples, seen, rows, dropped = [], {}, 0, 0
    for path in paths:
        result = read_jsonl(path, normalize=normalize)
        rows += len(result.examples) + len(result.duplicates)
        dropped += len(result.duplicates)
        cross = []
        for example in result.examples:
            if example in seen:
                cross.append(seen[example])
                continue
            seen[example] = str(path)
            examples.append(example)
        if cross:
            dropped += len(cross)
            warnings.warn(
                f"{path}: dropped {len(cross)} row(s) already loaded from {', '.join(sorted(set(cross)))}",
                DuplicateRowsWarning,
                stacklevel=3,
            )
    return examples, rows, dropped


# -- splits ------------------------------------------------------------------------------------

def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text`` (independent of PYTHONHASHSEED and row order)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fractions(fractions) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3:
        raise ValueError(f"split fractions must be three numbers (train, valid, test), got {fractions}")
    if any(not 0.0 <= f <= 1.0 for f in fractions) or fractions[0] <= 0.0:
        raise ValueError(f"split fractions must be in [0, 1] with train > 0, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions):g})")
    return fractions


def split_by_target(examples, fractions=(0.8, 0.1, 0.1), salt: str = "", sample_fraction: float = 1.0) -> Splits:
    """Leak-free split: every paraphrase of a target lands in the same split.

    A target's split is fixed by a hash of ``salt + target``, so it does not depend on row
    order or on which other rows exist: adding data never moves an existing target. Fractions
    are of targets (so of rows too, up to hash noise). ``sample_fraction`` keeps that fraction
    of targets, chosen by an independent hash (samples are nested: 0.1 is inside 0.2).
    """
    train_f, valid_f, _ = _check_fractions(fractions)
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    splits, where = Splits(), {}
    for example in examples:
        target = example.target
        if target not in where:
            if sample_fraction < 1.0 and _unit_hash(f"sample:{salt}{target}") >= sample_fraction:
                where[target] = None
            else:
                u = _unit_hash(salt + target)
                where[target] = splits.train if u < train_f else splits.valid if u < train_f + valid_f else splits.test
        if where[target] is not None:
            where[target].append(example)
    return splits


def random_split(examples, sample_fraction: float = 0.1, fractions=(0.96, 0.02, 0.02), seed: int = 42) -> Splits:
    """The original project's row-level split of a random sample.

    It leaks: paraphrases of a test target sit in train. Kept only to compare with its numbers.
    """
    fractions = _check_fractions(fractions)
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    examples = list(examples)
    order = np.random.default_rng(seed).permutation(len(examples))
    order = order[: int(round(len(examples) * sample_fraction))]
    n_train = int(round(len(order) * fractions[0]))
    n_valid = int(round(len(order) * fractions[1]))
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return Splits(pick(order[:n_train]), pick(order[n_train : n_train + n_valid]), pick(order[n_train + n_valid :]))


def make_splits(examples, kind: str = "target", fractions=None, sample_fraction: float = 1.0, seed: int = 42,
                salt: str = "") -> Splits:
    """The one entry point the trainers call.

    ``kind="target"``: leak-free ``split_by_target`` (default 80/10/10; ``seed`` is not used so
    that every training seed is scored on the same test set). ``kind="random"``: the original
    project's ``random_split`` (default 96/2/2).
    """
    if kind == "target":
        return split_by_target(examples, fractions or (0.8, 0.1, 0.1), salt=salt, sample_fraction=sample_fraction)
    if kind == "random":
        return random_split(examples, sample_fraction, fractions or (0.96, 0.02, 0.02), seed=seed)
    raise ValueError(f"unknown split kind {kind!r}: use 'target' or 'random'")


# -- tokenisation --------------------------------------------------------------------------------

def shift_right(labels: np.ndarray, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> np.ndarray:
    """T5 decoder inputs: labels moved one step right after the start token, -100 replaced by pad."""
    labels = np.asarray(labels)
    out = np.empty_like(labels)
    out[..., 0] = decoder_start_token_id
    out[..., 1:] = labels[..., :-1]
    out[out == -100] = pad_token_id
    return out


def _truncate(ids: list[int], max_length: int | None, eos_id: int | None) -> tuple[list[int], bool]:
    if max_length is None or len(ids) <= max_length:
        return ids, False
    # Keep EOS at the end as the tokenizer's own truncation does.
    if eos_id is not None and ids and ids[-1] == eos_id:
        return ids[: max_length - 1] + [eos_id], True
    return ids[:max_length], True


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids with special tokens (EOS) of many strings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: same ids, without per-item Python conversion
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=True)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _decode(tokenizer, ids: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(ids, skip_special_tokens=True)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def tokenize(tokenizer, examples, max_source_length: int | None = 64, max_target_length: int | None = 64) -> dict:
    """Token ids of sources and targets (EOS included, truncated with EOS kept).

    Returns ``input_ids`` and ``labels`` (lists of lists) and the counts ``truncated_sources`` /
    ``truncated_targets``.
    """
    for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if value is not None and value < 2:
            raise ValueError(f"{name} must be >= 2 (room for one token and EOS), got {value}")
    examples = list(examples)
    eos = tokenizer.eos_token_id
    out = {"input_ids": [], "labels": [], "truncated_sources": 0, "truncated_targets": 0}
    if not examples:
        return out
    sources = _encode(tokenizer, [e.source for e in examples])
    targets = _encode(tokenizer, [e.target for e in examples])
    for key, counter, seqs, limit in (
        ("input_ids", "truncated_sources", sources, max_source_length),
        ("labels", "truncated_targets", targets, max_target_length),
    ):
        for ids in seqs:
            ids, cut = _truncate(ids, limit, eos)
            out[key].append(ids)
            out[counter] += cut
    return out


def pad_batch(sequences, pad_value: int, length: int | None = None, dtype=np.int32) -> np.ndarray:
    """Right-pad integer sequences to the longest one (or to ``length``) as a 2-D array."""
    sequences = list(sequences)
    longest = max((len(s) for s in sequences), default=0)
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest sequence ({longest})")
    out = np.full((len(sequences), length), pad_value, dtype=dtype)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = seq
    return out


# -- report CLI ----------------------------------------------------------------------------------

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = _REPO.parent / "shared" / "tokenizers" / "flan-t5-small"


def _default_tokenizer() -> str:
    return str(DEFAULT_TOKENIZER) if DEFAULT_TOKENIZER.exists() else "google/flan-t5-small"


def _split_stats(splits: Splits) -> dict:
    targets = {name: {e.target for e in rows} for name, rows in splits.items()}
    train, valid, test = targets["train"], targets["valid"], targets["test"]
    stats = {
        name: {
            "rows": len(rows),
            "targets": len(targets[name]),
            "targets_in_train": len(targets[name] & train) if name != "train" else None,
        }
        for name, rows in splits.items()
    }
    stats["leaked_targets"] = len((train & valid) | (train & test) | (valid & test))
    return stats


def _token_stats(tokenizer, examples) -> dict:
    unk = tokenizer.unk_token_id
    # The query as stored (Example.source would normalise it); the prefix always round-trips.
    sources = [PROMPT_PREFIX + e.query for e in examples]
    targets = [e.target for e in examples]
    src_ids = _encode(tokenizer, sources)
    tgt_ids = _encode(tokenizer, targets)

    def round_trip_failures(texts, ids):
        return sum(d != t for d, t in zip(_decode(tokenizer, ids), texts))

    def percentiles(seqs):
        lengths = np.array([len(s) for s in seqs])
        return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}

    unk_queries = sum(unk in ids for ids in src_ids)
    unk_targets = sum(unk in ids for ids in tgt_ids)
    return {
        "strings": len(sources) + len(targets),
        "unk_strings": unk_queries + unk_targets,
        "unk_targets": unk_targets,
        "round_trip_failures_queries": round_trip_failures(sources, src_ids),
        "round_trip_failures_targets": round_trip_failures(targets, tgt_ids),
        "input_lengths": percentiles(src_ids),
        "target_lengths": percentiles(tgt_ids),
    }


def build_report(paths, tokenizer=None, normalize: bool = True, seed: int = 42) -> dict:
    """Everything ``report`` prints, as a dict; raises DataError on a bad file.

    ``tokenizer``: a tokenizer, a folder or hub id to load one from (only once the data has
    loaded cleanly), or None for no token statistics.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DuplicateRowsWarning)  # counted in the report instead
        examples, rows, dropped = _load(paths, normalize)
    report = {
        "files": [str(p) for p in paths],
        "normalize": normalize,
        "rows": rows,
        "examples": len(examples),
        "targets": len({e.target for e in examples}),
        "duplicates_dropped": dropped,
        "splits": {
            "target": _split_stats(make_splits(examples, "target")),
            "random": _split_stats(random_split(examples, 0.1, seed=seed)),
        },
    }
    if isinstance(tokenizer, (str, Path)):
        tokenizer, report["tokenizer_note"] = _load_tokenizer(str(tokenizer))
    if tokenizer is not None and examples:
        report["tokens"] = _token_stats(tokenizer, examples)
        if normalize:  # the same rows without folding, to show what normalisation buys
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DuplicateRowsWarning)
                raw = _load(paths, normalize=False)[0]
            report["tokens_without_normalize"] = _token_stats(tokenizer, raw)
    return report


def _print_report(report: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    n = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    overview = Table(title="Data", show_header=False)
    overview.add_row("files", "\n".join(report["files"]))
    overview.add_row("normalize", str(report["normalize"]))
    overview.add_row("rows read", n(report["rows"]))
    overview.add_row("duplicates dropped", n(report["duplicates_dropped"]))
    overview.add_row("examples", n(report["examples"]))
    overview.add_row("distinct targets", n(report["targets"]))
    console.print(overview)

    splits = Table(title="Splits", caption="target: leak-free, by target, 80/10/10 | random: the original "
                   "project's row-level 96/2/2 of a 10% sample (leaks)")
    for col in ("split", "part", "rows", "targets", "in train"):
        splits.add_column(col, justify="left" if col in ("split", "part") else "right")
    for kind, stats in report["splits"].items():
        for part in ("train", "valid", "test"):
            s = stats[part]
            splits.add_row(kind if part == "train" else "", part, n(s["rows"]), n(s["targets"]),
                           n(s["targets_in_train"]))
        leaked = stats["leaked_targets"]
        style = "green" if leaked == 0 else "red"
        splits.add_row("", "leaked", "", f"[{style}]{leaked:,}[/]", "", end_section=True)
    console.print(splits)

    if "tokens" not in report:
        note = report.get("tokenizer_note") or "no tokenizer"
        console.print(f"[yellow]no token statistics: {escape(note)}[/]")
        return
    tokens = Table(title="Tokens")
    tokens.add_column("")
    has_raw = "tokens_without_normalize" in report
    tokens.add_column("normalized" if report["normalize"] else "as stored", justify="right")
    if has_raw:
        tokens.add_column("not normalized", justify="right")
    stats = [report["tokens"]] + ([report["tokens_without_normalize"]] if has_raw else [])
    for label, key in (("strings (queries + targets)", "strings"), ("strings with <unk>", "unk_strings"),
                       ("targets with <unk>", "unk_targets"),
                       ("query round-trip failures", "round_trip_failures_queries"),
                       ("target round-trip failures", "round_trip_failures_targets")):
        tokens.add_row(label, *(n(s[key]) for s in stats))
    for side in ("input", "target"):
        for q in ("p50", "p90", "p99", "max"):
            tokens.add_row(f"{side} tokens {q}", *(n(s[f"{side}_lengths"][q]) for s in stats))
    console.print(tokens)


def _load_tokenizer(name: str):
    """(tokenizer, None) or (None, why it did not load)."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().is_dir():
        return None, f"tokenizer folder not found: {name}"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name), None
    except Exception as e:  # noqa: BLE001 - any failure only drops the token columns
        return None, f"tokenizer {name!r} did not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def main(argv=None) -> int:
    from rich.console import Console
    from rich.markup import escape

    parser = argparse.ArgumentParser(prog="python -m reformulation.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="summarise data files: rows, targets, splits, token lengths, <unk>")
    rep.add_argument("paths", nargs="+", help="JSONL files")
    rep.add_argument("--tokenizer", default=None, help=f"tokenizer folder or hub id (default {_default_tokenizer()})")
    rep.add_argument("--no-normalize", dest="normalize", action="store_false",
                     help="keep accents and whitespace as stored")
    rep.add_argument("--seed", type=int, default=42, help="seed of the random split (default 42)")
    rep.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)

    console, err = Console(), Console(stderr=True)
    try:
        tokenizer = args.tokenizer or _default_tokenizer()
        report = build_report(args.paths, tokenizer, normalize=args.normalize, seed=args.seed)
    except DataError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        return 130
    _print_report(report, console)
    if args.json_out:
        from .io import atomic_write_json

        atomic_write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
