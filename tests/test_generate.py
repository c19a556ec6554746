"""MLX generation vs transformers' generate (the oracle) on random-init models with the real tokenizer."""

import runpy
import subprocess
import sys
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
import torch
from hf_models import QUERIES, SHAPES, make_model

import mlx_t5
from reformulation.data import format_source

ROOT = Path(__file__).resolve().parents[1]

EOS = 1

# A random model almost never picks EOS. Scaling its output row makes EOS win at different steps for
# different rows, so the comparisons below exercise finished rows and finished beam hypotheses.
EOS_BOOST = {"flan-small": 3.0, "v1-relu-tied": 2.7, "odd-heads": 1.8, "deep-decoder": 2.7}
# Each shape checks greedy and one beam configuration; together they cover every beam option.
BEAM_OPTIONS = {
    "flan-small": dict(num_beams=4, max_new_tokens=6),
    "v1-relu-tied": dict(num_beams=4, num_return_sequences=3, length_penalty=0.6, max_new_tokens=12),
    "odd-heads": dict(num_beams=3, num_return_sequences=2, early_stopping=True, max_new_tokens=12),
    "deep-decoder": dict(num_beams=4, early_stopping="never", length_penalty=1.0, max_new_tokens=10),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decode-step matmuls are tiny: BLAS / torch threads only add synchronisation, and spin for whole
    scheduler slices when the CPU is shared (measured here: ~8x slower module with 2 threads under load)."""
    from mlx_t5 import blas

    before = (blas.get_threads(), torch.get_num_threads())
    if before[0]:
        blas.set_threads(1)
    torch.set_num_threads(1)
    yield
    if before[0]:
        blas.set_threads(before[0])
    torch.set_num_threads(before[1])


def save_eos_boosted(name: str, folder, tokenizer_dir, boost: float):
    hf = make_model(name)
    with torch.no_grad():
        head = hf.shared.weight if hf.config.tie_word_embeddings else hf.lm_head.weight
        head[EOS] *= boost
    hf.save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer([format_source(q) for q in QUERIES], padding=True, return_tensors="np")
    assert len(set(enc["attention_mask"].sum(1))) > 4, "the batch must mix input lengths"
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory, tokenizer_dir):
    """(name, hf_model, mlx_model) with EOS made likely."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_eos_boosted(request.param, folder, tokenizer_dir, EOS_BOOST[request.param])
    model, _ = mlx_t5.load(folder)
    return request.param, hf, model


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer_dir):
    """An odd-heads model that rarely stops early (long outputs), with its tokenizer."""
    folder = tmp_path_factory.mktemp("small")
    save_eos_boosted("odd-heads", folder, tokenizer_dir, 1.0)
    return (*mlx_t5.load(folder), folder)


def hf_generate(hf, name, ids, mask, **options) -> list[list[int]]:
    """transformers' tokens without the decoder start, cut after the first EOS (the rest is padding)."""
    if name == "deep-decoder":  # transformers 5.24's cache breaks when the decoder is deeper than the encoder
        options["use_cache"] = False
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          **options).numpy()[:, 1:]
    rows = []
    for row in out.tolist():
        end = row.index(EOS) + 1 if EOS in row else len(row)
        assert all(t in (0, EOS) for t in row[end:]), "transformers pads finished rows"
        rows.append(row[:end])
    return rows


def assert_exercises_eos(seqs, max_new_tokens):
    ended = [s for s in seqs if s[-1] == EOS and len(s) < max_new_tokens]
    assert ended and any(len(s) == max_new_tokens for s in seqs), \
        f"test setup: want rows ending early and rows hitting the limit, got lengths {[len(s) for s in seqs]}"


def test_greedy_matches_transformers(pair, batch):
    name, hf, model = pair
    ids, mask = batch
    expected = hf_generate(hf, name, ids, mask, max_new_tokens=10)
    got = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=10)
    assert_exercises_eos(expected, 10)
    assert got == expected


