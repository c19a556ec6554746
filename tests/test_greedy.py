"""torch_t5.greedy: the written-out greedy loop gives model.generate's tokens (fp32 and int8, all shapes)."""

import gc
import weakref

import pytest
import torch

from hf_models import QUERIES, SHAPES, ending_model, hf_generate, make_model
from torch_t5 import infer
from torch_t5.greedy import GreedyDecoder, decoder_for, supported


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest: tiny matmuls, one thread


def batch_of(tokenizer, queries=QUERIES):
    return tokenizer(queries, return_tensors="pt", padding=True)


def assert_same_tokens(model, batch, got, expected, margin: float = 0.05):
    """Token for token generate's, except that a row may part from it at a near-tie: where the reference's two best
    logits are within `margin`. The loop fuses projections and keeps its own cache, so its float32 sums round
    differently from generate's wherever the BLAS picks another kernel for another shape (OpenBLAS on a CPU it has no
    kernels for, e.g. AMD Zen 5: int8 re-quantization then turns a 0.01 logit gap into another token)."""
    width = min(got.shape[1], expected.shape[1])
    parted = False
    for row in range(expected.shape[0]):
        diff = (got[row, :width] != expected[row, :width]).nonzero()
        if not len(diff):
            continue
        t = diff[0].item()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"][row:row + 1],
                           attention_mask=batch["attention_mask"][row:row + 1],
                           decoder_input_ids=expected[row:row + 1, :t]).logits[0, -1]
        top = logits.topk(2).values
        assert top[0] - top[1] < margin, f"row {row} parts from generate at token {t}, not at a near-tie: {top}"
        parted = True
    assert got.shape == expected.shape or parted, (got.shape, expected.shape)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_same_tokens_as_generate(shape, int8, tokenizer):
    batch = batch_of(tokenizer)
    model = ending_model(shape, int8, batch)
    expected = hf_generate(model, batch, max_new_tokens=24)
    eos = model.config.eos_token_id
    ended = (expected == eos).any(dim=1)
    assert ended.any() and not ended.all(), expected  # not vacuous: some rows end early, some run on
    got = GreedyDecoder(model)(batch["input_ids"], batch["attention_mask"], max_new_tokens=24)
    assert_same_tokens(model, batch, got, expected)

    # min_new_tokens masks EOS until then: exactly that many tokens, like generate(min_new_tokens=...)
    expected = hf_generate(model, batch, max_new_tokens=16, min_new_tokens=16)
    got = GreedyDecoder(model)(batch["input_ids"], batch["attention_mask"], max_new_tokens=16, min_new_tokens=16)
    assert got.shape == (len(QUERIES), 17)
    assert_same_tokens(model, batch, got, expected)


def test_steps_stream_and_stop(tokenizer):
    model = make_model("odd-heads")
    batch = batch_of(tokenizer, QUERIES[:1])
    decoder = GreedyDecoder(model)
    full = decoder(batch["input_ids"], max_new_tokens=12)
    streamed = [ids.clone() for ids in decoder.steps(batch["input_ids"], max_new_tokens=12)]
    assert torch.equal(torch.stack(streamed, dim=1), full[:, 1:])
    seen = []
    stopped = decoder(batch["input_ids"], max_new_tokens=12, on_token=lambda ids: seen.append(ids) or len(seen) < 3)
    assert stopped.shape == (1, 4) and torch.equal(stopped, full[:, :4])


def test_supported_only_where_the_loop_is_exact():
    model = make_model("odd-heads")
    assert supported(model)
    assert decoder_for(model) is decoder_for(model)  # built once per model
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the cache does not keep a dropped model (chat's /model) alive
    model = make_model("odd-heads")
    model.generation_config.repetition_penalty = 1.3  # generate() would add a processor the loop lacks
    assert not supported(model)
    assert not supported(make_model("odd-heads").train())
    assert not supported(make_model("odd-heads").to(torch.bfloat16))
    with pytest.raises(ValueError, match="eval mode"):
        GreedyDecoder(make_model("odd-heads").train())


def test_infer_generate_fast_equals_generate(tokenizer):
    queries = QUERIES[:4]
    model = ending_model("flan-small", True, batch_of(tokenizer, queries))
    fast = infer.generate(model, tokenizer, queries, max_new_tokens=20)
    slow = infer.generate(model, tokenizer, queries, max_new_tokens=20, fast=False)
    assert fast == slow and any(fast)
    model.generation_config.repetition_penalty = 1.3  # falls back to generate(), which applies it
    penalised = infer.generate(model, tokenizer, queries, max_new_tokens=20)
    assert penalised == infer.generate(model, tokenizer, queries, max_new_tokens=20, fast=False)
    assert penalised != fast
