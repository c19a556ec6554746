"""One interface over the MLX and PyTorch inference paths, for chat.py and api.py.

    backend = make_backend("mlx").load("runs/base/final")
    backend.generate(["Who lived longer, Tesla or Milankovic?"], num_beams=4)
    # -> ["Nikola Tesla lifespan|Milutin Milankovic lifespan"]
    for piece in backend.stream("Who lived longer, Tesla or Milankovic?"):
        print(piece, end="")

Each backend imports its framework on `load`, so `import backends` stays cheap and works with only
one of mlx / torch installed. Queries go in raw: `format_source` (the training prompt and its
normalisation) is applied inside the generate functions, once. A backend object is not thread safe:
api.py drives it from exactly one worker thread.
"""

import platform
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

BACKENDS = ("mlx", "onnx", "torch-int8", "torch")


def default_backend() -> str:
    """The fastest backend here: MLX on Apple Silicon (Metal), torch on CUDA, ONNX Runtime int8 on other CPUs
    (torch dynamic int8 where onnxruntime is not installed)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return "torch"  # the int8 kernels of onnx / torch-int8 are CPU ones; on CUDA float matmuls win
    # Linux x86 CPU, flan-t5-small shape, 24-token query -> 30 tokens, 1 thread (bench/latency_bench.py,
    # BENCHMARKS.md "Serving"): onnx int8 80 ms, torch-int8 188 ms, MLX fp32 + OpenBLAS 622 ms, torch fp32
    # generate 740 ms. Each token reads the decoder and the 32128 x 512 head: 38 MB of int8 weights; MLX's CPU
    # quantized matmul is slower than its fp32 one there.
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch-int8" if torch is not None else "mlx"
    return "onnx"


class BackendError(RuntimeError):
    """A model that cannot be loaded or options a backend cannot honour; the message says which."""


def add_model_args(parser) -> None:
    """The model flags chat.py and api.py share: --model, --backend, --dtype."""
    parser.add_argument("--model", required=True, help="model folder (HF layout, int8 or adapter) or hub id")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="inference backend (default: mlx on Apple Silicon, torch on CUDA, onnx on other "
                             "CPUs: the fastest measured, see docs/serving.md)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights dtype (default: as saved)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_options(num_beams: int = 1, max_new_tokens: int = 64, temperature: float = 0.0) -> None:
    """Same rules for every backend (and for the chat commands)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise BackendError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BackendError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise BackendError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if temperature > 0 and num_beams > 1:
        raise BackendError("sampling (temperature > 0) and beam search (num_beams > 1) do not mix: choose one")