def test_beam_search_matches_transformers(pair, batch):
    name, hf, model = pair
    ids, mask = batch
    options = BEAM_OPTIONS[name]
    expected = hf_generate(hf, name, ids, mask, **options)
    got = mlx_t5.generate_tokens(model, ids, mask, **options)
    assert len(got) == len(QUERIES) * options.get("num_return_sequences", 1)
    assert_exercises_eos(expected, options["max_new_tokens"])
    assert got == expected


@pytest.mark.parametrize("pair", ["flan-small"], indirect=True)
def test_ignore_eos_equals_transformers_min_new_tokens(pair, batch):
    name, hf, model = pair
    ids, mask = batch
    assert any(len(s) < 8 for s in mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8))
    got = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8, ignore_eos=True)
    assert got == hf_generate(hf, name, ids, mask, max_new_tokens=8, min_new_tokens=8)
    assert all(len(s) == 8 and EOS not in s for s in got)


def test_long_generation_crosses_kv_cache_chunks(tmp_path, batch, tokenizer_dir):
    """More tokens than one KVCache chunk: the buffer and the position-bias table must grow."""
    hf = save_eos_boosted("v1-relu-tied", tmp_path, tokenizer_dir, 1.0)
    model, _ = mlx_t5.load(tmp_path)
    ids, mask = batch
    n = mlx_t5.KVCache.step + 6
    assert mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=n, ignore_eos=True) == \
        hf_generate(hf, "v1-relu-tied", ids, mask, max_new_tokens=n, min_new_tokens=n)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_padding_does_not_change_a_row(small, batch, options):
    model, _, _ = small
    ids, mask = batch
    together = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8, **options)
    for i in (1, 2, 6):
        n = int(mask[i].sum())
        assert mlx_t5.generate_tokens(model, ids[i:i + 1, :n], None, max_new_tokens=8, **options) == [together[i]]


class CountingLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear, self.calls = linear, 0

    def __call__(self, x):
        self.calls += 1
        return self.linear(x)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_cross_attention_kv_computed_once_per_layer(small, batch, options):
    model, _, _ = small
    ids, mask = batch
    cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
    originals = [(a.k, a.q) for a in cross]
    try:
        for a in cross:
            a.k, a.q = CountingLinear(a.k), CountingLinear(a.q)
        out = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=6, ignore_eos=True, **options)
        assert [a.k.calls for a in cross] == [1] * len(cross)
        assert [a.q.calls for a in cross] == [6] * len(cross)  # one per step: the decoder did run 6 times
        assert all(len(s) == 6 for s in out)
    finally:
        for a, (k, q) in zip(cross, originals):
            a.k, a.q = k, q


def test_sampling_is_reproducible_with_a_seed(small, batch):
    model, _, _ = small
    ids, mask = batch
    options = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9)
    first = mlx_t5.generate_tokens(model, ids, mask, seed=7, **options)
    assert first == mlx_t5.generate_tokens(model, ids, mask, seed=7, **options)
    assert first != mlx_t5.generate_tokens(model, ids, mask, seed=8, **options)
    assert first != mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8)  # it does sample
    assert all(1 <= len(s) <= 8 for s in first)


def test_degenerate_sampling_is_greedy(small, batch):
    model, _, _ = small
    ids, mask = batch
    greedy = mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8)
    assert mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8, temperature=0.7, top_k=1, seed=1) == greedy
    assert mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=1) == greedy
    assert mlx_t5.generate_tokens(model, ids, mask, max_new_tokens=8, temperature=0.0, top_k=5, seed=1) == greedy


def test_several_samples_per_query(small, batch):
    model, _, _ = small
    ids, mask = batch
    out = mlx_t5.generate_tokens(model, ids[:2], mask[:2], max_new_tokens=6, temperature=1.0,
                                 num_return_sequences=3, seed=0)
    assert len(out) == 6
    assert len({tuple(s) for s in out[:3]}) > 1  # independent samples of query 0


