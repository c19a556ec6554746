"""Generation with the two graphs of onnx_t5.export in ONNX Runtime: numpy on the host, no torch.

    from onnx_t5 import load
    model, tokenizer = load("runs/base/onnx")             # a folder written by onnx_t5.export
    ids = model.generate(input_ids, attention_mask, max_new_tokens=64)   # like transformers' generate

Each step feeds the decoder graph the encoder's per-layer cross-attention K/V and the previous step's
``present`` K/V as its ``past`` (ONNX Runtime's MultiHeadAttention appends the new position).
"""

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from reformulation.engine import first_line
from reformulation.io import read_json_object

from .export import FORMAT, MARKER, cache_names


class OnnxLoadError(RuntimeError):
    """A folder that is not a loadable onnx_t5 export; the message says what is missing."""


class OnnxT5:
    """An exported T5: greedy decoding, sampling and beam search over two ONNX Runtime sessions.

    Each call keeps its cache in its own feed dict, and ONNX Runtime sessions may run concurrently, so
    calls from several threads do not interfere (api.py still drives one from a single worker).
    """

    def __init__(self, folder, threads: int = 1):
        import onnxruntime as ort

        folder = Path(folder).expanduser()
        self.folder = folder
        self.info = _read_json(folder / MARKER)
        if self.info.get("format") != FORMAT:
            raise OnnxLoadError(f"{folder / MARKER}: format {self.info.get('format')!r}, expected {FORMAT!r}")
        self.config = _read_json(folder / "config.json")
        gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", self.config.get("eos_token_id", 1))
        self.eos = np.array(eos if isinstance(eos, list) else [eos], np.int64)
        self.pad = gen.get("pad_token_id", self.config.get("pad_token_id", 0))
        self.start = gen.get("decoder_start_token_id", self.config.get("decoder_start_token_id", 0))
        self.layers = self.config.get("num_decoder_layers") or self.config["num_layers"]
        self.heads, self.d_kv = self.config["num_heads"], self.config["d_kv"]
        self.threads = threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # ORT's warnings about unused initializers are not the user's business
        sessions = []
        for name in ("encoder.onnx", "decoder.onnx"):
            if not (folder / name).is_file():
                raise OnnxLoadError(f"{folder}: no {name} (write the folder with `python -m convert to-onnx`)")
            try:
                sessions.append(ort.InferenceSession(str(folder / name), options,
                                                     providers=["CPUExecutionProvider"]))
            except Exception as err:  # onnxruntime raises its own exception types
                raise OnnxLoadError(f"{folder / name}: onnxruntime cannot load it ({first_line(err)})") from None
        self.encoder, self.decoder = sessions
        self._cross, self._past = cache_names(self.layers, "cross"), cache_names(self.layers, "past")
        self.many = self.info.get("decoder_positions") == "many"  # n positions per pass (speculative decoding)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """Every decoder layer's cross-attention key and value, (batch, heads, source, d_kv) each."""
        return self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})

    def begin(self, input_ids, attention_mask=None, repeat: int = 1) -> dict:
        """The decoder feed before the first step: the encoder's outputs and an empty past (each row
        repeated `repeat` times: beams). Pass it to step() position by position."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        cross = self.encode(input_ids, attention_mask)
        if repeat > 1:
            cross = [np.repeat(kv, repeat, axis=0) for kv in cross]
            attention_mask = np.repeat(attention_mask, repeat, axis=0)
        B = attention_mask.shape[0]
        empty = np.zeros((B, self.heads, 0, self.d_kv), np.float32)
        return {"attention_mask": attention_mask, **dict(zip(self._cross, cross)),
                **{name: empty for name in self._past}}

    def step(self, feed: dict, ids: np.ndarray, t: int) -> np.ndarray:
        """Run position t for ids; the feed's past becomes the new present. Returns (rows, vocab) logits."""
        if not self.many:  # a folder exported before multi-position decoders: (B,) ids, (t + 1,) distances
            feed["input_ids"], feed["distances"] = ids, np.arange(t, -1, -1, dtype=np.int64)
            logits, *present = self.decoder.run(None, feed)
            feed.update(zip(self._past, present))
            return logits
        return self.decode(feed, ids[:, None], t)[:, 0]

    def decode(self, feed: dict, ids: np.ndarray, t: int) -> np.ndarray:
        """Run positions t .. t + n - 1 for ids (rows, n) in one pass, each attending to the past and to the new
        positions before it; the feed's past grows by n. Returns (rows, n, vocab) logits."""
        if not self.many:
            raise OnnxLoadError(f"{self.folder} was exported with a one-position decoder: re-export it with "
                                "`python -m convert to-onnx` for speculative decoding")
        n = ids.shape[1]
        feed["input_ids"] = np.ascontiguousarray(ids, dtype=np.int64)
        feed["distances"] = np.arange(t, t + n, dtype=np.int64)[:, None] - np.arange(t + n, dtype=np.int64)[None]
        logits, *present = self.decoder.run(None, feed)
        feed.update(zip(self._past, present))
        return logits

    def truncate(self, feed: dict, length: int) -> None:
        """Keep the first `length` positions of the feed's past (drop the K/V of rejected draft tokens)."""
        for name in self._past:
            if feed[name].shape[2] > length:
                feed[name] = np.ascontiguousarray(feed[name][:, :, :length])

    def speculative(self, input_ids, attention_mask=None, max_new_tokens: int = 64, draft_tokens: Optional[int] = None,
                    stats: Optional[dict] = None, drafts=None) -> np.ndarray:
        """Greedy decoding with looked-up drafts (reformulation.speculative), row by row: each row's tokens as
        generate() gives them for that row alone (decoder start first, rows that ended padded), in fewer decoder
        passes. `stats` (a dict) receives the passes and tokens; `drafts`: a speculative.Drafts (default: prompt
        lookup by id, no phrasebook)."""
        from reformulation.speculative import DRAFT_TOKENS, Drafts, greedy

        drafts = drafts or Drafts()

        input_ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        rows = []
        for ids, row_mask in zip(input_ids, mask):
            keep = row_mask.astype(bool)
            feed = self.begin(ids[keep][None], row_mask[keep][None])

            def decode(tokens: list[int], t: int) -> np.ndarray:
                return self.decode(feed, np.array([tokens], np.int64), t)[0]

            rows.append(greedy(decode, lambda length: self.truncate(feed, length), self.start, self.eos.tolist(),
                               max_new_tokens, drafts.row(ids[keep].tolist()), draft_tokens or DRAFT_TOKENS, stats))
        width = max(map(len, rows))
        return np.array([row + [self.pad] * (width - len(row)) for row in rows], np.int64)

    def steps(self, input_ids, attention_mask=None, max_new_tokens: int = 64, min_new_tokens: int = 0,
              temperature: float = 0.0, rng: Optional[np.random.Generator] = None) -> Iterator[np.ndarray]:
        """Yield the (batch,) next token ids step by step until every row has produced EOS (rows that
        ended get pad_token_id). temperature > 0 samples from softmax(logits / temperature)."""
        feed = self.begin(input_ids, attention_mask)
        B = feed["attention_mask"].shape[0]
        ids = np.full((B,), self.start, np.int64)
        unfinished = np.ones(B, bool)
        if temperature > 0 and rng is None:
            rng = np.random.default_rng()
        for t in range(max_new_tokens):
            logits = self.step(feed, ids, t)
            if t < min_new_tokens:
                logits[:, self.eos] = -np.inf
            ids = _sample(logits, temperature, rng) if temperature > 0 else logits.argmax(axis=-1)
            ids = np.where(unfinished, ids, self.pad)
            yield ids
            unfinished &= ~np.isin(ids, self.eos)
            if not unfinished.any():
                return

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, min_new_tokens: int = 0,
                 temperature: float = 0.0, rng: Optional[np.random.Generator] = None,
                 on_token: Optional[Callable[[np.ndarray], bool]] = None) -> np.ndarray:
        """(batch, 1 + generated) token ids, the decoder start token first and rows that ended padded:
        what transformers' generate returns. on_token(next_ids) returning False stops early."""
        tokens = [np.full((np.shape(input_ids)[0],), self.start, np.int64)]
        for ids in self.steps(input_ids, attention_mask, max_new_tokens, min_new_tokens, temperature, rng):
            tokens.append(ids)
            if on_token is not None and on_token(ids) is False:
                break
        return np.stack(tokens, axis=1)

    def beam_search(self, input_ids, attention_mask=None, max_new_tokens: int = 64, num_beams: int = 4,
                    min_new_tokens: int = 0, length_penalty: float = 1.0, early_stopping=False,
                    num_return_sequences: int = 1) -> list[list[int]]:
        """transformers' beam search (reformulation.beam's bookkeeping): the best num_return_sequences
        token lists per input (decoder start token first, EOS last where one was produced)."""
        from reformulation.beam import BeamSearch

        B, nb = np.shape(input_ids)[0], num_beams
        search = BeamSearch(B, nb, max_new_tokens, self.eos.tolist(), length_penalty, early_stopping)
        feed = self.begin(input_ids, attention_mask, repeat=nb)
        tokens = np.full((B * nb,), self.start, np.int64)
        for t in range(max_new_tokens):
            logits = self.step(feed, tokens, t)
            logp = logits - logits.max(axis=-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
            if t < min_new_tokens:
                logp[:, self.eos] = -np.inf
            scores = (logp + search.running_scores.reshape(-1, 1)).reshape(B, -1)
            top = np.argpartition(-scores, search.candidates - 1, axis=-1)[:, :search.candidates]
            step = search.step(t, np.take_along_axis(scores, top, axis=-1), top, logits.shape[-1])
            if step is None:
                break
            source, tokens = step
            for name in self._past:  # beams never move between inputs
                feed[name] = feed[name][source]
        return [[self.start] + seq for seq in search.sequences(num_return_sequences)]

    def describe(self) -> dict:
        return {"parameters": self.info.get("parameters"), "d_model": self.config["d_model"],
                "layers": [self.config["num_layers"], self.layers], "quantization": self.info.get("quantization"),
                "onnxruntime_threads": self.threads}


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits / temperature) (transformers' do_sample with top_k=0)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[1] - 1)


def _read_json(path: Path) -> dict:
    return read_json_object(path, "a folder written by `python -m convert to-onnx`", OnnxLoadError)


def is_onnx_folder(path) -> bool:
    return (Path(path).expanduser() / MARKER).is_file()


def load(folder, threads: int = 1, tokenizer: Optional[str] = None):
    """(OnnxT5, tokenizer) from a folder written by onnx_t5.export."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OnnxLoadError(f"{folder}: no such folder")
    model = OnnxT5(folder, threads=threads)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or str(folder))
    except (OSError, ValueError) as err:
        raise OnnxLoadError(f"{tokenizer or folder}: no tokenizer ({first_line(err)})") from None
    return model, tok


