"""Speculative decoding with looked-up drafts (reformulation.speculative) gives plain greedy's tokens, token for
token: on a toy engine, and on exported ONNX models (float32 and int8) with padded batches whose rows end at
different steps, with drafts that are all right, partly wrong or absent; the lookup and the phrasebook."""

import json

import numpy as np
import pytest

from hf_models import QUERIES, SHAPES, ending_model
from onnx_t5 import OnnxT5
from onnx_t5.export import export_folder
from reformulation.speculative import DRAFTS_FILE, Lookup, Phrasebook, greedy

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def draft(source, output, k, keys=None, phrasebook=None):
    """One draft for `output` (an answer so far, without the decoder start) from a fresh Lookup."""
    return Lookup(source, keys, phrasebook)([0] + list(output), k)


def test_lookup_takes_what_follows_the_longest_latest_match():
    source = [5, 6, 7, 8, 9, 5, 6, 10, 11]
    assert draft(source, [1, 5, 6], k=3) == [10, 11]  # "5 6" occurs twice: the latest, then what follows
    assert draft(source, [7], k=2) == [8, 9]
    assert draft(source, [4, 8], k=4) == [9, 5, 6, 10]  # "4 8" is absent; "8" is there
    assert draft(source, [11], k=3) == [] and draft(source, [42], k=3) == [] and draft(source, [], k=3) == []
    assert draft(source, [7], k=0) == []
    assert draft(source, [20, 21, 30, 20], k=2) == [21, 30]  # the output's own pattern first ("X Area|Y Area")
    # compared by keys: 105 ("Philippine" after a "|") stands for 5 ("▁Philippine" in the question)
    keys = list(range(120))
    keys[105] = 5
    assert draft(source, [1, 105], k=2) == [] and draft(source, [1, 105], k=2, keys=keys[:100]) == []
    assert draft(source, [1, 105], k=2, keys=keys) == [6, 10]


def test_lookup_follows_a_growing_answer_and_starts_over_on_a_new_one():
    source = [5, 6, 7, 8]
    lookup = Lookup(source)
    assert lookup([0, 9, 3], 2) == []
    assert lookup([0, 9, 3, 4, 9], 2) == [3, 4]  # "9" now occurs earlier in the answer itself
    assert lookup([0, 7], 2) == [8]  # another answer: the old one's n-grams are gone
    assert lookup([0, 9], 2) == []


def test_phrasebook_continues_what_the_question_cannot_and_round_trips(tmp_path):
    """Targets "<name> Birth Date": the name is copied from the question, then "Birth Date" and EOS come from the
    phrasebook, chained into one draft."""
    birth, date, eos = 50, 51, 1
    book = Phrasebook.from_targets([[10, 11, birth, date, eos], [12, birth, date, eos], [13, 14, 15, birth, 52, eos]],
                                   start=0, vocab_size=60)
    assert book.next([0, 30, birth], 4) == [date, eos]  # 2 of 3 targets say "Date" after "Birth"
    assert book.next([0, 30, 14, 15], 5) == [birth, 52, eos]
    assert book.next([0, 30], 3) == [] and book.next([0], 2) in ([10, 11], [12, birth], [13, 14])
    source = [7, 20, 21, 22]
    assert draft(source, [20], 6) == [21, 22]  # prompt lookup alone stops where the question ends
    assert draft(source, [20], 6, phrasebook=Phrasebook({(22,): (birth,), (22, birth): (date, eos)}, 60)) == \
        [21, 22, birth, date, eos]  # copy, then the phrase, then the phrase's own continuation

    book.save(tmp_path)
    again = Phrasebook.load(tmp_path, vocab_size=60)
    assert again.table == book.table and again.vocab_size == 60
    assert Phrasebook.load(tmp_path / "none") is None
    with pytest.raises(ValueError, match="vocabulary of 60 tokens, the tokenizer has 61"):
        Phrasebook.load(tmp_path, vocab_size=61)
    (tmp_path / DRAFTS_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=f"{DRAFTS_FILE}: not a readable phrasebook"):
        Phrasebook.load(tmp_path)


class ToyEngine:
    """A decoder whose next token is a fixed function of the whole prefix, with a cache that must be fed in
    order: decode() checks that position t is where the cache ends, truncate() drops positions."""

    def __init__(self, source, vocab=50, eos=1):
        self.source, self.vocab, self.eos, self.cache, self.passes = source, vocab, eos, [], 0

    def next_token(self, prefix):
        if len(prefix) > 12:
            return self.eos
        if len(prefix) % 5 == 4:  # now and then not a copy: drafts get rejected
            return 2 + (sum(prefix) % (self.vocab - 2))
        return self.source[(len(prefix) + 2) % len(self.source)]

    def decode(self, tokens, t):
        assert len(self.cache) == t, "fed at the wrong position (a rollback went wrong)"
        self.passes += 1
        logits = np.zeros((len(tokens), self.vocab))
        for i, token in enumerate(tokens):
            self.cache.append(token)
            logits[i, self.next_token(self.cache)] = 1.0
        return logits

    def truncate(self, length):
        del self.cache[length:]


