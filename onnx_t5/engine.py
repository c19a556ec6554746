"""The ONNX Runtime engine (reformulation.engine's contract): `--backend onnx`, CPU, int8 weights."""

import tempfile
import time
from pathlib import Path
from typing import Optional

from reformulation.data import format_source, text_pieces
from reformulation.engine import Engine, EngineError, first_line
from reformulation.speculative import Drafts

from .export import DEFAULT_BITS, ExportError, export
from .runtime import OnnxLoadError, OnnxT5, is_onnx_folder, load


class OnnxEngine(Engine):
    """onnx_t5: greedy, sampling and beam search with MatMulNBits int8 weights. Loads a folder written by
    `python -m convert to-onnx`, or exports an HF folder / hub id on load (a few seconds; into a temporary
    folder that lives as long as the engine)."""

    name = "onnx"

    def __init__(self):
        super().__init__()
        self.exact_batches = True
        self.speculative = False
        self._drafts = None
        self.threads = 1  # one decoding row is too small to split (BENCHMARKS.md#serving)

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None, exact_batches: bool = True, speculative: Optional[bool] = None,
             bits: Optional[int] = None) -> "OnnxEngine":
        """dtype: None = quantized (or as the ONNX folder was exported), "float32" = export without quantizing;
        bits: of an HF model exported on load (8 when None; 4: --bits 4).
        exact_batches (default): generate the queries of a batch one by one, so an answer never depends on
        what it was batched with; False: as one batch, ~2.2x the throughput with 32 clients, but a near-tie
        token can then come out differently (7 of 400 queries, BENCHMARKS.md).
        speculative: greedy answers with drafts looked up in the question and the model's phrasebook
        (reformulation.speculative), checked several tokens per decoder pass: the same answers as plain greedy in
        float32; in int8 a near-tie token can come out differently, since MLAS rounds a many-row pass unlike a
        one-row step (1 of 300 test questions). None (default): on for float32 weights, off for int8/int4."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise EngineError(f"the onnx backend needs onnxruntime and onnx ({err}); pip install -e '.[serve]'") \
                from None
        if threads is not None:
            self.set_threads(threads)
        if dtype not in (None, "float32"):
            raise EngineError(f"the onnx backend runs int8 or float32 weights; dtype {dtype!r} does not apply")
        start = time.perf_counter()
        folder = Path(path).expanduser()
        try:
            if is_onnx_folder(folder):
                if dtype == "float32" or bits is not None:
                    raise EngineError(f"{path} is an exported ONNX folder: its dtype and bits were chosen at export")
            else:
                self._exported = tempfile.TemporaryDirectory(prefix="onnx-t5-")
                folder = export(path, Path(self._exported.name) / "model", quantize=dtype != "float32",
                                bits=DEFAULT_BITS if bits is None else bits,
                                tokenizer=tokenizer)
            model, tok = load(folder, threads=self.threads, tokenizer=tokenizer)
        except (ExportError, OnnxLoadError) as err:
            raise EngineError(str(err)) from None
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: could not load ({type(err).__name__}: {first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        quantization = model.info.get("quantization")
        if speculative is None:  # on where exact: float32 (int8's many-row kernel rounds unlike its one-row one)
            speculative = quantization is None and model.many
        if speculative and not model.many:
            raise EngineError(f"{path} was exported with a one-position decoder: re-export it (`python -m convert "
                              "to-onnx`) for speculative decoding")
        self.options = {"dtype": f"int{quantization['bits']}" if quantization else "float32",
                        "exact_batches": exact_batches, "speculative": speculative}
        self.exact_batches, self.speculative = exact_batches, speculative
        try:
            self._drafts = Drafts.for_model(tok, folder) if speculative else None
        except ValueError as err:
            raise EngineError(str(err)) from None
        self.load_seconds = time.perf_counter() - start
        return self

    def set_threads(self, threads: int) -> None:
        """ONNX Runtime intra-op threads: a session option, so a loaded model's sessions are made again."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EngineError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        if self.loaded and self.model.threads != threads:
            self.model = OnnxT5(self.model.folder, threads=threads)

    def _encode(self, queries):
        batch = self.tokenizer([format_source(q) for q in queries], return_tensors="np", padding=True)
        return batch["input_ids"], batch["attention_mask"]

    def _generate(self, queries, options):
        # MLAS's int8 kernels take rows in pairs and a lone row on another path (other rounding): a query's
        # answer would depend on its batch at near-ties. exact_batches keeps every query on the one-row path.
        groups = [[q] for q in queries] if self.exact_batches else [queries]
        return [text for group in groups for text in self._generate_batch(group, options)]

    def _generate_batch(self, queries, options):
        ids, mask = self._encode(queries)
        min_new = options.max_new_tokens if options.ignore_eos else 0
        if options.num_beams > 1:
            out = self.model.beam_search(ids, mask, max_new_tokens=options.max_new_tokens,
                                         num_beams=options.num_beams, min_new_tokens=min_new)
        elif self.speculative and options.temperature == 0 and not min_new:
            out = self.model.speculative(ids, mask, max_new_tokens=options.max_new_tokens, drafts=self._drafts)
        else:
            out = self.model.generate(ids, mask, max_new_tokens=options.max_new_tokens,
                                      temperature=options.temperature, min_new_tokens=min_new)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _stream(self, query, options):
        ids, mask = self._encode([query])
        steps = self.model.steps(ids, mask, max_new_tokens=options.max_new_tokens, temperature=options.temperature)
        yield from text_pieces(self.tokenizer, (int(step[0]) for step in steps))

    def _details(self):
        import onnxruntime

        return {**self.model.describe(), "onnxruntime": onnxruntime.__version__}
