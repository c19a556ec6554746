"""MLX T5 vs transformers' T5ForConditionalGeneration (the oracle) on random-init models."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import QUERIES, SHAPES, make_model, save_model
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

import mlx_t5
from mlx_t5.model import relative_position_bucket, token_loss

TARGETS = ["Nikola Tesla lifespan|Milutin Milankovic lifespan", "capital of France", "telephone invention|penicillin discovery",
           "Maori population New Zealand", "Eiffel Tower height", "Apple founders|Microsoft founders|Google founders",
           "rain", "Japan GDP 2020|Germany GDP 2020", "Amazon river length|Nile length"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(["reformulate: " + q for q in QUERIES], padding=True, return_tensors="np")
    labels = tokenizer(TARGETS, padding=True, return_tensors="np")["input_ids"]
    dec = np.zeros_like(labels)  # shift right: decoder_start = pad = 0
    dec[:, 1:] = labels[:, :-1]
    assert len(set(enc["attention_mask"].sum(1))) > 4, "the batch must mix input lengths"
    return enc["input_ids"], enc["attention_mask"], dec


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory, tokenizer_dir):
    """(hf_model, mlx_model, folder) for one shape, the MLX one loaded from the HF-saved folder."""
    folder = save_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
    model, _ = mlx_t5.load(folder)
    return hf, model, folder


def hf_logits(hf, ids, mask, dec):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec)).logits.numpy()


def test_logits_match_transformers_on_padded_batch(pair, batch):
    hf, model, _ = pair
    ids, mask, dec = batch
    expected = hf_logits(hf, ids, mask, dec)
    got = np.array(model(mx.array(ids), mx.array(dec), mx.array(mask)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_padding_does_not_change_a_row(pair, batch, tokenizer):
    """A query's logits are the same alone and inside a padded batch (the encoder mask works)."""
    _, model, _ = pair
    ids, mask, dec = batch
    n = int(mask[1].sum())
    alone = model(mx.array(ids[1:2, :n]), mx.array(dec[1:2]))
    padded = model(mx.array(ids), mx.array(dec), mx.array(mask))[1:2]
    assert np.abs(np.array(alone) - np.array(padded)).max() <= 1e-4


def test_incremental_decode_with_cache_equals_full_decode(pair, batch):
    _, model, _ = pair
    ids, mask, dec = batch
    ids, mask, dec = mx.array(ids), mx.array(mask), mx.array(dec)
    memory = model.encode(ids, mask)
    full = model.decode(dec, memory, mask)
    cache = model.make_cache()
    steps = [model.decode(dec[:, t:t + 1], memory, mask, cache) for t in range(dec.shape[1])]
    assert cache[0].cross is not None and cache[0].offset == dec.shape[1]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - np.array(full)).max() <= 1e-4


def test_bfloat16_stays_close(pair, batch):
    hf, _, folder = pair
    ids, mask, dec = batch
    expected = hf_logits(hf, ids, mask, dec)
    model, _ = mlx_t5.load(folder, dtype="bfloat16")
    assert model.shared.weight.dtype == mx.bfloat16
    got = np.array(model(mx.array(ids), mx.array(dec), mx.array(mask)).astype(mx.float32))
    # bf16 keeps 8 mantissa bits: errors relative to the logit scale, not absolute 1e-4
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 0.05, rel
    print(f"bf16 max relative error: {rel:.4f}")


