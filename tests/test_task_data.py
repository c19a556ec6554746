"""The from-scratch recipe's data side: the task tokenizer and entity-swap augmentation.

The tokenizer must round-trip every row (Flan's fails on 2,110 targets); augmentation must never bring a
held-out string into training, and must keep query and target consistent.
"""

import json
import random

import pytest

from reformulation.augment import LetterModel, augment, copied_spans, invented_name, swap
from reformulation.data import Example, load_examples, make_splits
from reformulation.tokenizer import MIN_VOCAB, round_trip_failures, train_tokenizer


@pytest.fixture(scope="module")
def splits(full_jsonl):
    return make_splits(load_examples([full_jsonl]), "target", None, 1.0, 42)


@pytest.fixture(scope="module")
def task_tokenizer(splits):
    return train_tokenizer([e.source for e in splits.train] + [e.target for e in splits.train], 4000)


def test_task_tokenizer_round_trips_every_row_raw_and_normalised(task_tokenizer, full_jsonl):
    for normalize in (True, False):   # learned on normalised rows; byte fallback spells the rest
        rows = load_examples([full_jsonl], normalize=normalize)
        texts = [e.source for e in rows] + [e.target for e in rows] + [e.query for e in rows]
        assert round_trip_failures(task_tokenizer, texts) == []
    # and characters no row holds: bytes, not <unk>
    assert round_trip_failures(task_tokenizer, ["Māori ✓ 東京 — x|y", "naïve café (Zürich)"]) == []


def test_task_tokenizer_keeps_t5_ids_and_the_separator_whole(task_tokenizer):
    assert len(task_tokenizer) == 4000
    assert (task_tokenizer.pad_token_id, task_tokenizer.eos_token_id, task_tokenizer.unk_token_id) == (0, 1, 2)
    ids = task_tokenizer("Nikola Tesla lifespan|Milutin Milankovic lifespan").input_ids
    assert ids[-1] == 1 and ids.count(task_tokenizer.convert_tokens_to_ids("|")) == 1
    assert 2 not in task_tokenizer("Māori 東京").input_ids   # bytes, never <unk>


def test_task_tokenizer_saves_loads_in_transformers_and_is_deterministic(task_tokenizer, splits, tmp_path):
    from transformers import AutoTokenizer

    task_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [e.source for e in splits.test[:200]]
    assert loaded(texts).input_ids == task_tokenizer(texts).input_ids
    again = train_tokenizer([e.source for e in splits.train] + [e.target for e in splits.train], 4000)
    assert again.get_vocab() == task_tokenizer.get_vocab()
    with pytest.raises(ValueError, match=str(MIN_VOCAB)):
        train_tokenizer(["a b c"], 100)


def test_copied_spans_are_the_names_a_target_copies_from_its_query():
    assert copied_spans("Who lived longer, Nikola Tesla or Milutin Milankovic?",
                        ["Nikola Tesla lifespan", "Milutin Milankovic lifespan"]) == \
        ["Milutin Milankovic", "Nikola Tesla"]
    # lowercase words the target shares are not names, nor are numbers or units
    assert copied_spans("What was the population of France in 1990?", ["France population 1990"]) == ["France"]
    assert copied_spans("What is the area of Lake Taupo in km2?", ["Lake Taupo Area km2"]) == ["Lake Taupo"]
    assert copied_spans("how do cells divide", ["Cell Division"]) == []


def test_swap_replaces_consistently_and_never_twice():
    e = Example("Is Paris bigger than Berlin? Paris is old.", ("Paris Area", "Berlin Area"))
    out = swap(e, {"Paris": "Berlin", "Berlin": "Tokyo"})
    assert out.query == "Is Berlin bigger than Tokyo? Berlin is old."
    assert out.subqueries == ("Berlin Area", "Tokyo Area")
    # word boundaries: "Paris" inside "Parisian" stays
    assert swap(Example("Parisian food in Paris", ("Paris Food",)), {"Paris": "Oslo"}).query == "Parisian food in Oslo"


