"""The torch engines (reformulation.engine's contract): `--backend torch` (float) and `--backend torch-int8`."""

import time
from typing import Optional

import torch
from transformers.utils import logging as hf_logging

from reformulation.engine import Engine, EngineError, first_line

from .infer import InferError, generate, load, stream_generate
from .int8 import Int8Linear, QuantizeError, is_int8_folder, quantize_model


class TorchEngine(Engine):
    """An HF folder, PEFT adapter folder or int8 folder; `quantize=True` serves int8 dynamic (an HF folder
    is quantized on load, so the torch-int8 backend always means int8)."""

    def __init__(self, quantize: bool = False):
        super().__init__()
        self.quantize = quantize
        self.name = "torch-int8" if quantize else "torch"

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None, device: Optional[str] = None) -> "TorchEngine":
        """threads: torch-int8 defaults to 1: its int8 matmuls of one decoding row are too small to split
        (2 threads: p50 347 ms against 205 ms, and less throughput at every concurrency,
        BENCHMARKS.md#serving)."""
        if threads is None and self.quantize:
            threads = 1
        if threads is not None:
            self.set_threads(threads)
        start = time.perf_counter()
        int8_folder = is_int8_folder(path)
        if int8_folder and not self.quantize:
            raise EngineError(f"{path} is an int8 folder: serve it with --backend torch-int8")
        if self.quantize and dtype not in (None, "float32"):
            raise EngineError(f"torch-int8 runs int8 weights with fp32 activations; dtype {dtype!r} does not apply")
        hf_logging.disable_progress_bar()  # a server log / REPL is no place for "Loading weights" bars
        try:
            model, tok = load(path, device=device or ("cpu" if self.quantize else None), dtype=dtype,
                              tokenizer=tokenizer)
            if self.quantize and not int8_folder:
                if next(model.parameters()).device.type != "cpu":
                    raise EngineError("torch-int8 is the CPU serving path; load the model on cpu")
                quantize_model(model)
        except (InferError, QuantizeError) as err:
            raise EngineError(str(err)) from None
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: could not load ({type(err).__name__}: {first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        self.options = {"dtype": "int8" if self.quantize else str(next(model.parameters()).dtype).split(".")[-1]}
        self.load_seconds = time.perf_counter() - start
        return self

    def set_threads(self, threads: int) -> None:
        """torch intra-op threads (process-wide)."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EngineError(f"threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)

    def _generate(self, queries, options):
        # min_new_tokens = max_new_tokens masks EOS until the end: exactly max_new_tokens tokens
        extra = {"min_new_tokens": options.max_new_tokens} if options.ignore_eos else {}
        return generate(self.model, self.tokenizer, queries, num_beams=options.num_beams,
                        max_new_tokens=options.max_new_tokens, temperature=options.temperature, **extra)

    def _stream(self, query, options):
        yield from stream_generate(self.model, self.tokenizer, query, max_new_tokens=options.max_new_tokens,
                                   temperature=options.temperature)

    def _details(self):
        model, config = self.model, self.model.config
        # int8 weights are buffers; a tied head quantized to int8 is a copy of the embedding, not more weights
        # (transformers 5 keeps tie_word_embeddings True in memory; scale_decoder_outputs keeps the saved choice)
        tied_head = model.lm_head if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings) else None
        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        return {"parameters": model.num_parameters() + sum(m.weight.numel() for m in int8 if m is not tied_head),
                "d_model": config.d_model, "layers": [config.num_layers, config.num_decoder_layers],
                "int8_linear_layers": len(int8), "device": str(next(model.parameters()).device),
                "torch_threads": torch.get_num_threads()}