def test_save_then_transformers_load_gives_same_logits(pair, batch, tmp_path):
    hf, model, _ = pair
    ids, mask, dec = batch
    out = tmp_path / "saved"
    mlx_t5.save(model, None, out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.args.tie_word_embeddings
    reloaded = T5ForConditionalGeneration.from_pretrained(out).eval()
    assert np.array_equal(hf_logits(reloaded, ids, mask, dec), hf_logits(hf, ids, mask, dec))


@pytest.mark.parametrize("bidirectional,buckets,distance", [(True, 32, 128), (False, 32, 128), (True, 16, 32),
                                                            (False, 16, 32), (True, 8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, buckets, distance):
    rel = np.arange(-600, 601)[None, :]
    expected = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, buckets, distance).numpy()
    got = np.array(relative_position_bucket(mx.array(rel), bidirectional, buckets, distance))
    assert np.array_equal(got, expected)


def test_tied_v1_head_is_scaled_and_untied_is_not(tmp_path):
    tied = mlx_t5.ModelArgs.from_dict(make_model("v1-relu-tied").config.to_dict())
    assert tied.tie_word_embeddings and not tied.is_gated and tied.activation == "relu"
    flan = mlx_t5.ModelArgs.from_dict(make_model("odd-heads").config.to_dict())
    assert not flan.tie_word_embeddings and flan.is_gated and flan.activation == "gelu_new"
    assert "lm_head" not in mlx_t5.Model(tied) and "lm_head" in mlx_t5.Model(flan)


def test_unknown_config_keys_are_ignored_and_kept():
    args = mlx_t5.ModelArgs.from_dict({"d_model": 64, "num_layers": 1, "some_future_key": 3})
    assert args.extra == {"some_future_key": 3} and args.num_decoder_layers == 1


def test_unsupported_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        mlx_t5.ModelArgs(feed_forward_proj="gated-swish-x")


def test_pytorch_bin_checkpoint_loads(tmp_path, batch, tokenizer_dir):
    """The legacy pickle format, read with torch.load(weights_only=True)."""
    hf = make_model("v1-relu-tied")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # includes the tied aliases, as old files do
    ids, mask, dec = batch
    model, _ = mlx_t5.load(tmp_path, tokenizer=str(tokenizer_dir))
    got = np.array(model(mx.array(ids), mx.array(dec), mx.array(mask)))
    assert np.abs(got - hf_logits(hf, ids, mask, dec)).max() <= 1e-4


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(monkeypatch):
    """A hub id goes through huggingface_hub; offline (as here and in CI) it fails with one message naming it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mlx_t5.LoadError, match="'no-such-org/flan-t5-nothing' is not a local folder"):
        mlx_t5.load("no-such-org/flan-t5-nothing")


def test_missing_and_misshapen_tensors_are_listed(tmp_path, tokenizer_dir):
    from safetensors.numpy import load_file, save_file

    folder = save_model("v1-relu-tied", tmp_path / "m", tokenizer_dir)
    weights = load_file(folder / "model.safetensors")
    del weights["decoder.final_layer_norm.weight"]
    weights["encoder.final_layer_norm.weight"] = np.ones(3, np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mlx_t5.LoadError) as err:
        mlx_t5.load(folder)
    assert "missing tensors (1): decoder.final_layer_norm.weight" in str(err.value)
    assert "encoder.final_layer_norm.weight (3,) != (64,)" in str(err.value)


# -- the training loss (mlx_t5.model.token_loss, under loss_fn and the trainer's step) ---------------

def test_token_loss_hand_checked():
    # row [0, ln 3] -> softmax [1/4, 3/4]: label 1 costs -ln(3/4), label 0 costs ln 4
    logits = mx.array([[[0.0, math.log(3)], [0.0, math.log(3)], [50.0, -50.0]]])
    total, count = token_loss(logits, mx.array([[1, 0, -100]]))  # the padded position would cost 100 if counted
    assert count.item() == 2
    assert total.item() / 2 == pytest.approx((-math.log(0.75) + math.log(4)) / 2, rel=1e-6)
    # counting the pad position (what the original project did) gives a different number
    total, count = token_loss(logits, mx.array([[1, 0, 1]]))
    assert total.item() / count.item() == pytest.approx((-math.log(0.75) + math.log(4) + 100) / 3, rel=1e-6)


def test_token_loss_is_stable_for_large_logits():
    total, count = token_loss(mx.array([[1e4, 0.0], [0.0, 1e4]]), mx.array([0, 0]))
    assert total.item() / count.item() == pytest.approx(1e4 / 2)


def test_token_loss_and_its_gradient_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
    labels = rng.integers(0, 11, size=(3, 5))
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    reference = torch.from_numpy(logits).requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference.reshape(-1, 11), torch.from_numpy(labels).reshape(-1),
                                                 ignore_index=-100)
    expected.backward()

    for keep_softmax in (True, False):  # the custom vjp (training) and plain autodiff (loss_fn)
        def mean(x):
            total, count = token_loss(x, mx.array(labels), keep_softmax=keep_softmax)
            return total / count

        value, grad = mx.value_and_grad(mean)(mx.array(logits))
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        np.testing.assert_allclose(np.array(grad), reference.grad.numpy(), atol=1e-6)