def test_augmentation_keeps_pairs_consistent_and_is_deterministic(splits):
    train = splits.train[:400]
    rows = augment(train, copies=2, seed=3)
    assert rows == augment(train, copies=2, seed=3) and rows != augment(train, copies=2, seed=4)
    with_spans = [e for e in train if copied_spans(e.query, e.subqueries)]
    assert len(rows) == 2 * len(with_spans)
    changed = 0
    for original, new in zip([e for e in with_spans for _ in range(2)], rows):
        assert len(new.subqueries) == len(original.subqueries)
        # the swapped names are copied: every name the new target takes from the query is still in the query
        for span in copied_spans(new.query, new.subqueries):
            assert span in new.query
        changed += new.query != original.query
    assert changed == len(rows)


@pytest.mark.parametrize("names", ["syllables", "letters"])
def test_augmentation_never_puts_a_test_split_string_into_training(splits, names):
    """A name that only the held-out splits contain (never in any training text) appears in no augmented row."""
    train_text = " ".join(e.query + " " + e.target for e in splits.train)
    held_out = {span for e in splits.valid + splits.test for span in copied_spans(e.query, e.subqueries)}
    held_out_only = {s for s in held_out if s not in train_text and len(s) > 3}
    assert len(held_out_only) > 30   # the test below has something to find
    rows = augment(splits.train, copies=3, seed=0, names=names)
    augmented_text = "\n".join(e.query + "\n" + e.target for e in rows)
    leaked = [s for s in held_out_only if s in augmented_text]
    # an invented name could in principle spell a real one by chance; none does
    assert leaked == []


def test_invented_names_are_reproducible_and_word_counted():
    rng_a, rng_b = random.Random(1), random.Random(1)
    names = [invented_name(rng_a, 2) for _ in range(20)]
    assert names == [invented_name(rng_b, 2) for _ in range(20)]
    assert all(len(n.split()) == 2 and n.split()[0][0].isupper() for n in names)
    assert len(set(names)) == 20


def test_letter_names_are_new_words_spelled_like_the_training_names(splits):
    spans = sorted({s for e in splits.train for s in copied_spans(e.query, e.subqueries)})
    model = LetterModel(spans)
    names = [model.name(random.Random(i), 2) for i in range(200)]
    assert names == [LetterModel(spans).name(random.Random(i), 2) for i in range(200)]
    words = [w for n in names for w in n.split()]
    assert all(len(n.split()) == 2 for n in names) and len(set(words)) > 300
    assert not {w.lower() for w in words} & {w.lower() for s in spans for w in s.split()}   # never a pool word
    # letters of the training names, not the syllable generator's few onsets: "c" + consonant, "ck", "ph"...
    letters = " ".join(words).lower()
    assert all(pair in letters for pair in ("ck", "ph", "ll", "ic"))
    rows = augment(splits.train[:300], copies=2, seed=0, invented=1.0, names="letters")
    assert rows != augment(splits.train[:300], copies=2, seed=0, invented=1.0)
    with pytest.raises(ValueError, match="names"):
        augment(splits.train[:10], copies=1, names="runes")
    # a pool that spells nothing new, or holds no words at all, still gets names
    assert len(LetterModel(["Paris"]).name(random.Random(0), 3).split()) == 3
    assert len(LetterModel(["G7", "1990"]).name(random.Random(0), 2).split()) == 2


def test_config_rejects_a_task_tokenizer_for_a_pretrained_model(tmp_path):
    from reformulation.config import ConfigError, load_config

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "q", "subqueries": "a|b"}) + "\n")
    with pytest.raises(ConfigError, match="tokenizer_vocab_size"):
        load_config(None, dict(model="google/flan-t5-small", data=[str(data)], tokenizer_vocab_size=4000)).validate()
    with pytest.raises(ConfigError, match="augment_copies"):
        load_config(None, dict(init="small", data=[str(data)], augment_copies=-1)).validate()
