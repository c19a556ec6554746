"""The contract between the serving layer (serving/) and the three engines: mlx_t5, torch_t5, onnx_t5.

Each package has an `engine.py` with a subclass of `Engine`, and speaks text in and text out:

    engine = MLXEngine().load("runs/base/final", threads=1)
    engine.generate(["Who lived longer, Tesla or Milankovic?"], num_beams=4)
    # -> ["Nikola Tesla lifespan|Milutin Milankovic lifespan"]
    for piece in engine.stream("Who lived longer, Tesla or Milankovic?"):
        print(piece, end="")
    engine.describe()   # {"backend", "model", "dtype", "parameters", "load_seconds", threads, ...}
    engine.set_threads(2)

Queries go in raw: `format_source` (the training prompt and its normalisation) is applied inside the
engine, once. The checks here (queries, decoding options, their limits) are the same for every engine,
for chat and for the HTTP API. An engine is not thread safe: the API drives it from one worker thread.

Framework-free like the rest of reformulation/: the engines import their framework, not this module.
"""

from dataclasses import asdict, dataclass
from typing import Iterator, Optional


class EngineError(RuntimeError):
    """A model that cannot be loaded or options an engine cannot honour; the message says which."""


@dataclass(frozen=True)
class DecodingLimits:
    """The most any caller may ask for: chat, the HTTP API (whose flags may lower them) and the engines.
    Temperatures above 2 sample nearly uniform noise; 512 tokens is 10x the longest target in the data."""

    max_beams: int = 16
    max_new_tokens: int = 512
    max_temperature: float = 2.0


LIMITS = DecodingLimits()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode: greedy (the default), beam search (num_beams > 1) or sampling (temperature > 0).
    ignore_eos (benchmarks): every answer is exactly max_new_tokens tokens."""

    num_beams: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.num_beams) or not 1 <= self.num_beams <= LIMITS.max_beams:
            raise EngineError(f"num_beams must be an integer >= 1 and <= {LIMITS.max_beams}, got {self.num_beams!r}")
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= LIMITS.max_new_tokens:
            raise EngineError(f"max_new_tokens must be an integer >= 1 and <= {LIMITS.max_new_tokens}, "
                              f"got {self.max_new_tokens!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not 0 <= temperature <= LIMITS.max_temperature:
            raise EngineError(f"temperature must be a number >= 0 and <= {LIMITS.max_temperature:g} (0 = greedy), "
                              f"got {temperature!r}")
        if temperature > 0 and self.num_beams > 1:
            raise EngineError("sampling (temperature > 0) and beam search (num_beams > 1) do not mix: choose one")
        if not isinstance(self.ignore_eos, bool):
            raise EngineError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


DEFAULT_DECODING = DecodingOptions()


def check_options(**options) -> DecodingOptions:
    """The options as DecodingOptions, or EngineError naming the one that is wrong (or unknown)."""
    try:
        return DecodingOptions(**options)
    except TypeError as err:  # an unknown keyword
        raise EngineError(str(err).replace("__init__()", "decoding options")) from None


def first_line(err: BaseException) -> str:
    """An exception as one line for a user (libraries' messages can run to pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Engine:
    """What every engine offers. Subclasses implement `load`, `_generate`, `_stream`, `_details` and
    `set_threads`; the public `generate` / `stream` check their input here first. `load` returns self,
    so `Engine().load(path)` reads well; it sets `model`, `tokenizer`, `path`, `load_seconds` and
    `options` (what describe() reports of how it was loaded, e.g. the dtype)."""

    name = "base"

    def __init__(self):
        self.model = self.tokenizer = None
        self.path: Optional[str] = None
        self.load_seconds = 0.0
        self.options: dict = {}

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             threads: Optional[int] = None) -> "Engine":
        """path: a model folder or hub id; dtype: None = as saved; tokenizer: a folder when the model has
        none; threads: CPU threads for generation (see set_threads)."""
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        """CPU threads this engine's matmuls use (the library's setting: process-wide for torch and BLAS)."""
        raise NotImplementedError

    def generate(self, queries: list[str], **options) -> list[str]:
        """One "a|b|c" string per query, in order; options are DecodingOptions' fields."""
        self._require()
        queries = _check_queries(queries)
        decoding = check_options(**options)
        if not queries:
            return []
        return self._generate(queries, decoding)

    def stream(self, query: str, **options) -> Iterator[str]:
        """Text pieces as they are produced (beam search cannot stream: one piece at the end)."""
        self._require()
        _check_queries([query])
        decoding = check_options(**options)
        if decoding.ignore_eos:
            raise EngineError("ignore_eos is for generate (benchmarks), not for streams")
        if decoding.num_beams > 1:
            yield from self.generate([query], **asdict(decoding))
            return
        yield from self._stream(query, decoding)

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.path, "load_seconds": round(self.load_seconds, 3),
                **self.options, **self._details()}

    def _generate(self, queries: list[str], options: DecodingOptions) -> list[str]:
        """generate() for checked, non-empty queries."""
        raise NotImplementedError

    def _stream(self, query: str, options: DecodingOptions) -> Iterator[str]:
        """stream() of one checked query, greedy or sampled."""
        raise NotImplementedError

    def _details(self) -> dict:
        """What describe() adds for this engine: parameters, d_model, layers, threads, device, ..."""
        return {}

    def _require(self):
        if not self.loaded:
            raise EngineError(f"{self.name} backend: no model loaded (call load(path) first)")


def _check_queries(queries) -> list[str]:
    if isinstance(queries, str):
        raise EngineError("queries must be a list of strings, not one string")
    queries = list(queries)
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise EngineError(f"query {i} is empty or not a string")
    return queries
