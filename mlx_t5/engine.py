"""The MLX engine (reformulation.engine's contract): `--backend mlx` of chat and the HTTP API."""

import time
from pathlib import Path
from typing import Optional

import mlx.core as mx

from reformulation.engine import Engine, EngineError, first_line

from . import blas
from .generation import generate, stream_generate
from .utils import LoadError, load


class MLXEngine(Engine):
    """An HF-layout folder (fp32/bf16 or MLX-quantized), a hub id, or an mlx_t5 LoRA adapter folder (its
    base_model is loaded and the adapters fused in)."""

    name = "mlx"

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None, speculative: Optional[bool] = None) -> "MLXEngine":
        """speculative: greedy answers by speculative decoding (reformulation.speculative: drafts looked up in
        the question and the model's phrasebook, checked several per decoder pass). None (default): on for
        float32 weights, where a pass over several positions gives the one-position logits (the same answers,
        tested), off for quantized or half-precision ones, whose many-row rounding can flip a near-tie."""
        if threads is not None:
            self.set_threads(threads)
        start = time.perf_counter()
        folder = Path(path).expanduser()
        try:
            if (folder / "adapters.safetensors").is_file():
                model, tok = _load_fused_adapter(folder, dtype, tokenizer)
            else:
                model, tok = load(path, dtype=dtype, tokenizer=tokenizer)
        except LoadError as err:
            raise EngineError(str(err)) from None
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: could not load ({type(err).__name__}: {first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        from reformulation.speculative import Drafts

        self.speculative = _is_float32(model) if speculative is None else bool(speculative)
        try:
            self._drafts = Drafts.for_model(tok, folder) if self.speculative else None
        except ValueError as err:
            raise EngineError(str(err)) from None
        self.options = {"dtype": dtype or _dtype_name(model), "speculative": self.speculative}
        self.load_seconds = time.perf_counter() - start
        return self

    def set_threads(self, threads: int) -> None:
        """OpenBLAS threads on Linux (process-wide); MLX's own CPU ops are single-threaded."""
        try:
            blas.set_threads(threads)
        except (ValueError, RuntimeError) as err:
            raise EngineError(f"threads: {err}") from None

    def _generate(self, queries, options):
        # ignore_eos (benchmarks): EOS masked, exactly max_new_tokens tokens per query
        texts = generate(self.model, self.tokenizer, queries, num_beams=options.num_beams,
                         max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                         ignore_eos=options.ignore_eos, speculative=self.speculative, drafts=self._drafts)
        return [t.strip() for t in texts]

    def _stream(self, query, options):
        yield from stream_generate(self.model, self.tokenizer, query, max_new_tokens=options.max_new_tokens,
                                   temperature=options.temperature)

    def _details(self):
        from mlx_lm.utils import get_total_parameters  # imports transformers: only when described

        args = self.model.args
        # a quantized weight counts as the float weights it packs, its scales and biases as none
        return {"parameters": get_total_parameters(self.model), "d_model": args.d_model,
                "layers": [args.num_layers, args.num_decoder_layers], "quantization": args.quantization,
                "device": str(mx.default_device()), "blas": blas.STATE.config, "blas_threads": blas.get_threads()}


def _load_fused_adapter(folder: Path, dtype, tokenizer):
    """Base model named in adapter_config.json + the adapters, fused: plain-speed inference."""
    from .lora import fuse_lora, load_adapters, read_adapter_config

    base = read_adapter_config(folder).get("base_model")
    if not base:
        raise EngineError(f"{folder / 'adapter_config.json'}: no base_model, so there is nothing to apply it to")
    # the trainer may save the tokenizer beside the adapter; else the base model's
    own_tokenizer = (folder / "tokenizer_config.json").is_file()
    model, tok = load(base, dtype=dtype, tokenizer=tokenizer or (str(folder) if own_tokenizer else None))
    return fuse_lora(load_adapters(model, folder)), tok


def _is_float32(model) -> bool:
    """float32 weights everywhere (no MLX-quantized layer): speculative decoding is exact there."""
    import mlx.nn as nn

    return _dtype_name(model) == "float32" and not any(isinstance(m, nn.QuantizedLinear)
                                                        for _, m in model.named_modules())


def _dtype_name(model) -> str:
    dtype = model.shared.weight.dtype
    return {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, str(dtype))
