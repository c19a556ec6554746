"""MLX speculative decoding (mlx_t5.generation.speculative_tokens): plain greedy's tokens, padded batch with
rows ending at different steps, drafts accepted several at a time and drafts partly rejected (cache
rolled back); the engine answers alike with it on and off."""

import pytest

from hf_models import QUERIES, ending_model, save_model

pytestmark = pytest.mark.usefixtures("blas_one_thread")


def test_mlx_speculative_is_plain_greedy(tokenizer, tmp_path):
    from mlx_t5.generation import generate_tokens, speculative_tokens
    from mlx_t5.utils import load_model

    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    ending_model("odd-heads", False, batch).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    plain = generate_tokens(model, ids, mask, max_new_tokens=24)
    assert len({len(r) for r in plain}) > 1  # rows end at different steps
    assert generate_tokens(model, ids, mask, max_new_tokens=24, speculative=True) == plain
    by_source = {tuple(i[m == 1].tolist()): row for i, m, row in zip(ids, mask, plain)}

    class Oracle:  # drafts plain greedy's own continuation, every 4th token changed when corrupt
        def __init__(self, corrupt):
            self.corrupt = corrupt

        def row(self, source):
            def draft(tokens, k):
                done = len(tokens) - 1
                row = by_source[tuple(source)][done:done + k]
                return [t + 1 if self.corrupt and (done + j) % 4 == 3 else t for j, t in enumerate(row)]
            return draft

    for corrupt in (False, True):
        stats = {}
        got = speculative_tokens(model, ids, mask, 24, draft_tokens=5, drafts=Oracle(corrupt), stats=stats)
        assert got == plain
        assert stats["passes"] < stats["tokens"]  # several tokens per pass, rejections included


def test_mlx_engine_same_answers_on_and_off(tokenizer_dir, tmp_path):
    from mlx_t5.engine import MLXEngine

    folder = save_model("odd-heads", tmp_path / "hf", tokenizer_dir, seed=3)
    on, off = MLXEngine().load(folder), MLXEngine().load(folder, speculative=False)
    assert on.describe()["speculative"] is True and off.describe()["speculative"] is False  # float32: on by default
    assert MLXEngine().load(folder, dtype="bfloat16").describe()["speculative"] is False  # rounding: off unless asked
    assert on.generate(QUERIES, max_new_tokens=20) == off.generate(QUERIES, max_new_tokens=20)


def test_chat_speculative_flag(tokenizer_dir, tmp_path):
    """chat.py --speculative reaches the engine (and is ignored by backends without it)."""
    from rich.console import Console

    from serving.chat import Chat

    folder = save_model("odd-heads", tmp_path / "hf", tokenizer_dir, seed=3)
    chat = Chat(Console(quiet=True), "mlx", str(folder), speculative=True)
    chat.load("mlx", str(folder))
    assert chat.backend.describe()["speculative"] is True