def plain_greedy(engine: ToyEngine, start: int, max_new_tokens: int) -> list[int]:
    tokens = [start]
    while len(tokens) - 1 < max_new_tokens and tokens[-1] != engine.eos:
        tokens.append(int(engine.decode([tokens[-1]], len(tokens) - 1)[0].argmax()))
    return tokens


@pytest.mark.parametrize("max_new_tokens", [3, 8, 30])
def test_toy_engine_same_tokens_in_fewer_passes(max_new_tokens):
    source = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    want = plain_greedy(ToyEngine(source), 0, max_new_tokens)
    engine, stats = ToyEngine(source), {}
    got = greedy(engine.decode, engine.truncate, 0, [1], max_new_tokens, Lookup(source), draft_tokens=4, stats=stats)
    assert got == want
    assert stats == {"passes": engine.passes, "tokens": len(want) - 1}
    if max_new_tokens == 30:
        assert engine.passes < len(want) - 1  # copies were accepted several at a time


def exported(shape, tokenizer, tmp_path, quantize):
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    model = ending_model(shape, False, batch)
    export_folder(model, tmp_path, quantize=quantize)
    return OnnxT5(tmp_path), batch["input_ids"].numpy(), batch["attention_mask"].numpy()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_onnx_speculative_is_plain_greedy(shape, tokenizer, tmp_path):
    """float32: a padded batch is decoded row by row, each row without its padding, and every row is plain
    greedy's, token for token. (int8 is not exact: MLAS rounds a many-row pass unlike a one-row step, and random
    models are full of near-ties; test_onnx_int8_pass_is_the_steps_up_to_rounding checks the pass itself.)"""
    quantize = False
    onnx_model, ids, mask = exported(shape, tokenizer, tmp_path, quantize)
    rows = [onnx_model.generate(row[m.astype(bool)][None], max_new_tokens=24)[0] for row, m in zip(ids, mask)]
    width = max(map(len, rows))
    want = np.stack([np.pad(row, (0, width - len(row)), constant_values=onnx_model.pad) for row in rows])
    got = onnx_model.speculative(ids, mask, max_new_tokens=24)
    assert got.shape == want.shape and (got == want).all()
    ended = (want == 1).any(axis=1)  # the padded batch's own greedy too, whose rows end at different steps
    assert ended.any() and not ended.all()
    assert (got == onnx_model.generate(ids, mask, max_new_tokens=24)).all()