def test_generate_text_applies_the_prompt_unless_raw(small):
    model, tokenizer, _ = small
    queries = ["Māori  population of New Zealand", "rain"]
    text = mlx_t5.generate(model, tokenizer, queries, max_new_tokens=8)
    assert text == mlx_t5.generate(model, tokenizer, [format_source(q) for q in queries], raw=True, max_new_tokens=8)
    assert text == mlx_t5.generate(model, tokenizer, ["reformulate: Maori population of New Zealand", "rain"],
                                   raw=True, max_new_tokens=8)[:1] + text[1:]
    assert text != mlx_t5.generate(model, tokenizer, queries, raw=True, max_new_tokens=8)
    ids = mlx_t5.generate_tokens(model, tokenizer([format_source(queries[0])], return_tensors="np")["input_ids"],
                                 max_new_tokens=8)
    assert text[0] == tokenizer.decode(ids[0], skip_special_tokens=True)


def test_generate_text_batches_and_orders_return_sequences(small):
    model, tokenizer, _ = small
    best = mlx_t5.generate(model, tokenizer, QUERIES[:5], num_beams=3, max_new_tokens=6)
    two = mlx_t5.generate(model, tokenizer, QUERIES[:5], num_beams=3, num_return_sequences=2, max_new_tokens=6,
                          batch_size=2)
    assert len(two) == 10 and two[0::2] == best
    assert mlx_t5.generate(model, tokenizer, []) == []


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, top_p=0.95, seed=3)], ids=["greedy", "sampled"])
def test_stream_joins_to_the_generated_text(small, options):
    model, tokenizer, _ = small
    for query in QUERIES[:3]:
        pieces = list(mlx_t5.stream_generate(model, tokenizer, query, max_new_tokens=24, **options))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == mlx_t5.generate(model, tokenizer, [query], max_new_tokens=24, **options)[0]


@pytest.mark.parametrize("options,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "greedy"),
    (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0, temperature=1.0), "top_p"),
    (dict(top_k=-3, temperature=1.0), "top_k"),
    (dict(num_beams=2, temperature=0.5), "deterministic"),
])
def test_bad_options_are_clear_errors(small, options, match):
    model, tokenizer, _ = small
    with pytest.raises(ValueError, match=match):
        mlx_t5.generate(model, tokenizer, ["rain"], **options)


def test_bad_inputs_are_clear_errors(small):
    model, tokenizer, _ = small
    with pytest.raises(TypeError, match="list of strings"):
        mlx_t5.generate(model, tokenizer, "rain")
    with pytest.raises(ValueError, match="rectangular"):
        mlx_t5.generate_tokens(model, [[5, 6, 1], [5, 1]])
    with pytest.raises(ValueError, match="attention_mask shape"):
        mlx_t5.generate_tokens(model, np.ones((2, 5), np.int32), np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="num_beams"):
        next(mlx_t5.stream_generate(model, tokenizer, "rain", num_beams=2))


def cli_main(argv) -> int:
    # run_module, not `import mlx_t5.generate`: importing the CLI module would rebind the package attribute
    # `mlx_t5.generate` (the function) to the module for the whole session
    return runpy.run_module("mlx_t5.generate", run_name="cli_under_test")["main"](argv)


def test_cli_prints_numbered_subqueries(small, capsys):
    _, _, folder = small
    code = cli_main(["--model", str(folder), "--max-new-tokens", "6", "--beams", "2",
                              "capital of France", "rain"])
    out = capsys.readouterr().out
    assert code == 0
    assert "capital of France" in out and "rain" in out
    assert out.count("1.") >= 2


def test_cli_refuses_options_beyond_the_shared_limits(capsys):
    from reformulation.engine import LIMITS

    assert cli_main(["--model", "unused", "--beams", str(LIMITS.max_beams + 1), "rain"]) == 2
    assert f"num_beams must be an integer >= 1 and <= {LIMITS.max_beams}" in capsys.readouterr().err


def test_cli_bad_model_is_one_red_line(tmp_path):
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "mlx_t5.generate", "--model", str(not_a_model), "rain"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(not_a_model) in lines[0], lines


def test_generate_is_the_function_not_the_cli_module():
    assert callable(mlx_t5.generate) and mlx_t5.generate.__module__ == "mlx_t5.generation"