class Backend:
    """Interface shared by the backends. `load` returns self, so `make_backend(n).load(p)` reads well."""

    name = "base"

    def __init__(self):
        self.model = self.tokenizer = None
        self.path: Optional[str] = None
        self.load_seconds = 0.0
        self.options: dict = {}

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def preload(self) -> None:
        """Import the framework now, in the calling thread (api.py: the main one, before the worker starts)."""

    def load(self, path, **opts) -> "Backend":
        raise NotImplementedError

    def generate(self, queries: list[str], num_beams: int = 1, max_new_tokens: int = 64,
                 temperature: float = 0.0, ignore_eos: bool = False) -> list[str]:
        """One "a|b|c" string per query, in order. ignore_eos (benchmarks): exactly max_new_tokens tokens."""
        self._require()
        queries = self._check_queries(queries)
        check_options(num_beams, max_new_tokens, temperature)
        if not queries:
            return []
        return self._generate(queries, num_beams, max_new_tokens, temperature, ignore_eos)

    def stream(self, query: str, num_beams: int = 1, max_new_tokens: int = 64,
               temperature: float = 0.0) -> Iterator[str]:
        """Text pieces as they are produced (beam search cannot stream: one piece at the end)."""
        self._require()
        self._check_queries([query])
        check_options(num_beams, max_new_tokens, temperature)
        if num_beams > 1:
            yield from self.generate([query], num_beams=num_beams, max_new_tokens=max_new_tokens)
            return
        yield from self._stream(query, max_new_tokens, temperature)

    def _generate(self, queries: list[str], num_beams: int, max_new_tokens: int, temperature: float,
                  ignore_eos: bool) -> list[str]:
        """generate() for checked, non-empty queries and options."""
        raise NotImplementedError

    def _stream(self, query: str, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """stream() of one checked query, greedy or sampled."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.path, "load_seconds": round(self.load_seconds, 3),
                **self.options, **self._details()}

    def _details(self) -> dict:
        return {}

    def _require(self):
        if not self.loaded:
            raise BackendError(f"{self.name} backend: no model loaded (call load(path) first)")

    def _check_queries(self, queries) -> list[str]:
        if isinstance(queries, str):
            raise BackendError("queries must be a list of strings, not one string")
        queries = list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise BackendError(f"query {i} is empty or not a string")
        return queries


class MLXBackend(Backend):
    """mlx_t5: an HF-layout folder (fp32/bf16 or MLX-quantized), a hub id, or an mlx_t5 LoRA adapter folder
    (its base_model is loaded and the adapters fused in)."""

    name = "mlx"

    def preload(self):
        # mlx_t5 preloads OpenBLAS; doing that on a short-lived thread can abort the process at exit
        # ("terminate called without an active exception"), so it happens on the main thread
        import mlx_t5  # noqa: F401

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None) -> "MLXBackend":
        """threads: OpenBLAS threads on Linux (process-wide); MLX's own CPU ops are single-threaded."""
        import mlx_t5  # first: preloads OpenBLAS before mlx itself is imported

        if threads is not None:
            try:
                mlx_t5.blas.set_threads(threads)
            except (ValueError, RuntimeError) as err:
                raise BackendError(f"threads: {err}") from None
        start = time.perf_counter()
        try:
            if (Path(path).expanduser() / "adapters.safetensors").is_file():
                model, tok = _load_mlx_adapter(Path(path).expanduser(), dtype, tokenizer)
            else:
                model, tok = mlx_t5.load(path, dtype=dtype, tokenizer=tokenizer)
        except mlx_t5.LoadError as err:
            raise BackendError(str(err)) from None
        except (OSError, ValueError) as err:
            raise BackendError(f"{path}: could not load ({type(err).__name__}: {_first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        self.options = {"dtype": dtype or _mlx_dtype_name(model)}
        self.load_seconds = time.perf_counter() - start
        return self

    def _generate(self, queries, num_beams, max_new_tokens, temperature, ignore_eos):
        import mlx_t5

        # ignore_eos (benchmarks): EOS masked, exactly max_new_tokens tokens per query
        texts = mlx_t5.generate(self.model, self.tokenizer, queries, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, temperature=temperature, ignore_eos=ignore_eos)
        return [t.strip() for t in texts]

    def _stream(self, query, max_new_tokens, temperature):
        import mlx_t5

        yield from mlx_t5.stream_generate(self.model, self.tokenizer, query, max_new_tokens=max_new_tokens,
                                          temperature=temperature)

    def _details(self):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from mlx_t5 import blas

        args = self.model.args
        return {"parameters": _mlx_parameter_count(dict(tree_flatten(self.model.parameters())), args.quantization),
                "d_model": args.d_model, "layers": [args.num_layers, args.num_decoder_layers],
                "quantization": args.quantization, "device": str(mx.default_device()),
                "blas": blas.STATE.config, "blas_threads": blas.get_threads()}


def _load_mlx_adapter(folder: Path, dtype, tokenizer):
    """Base model named in adapter_config.json + the adapters, fused: plain-speed inference."""
    import mlx_t5
    from mlx_t5.lora import fuse_lora, load_adapters, read_adapter_config

    base = read_adapter_config(folder).get("base_model")
    if not base:
        raise BackendError(f"{folder / 'adapter_config.json'}: no base_model, so there is nothing to apply it to")
    # the trainer may save the tokenizer beside the adapter; else the base model's
    own_tokenizer = (folder / "tokenizer_config.json").is_file()
    model, tok = mlx_t5.load(base, dtype=dtype, tokenizer=tokenizer or (str(folder) if own_tokenizer else None))
    return fuse_lora(load_adapters(model, folder)), tok


def _mlx_parameter_count(params: dict, quantization: Optional[dict]) -> int:
    """Weights of the model as they were in float: a quantized weight packs 32 / bits values per uint32,
    and its scales and biases are bookkeeping, not parameters."""
    total = 0
    for key, value in params.items():
        prefix, _, leaf = key.rpartition(".")
        quantized = f"{prefix}.scales" in params
        if quantized and leaf in ("scales", "biases"):
            continue
        total += value.size * 32 // quantization["bits"] if quantized and leaf == "weight" else value.size
    return total


def _mlx_dtype_name(model) -> str:
    import mlx.core as mx

    dtype = model.shared.weight.dtype
    return {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, str(dtype))


class TorchBackend(Backend):
    """torch_t5: HF folder, PEFT adapter folder or int8 folder; `quantize=True` serves int8 dynamic
    (an HF folder is quantized on load, so the torch-int8 flag always means int8)."""

    def __init__(self, quantize: bool = False):
        super().__init__()
        self.quantize = quantize
        self.name = "torch-int8" if quantize else "torch"

    def load(self, path, dtype: Optional[str] = None, device: Optional[str] = None,
             tokenizer: Optional[str] = None, threads: Optional[int] = None) -> "TorchBackend":
        """threads: torch intra-op threads (process-wide). torch-int8 defaults to 1: its int8 matmuls of one
        decoding row are too small to split (2 threads: p50 347 ms against 205 ms, and less throughput at
        every concurrency, BENCHMARKS.md#serving)."""
        import torch
        from transformers.utils import logging as hf_logging

        from torch_t5.infer import InferError, load
        from torch_t5.quantize import Int8Linear, QuantizeError, quantize_model

        hf_logging.disable_progress_bar()  # a server log / REPL is no place for "Loading weights" bars
        if threads is None and self.quantize:
            threads = 1
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        start = time.perf_counter()
        is_int8_folder = (Path(path).expanduser() / "quantization.json").is_file()
        if is_int8_folder and not self.quantize:
            raise BackendError(f"{path} is an int8 folder: serve it with --backend torch-int8")
        if self.quantize and dtype not in (None, "float32"):
            raise BackendError(f"torch-int8 runs int8 weights with fp32 activations; dtype {dtype!r} does not apply")
        try:
            model, tok = load(path, device=device or ("cpu" if self.quantize else None), dtype=dtype,
                              tokenizer=tokenizer)
            if self.quantize and not is_int8_folder:
                if next(model.parameters()).device.type != "cpu":
                    raise BackendError("torch-int8 is the CPU serving path; load the model on cpu")
                quantize_model(model)
        except (InferError, QuantizeError) as err:
            raise BackendError(str(err)) from None
        except (OSError, ValueError) as err:
            raise BackendError(f"{path}: could not load ({type(err).__name__}: {_first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        self.int8_modules = sum(isinstance(m, Int8Linear) for m in model.modules())
        self.options = {"dtype": "int8" if self.quantize else str(next(model.parameters()).dtype).split(".")[-1]}
        self.load_seconds = time.perf_counter() - start
        return self

    def _generate(self, queries, num_beams, max_new_tokens, temperature, ignore_eos):
        from torch_t5.infer import generate

        # min_new_tokens = max_new_tokens masks EOS until the end: exactly max_new_tokens tokens
        extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
        if temperature > 0:
            return self._sample(queries, max_new_tokens, temperature, extra)
        return generate(self.model, self.tokenizer, queries, num_beams=num_beams, max_new_tokens=max_new_tokens,
                        **extra)

    def _sample(self, queries, max_new_tokens, temperature, extra):
        import torch

        from reformulation.data import format_source

        device = next(self.model.parameters()).device
        batch = self.tokenizer([format_source(q) for q in queries], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            ids = self.model.generate(**batch, do_sample=True, temperature=float(temperature), top_k=0,
                                      max_new_tokens=max_new_tokens, **extra)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _stream(self, query, max_new_tokens, temperature):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from reformulation.data import format_source

        if temperature == 0:
            from torch_t5.greedy import supported

            if supported(self.model):
                yield from self._stream_greedy(query, max_new_tokens)
                return

        cancel = threading.Event()

        class Cancelled(StoppingCriteria):  # lets the consumer stop generation (chat: Ctrl-C)
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        device = next(self.model.parameters()).device
        batch = self.tokenizer([format_source(query)], return_tensors="pt").to(device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        failure = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**batch, max_new_tokens=max_new_tokens, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Cancelled()]), **sampling)
            except Exception as err:  # surfaced in the consumer's thread below
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=run, name="torch-stream", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if failure:
            raise BackendError(f"generation failed ({type(failure[0]).__name__}: {_first_line(failure[0])})")

    def _stream_greedy(self, query, max_new_tokens):
        """torch_t5.greedy step by step, in this thread: stopping the iteration cancels it."""
        from torch_t5.greedy import decoder_for

        from reformulation.data import format_source, text_pieces

        batch = self.tokenizer([format_source(query)], return_tensors="pt")
        steps = decoder_for(self.model).steps(batch["input_ids"], batch["attention_mask"], max_new_tokens)
        yield from text_pieces(self.tokenizer, (int(step[0]) for step in steps))

    def _details(self):
        import torch

        from torch_t5.quantize import Int8Linear

        # int8 weights are buffers; a tied head quantized to int8 is a copy of the embedding, not more weights
        # (transformers 5 keeps tie_word_embeddings True in memory; scale_decoder_outputs keeps the saved choice)
        config = self.model.config
        tied_head = self.model.lm_head if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings) else None
        int8 = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, Int8Linear) and m is not tied_head)
        return {"parameters": sum(p.numel() for p in self.model.parameters()) + int8,
                "d_model": config.d_model, "layers": [config.num_layers, config.num_decoder_layers],
                "int8_linear_layers": self.int8_modules,
                "device": str(next(self.model.parameters()).device), "torch_threads": torch.get_num_threads()}