def test_onnx_int8_pass_is_the_steps_up_to_rounding(tokenizer, tmp_path):
    """int8: one pass over 8 positions gives the logits of 8 one-position steps up to int8 rounding (measured:
    within 1-2% of the logit scale; a wrong mask or position bias is off by far more)."""
    onnx_model, ids, mask = exported("flan-small", tokenizer, tmp_path, quantize=True)
    row = ids[0][mask[0].astype(bool)]
    tokens = onnx_model.generate(row[None], max_new_tokens=8, min_new_tokens=8)[0][:8]
    feed_one, feed_many = onnx_model.begin(row[None]), onnx_model.begin(row[None])
    one = np.stack([onnx_model.step(feed_one, np.array([tok]), t) for t, tok in enumerate(tokens)], axis=1)
    many = onnx_model.decode(feed_many, tokens[None], 0)
    assert np.abs(many - one).max() <= 5e-2 * np.abs(one).max()
    assert (many.argmax(-1) == one.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("corrupt", [None, 0, 2])
def test_onnx_multi_position_pass_and_rollback(corrupt, tokenizer, tmp_path):
    """Drafts from an oracle (plain greedy's own continuation), with one token changed at draft position
    `corrupt`: all accepted, or accepted up to the change and the cache rolled back; the same tokens either way,
    and the multi-position pass gives the one-position logits."""
    onnx_model, ids, mask = exported("flan-small", tokenizer, tmp_path, quantize=False)
    row = ids[0][mask[0].astype(bool)]
    want = onnx_model.generate(row[None], max_new_tokens=24)[0].tolist()
    want = want[: want.index(1) + 1] if 1 in want else want

    def oracle(tokens, k):
        draft = list(want[len(tokens): len(tokens) + k])
        if corrupt is not None and len(draft) > corrupt:
            draft[corrupt] = (draft[corrupt] + 7) % 100 + 2
        return draft

    feed, stats = onnx_model.begin(row[None]), {}
    got = greedy(lambda tokens, t: onnx_model.decode(feed, np.array([tokens]), t)[0],
                 lambda length: onnx_model.truncate(feed, length), onnx_model.start, [1], 24, oracle,
                 draft_tokens=5, stats=stats)
    assert got == want
    assert stats["passes"] < len(want) - 1 if corrupt != 0 else stats["passes"] == len(want) - 1

    feed_one, feed_many = onnx_model.begin(row[None]), onnx_model.begin(row[None])
    one = np.stack([onnx_model.step(feed_one, np.array([tok]), t) for t, tok in enumerate(want[:6])], axis=1)
    many = onnx_model.decode(feed_many, np.array([want[:6]]), 0)
    assert np.abs(many - one).max() <= 1e-4 * np.abs(one).max()


def test_onnx_engine_answers_the_same_with_speculative_on_and_off(tokenizer, tokenizer_dir, tmp_path):
    """The serving switch: `--[no-]speculative` (OnnxEngine.load(speculative=...)), on by default in float32, on
    copying questions whose answers run to the token limit (long greedy answers: many drafts checked)."""
    quantize = False
    from onnx_t5.engine import OnnxEngine
    from reformulation.engine import EngineError

    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    (tmp_path / "m").mkdir()
    export_folder(ending_model("v1-relu-tied", False, batch), tmp_path / "m", quantize=quantize, tokenizer=tokenizer)
    queries = QUERIES + ["Nikola Tesla Nikola Tesla Nikola Tesla lifespan?"]
    off = OnnxEngine().load(tmp_path / "m", speculative=False)
    on = OnnxEngine().load(tmp_path / "m")  # float32: on by default (exact)
    assert on.options["speculative"] and not off.options["speculative"]
    (tmp_path / "q").mkdir()
    export_folder(ending_model("v1-relu-tied", False, batch), tmp_path / "q", quantize=True, tokenizer=tokenizer)
    assert OnnxEngine().load(tmp_path / "q").options["speculative"] is False  # int8: off unless asked
    assert OnnxEngine().load(tmp_path / "q", speculative=True).options["speculative"] is True
    for n in (4, 24):
        assert on.generate(queries, max_new_tokens=n) == off.generate(queries, max_new_tokens=n)
    stats = {}
    ids = tokenizer(queries[-1:], return_tensors="np")["input_ids"]
    on.model.speculative(ids, max_new_tokens=24, stats=stats, drafts=on._drafts)
    assert stats["tokens"] >= 1

    # a phrasebook beside the model (as the trainers write it): here made of the model's own answers, so its
    # drafts are mostly right; the answers stay the same and take fewer passes
    batch = tokenizer(queries, return_tensors="pt", padding=True)
    plain = off.model.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=24)
    Phrasebook.from_targets([row[1:] for row in plain.tolist()], on.model.start, len(tokenizer)).save(tmp_path / "m")
    booked = OnnxEngine().load(tmp_path / "m", speculative=True)
    assert booked._drafts.phrasebook is not None
    assert booked.generate(queries, max_new_tokens=24) == off.generate(queries, max_new_tokens=24)
    passes = []
    for engine in (on, booked):
        stats = {}
        engine.model.speculative(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=24,
                                 stats=stats, drafts=engine._drafts)
        passes.append(stats["passes"])
    assert passes[1] < passes[0], passes
    (tmp_path / "m" / DRAFTS_FILE).write_text("{")
    with pytest.raises(EngineError, match="not a readable phrasebook"):
        OnnxEngine().load(tmp_path / "m", speculative=True)
    (tmp_path / "m" / DRAFTS_FILE).unlink()

    marker = json.loads((tmp_path / "m" / "onnx.json").read_text())
    del marker["decoder_positions"]  # a folder exported before multi-position decoders
    (tmp_path / "m" / "onnx.json").write_text(json.dumps(marker))
    with pytest.raises(EngineError, match="re-export it"):
        OnnxEngine().load(tmp_path / "m", speculative=True)


def test_export_carries_the_phrasebook(tokenizer_dir, tmp_path):
    """convert to-onnx (onnx_t5.export) copies a model folder's drafts.json into the ONNX folder."""
    from hf_models import save_model
    from onnx_t5.export import export

    folder = save_model("v1-relu-tied", tmp_path / "hf", tokenizer_dir)
    Phrasebook({(0,): (5, 6)}, 32128).save(folder)
    out = export(folder, tmp_path / "onnx", quantize=False)
    assert Phrasebook.load(out).table == {(0,): (5, 6)}