class OnnxBackend(Backend):
    """onnx_t5: ONNX Runtime on the CPU with int8 weights (MatMulNBits): greedy, sampling and beam search.
    Loads a folder written by `python -m convert to-onnx`, or exports an HF folder / hub id on load
    (a few seconds; into a temporary folder that lives as long as the backend)."""

    name = "onnx"

    def __init__(self):
        super().__init__()
        self.exact_batches = True

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None, exact_batches: bool = True) -> "OnnxBackend":
        """dtype: None = int8 (or as the ONNX folder was exported), "float32" = export without quantizing.
        threads: ONNX Runtime intra-op threads; default 1 (one decoding row is too small to split:
        BENCHMARKS.md#serving). exact_batches (default): generate the queries of a batch one by one, so an
        answer never depends on what it was batched with; False: as one batch, ~2.2x the throughput with 32
        clients, but a near-tie token can then come out differently (7 of 400 queries, BENCHMARKS.md)."""
        import tempfile

        try:
            import onnx_t5
            from onnx_t5.export import ExportError, export
        except ImportError as err:
            raise BackendError(f"the onnx backend needs onnxruntime and onnx ({err}); pip install -e '.[serve]'") \
                from None
        threads = 1 if threads is None else threads
        if threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        if dtype not in (None, "float32"):
            raise BackendError(f"the onnx backend runs int8 or float32 weights; dtype {dtype!r} does not apply")
        start = time.perf_counter()
        folder = Path(path).expanduser()
        try:
            if onnx_t5.is_onnx_folder(folder):
                if dtype == "float32":
                    raise BackendError(f"{path} is an exported ONNX folder: its dtype was chosen at export")
            else:
                self._exported = tempfile.TemporaryDirectory(prefix="onnx-t5-")
                folder = export(path, Path(self._exported.name) / "model", quantize=dtype != "float32",
                                tokenizer=tokenizer)
            model, tok = onnx_t5.load(folder, threads=threads, tokenizer=tokenizer)
        except (ExportError, onnx_t5.OnnxLoadError) as err:
            raise BackendError(str(err)) from None
        except (OSError, ValueError) as err:
            raise BackendError(f"{path}: could not load ({type(err).__name__}: {_first_line(err)})") from None
        self.model, self.tokenizer, self.path = model, tok, str(path)
        quantization = model.info.get("quantization")
        self.options = {"dtype": f"int{quantization['bits']}" if quantization else "float32",
                        "exact_batches": exact_batches}
        self.exact_batches = exact_batches
        self.load_seconds = time.perf_counter() - start
        return self

    def _encode(self, queries):
        from reformulation.data import format_source

        batch = self.tokenizer([format_source(q) for q in queries], return_tensors="np", padding=True)
        return batch["input_ids"], batch["attention_mask"]

    def _generate(self, queries, num_beams, max_new_tokens, temperature, ignore_eos):
        # MLAS's int8 kernels take rows in pairs and a lone row on another path (other rounding): a query's
        # answer would depend on its batch at near-ties. exact_batches keeps every query on the one-row path.
        groups = [[q] for q in queries] if self.exact_batches else [queries]
        return [text for group in groups
                for text in self._generate_batch(group, num_beams, max_new_tokens, temperature, ignore_eos)]

    def _generate_batch(self, queries, num_beams, max_new_tokens, temperature, ignore_eos):
        ids, mask = self._encode(queries)
        min_new = max_new_tokens if ignore_eos else 0
        if num_beams > 1:
            out = self.model.beam_search(ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                         min_new_tokens=min_new)
        else:
            out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                      min_new_tokens=min_new)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _stream(self, query, max_new_tokens, temperature):
        from reformulation.data import text_pieces

        ids, mask = self._encode([query])
        steps = self.model.steps(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature)
        yield from text_pieces(self.tokenizer, (int(step[0]) for step in steps))

    def _details(self):
        import onnxruntime

        return {**self.model.describe(), "onnxruntime": onnxruntime.__version__}


def make_backend(name: str) -> Backend:
    """A new, unloaded backend: "mlx", "onnx" (ONNX Runtime int8, CPU), "torch-int8" (dynamic int8, CPU) or
    "torch" (float)."""
    if name == "mlx":
        return MLXBackend()
    if name == "onnx":
        return OnnxBackend()
    if name in ("torch-int8", "torch"):
        return TorchBackend(quantize=name == "torch-int8")
    raise BackendError(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
