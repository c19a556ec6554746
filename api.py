"""HTTP API for query reformulation (FastAPI + uvicorn), micro-batched on one model thread.

    python api.py --model runs/base/final [--backend mlx|onnx|torch-int8|torch] [--port 8000]
    curl -s localhost:8000/v1/reformulate -H 'content-type: application/json' \\
         -d '{"query": "Who lived longer, Nikola Tesla or Milutin Milankovic?"}'
    # {"subqueries": [["Nikola Tesla lifespan", "Milutin Milankovic lifespan"]], "model": ..., "latency_ms": ...}

Every model call runs on one worker thread fed by a queue (MLX streams and torch's thread pool are
not shared with the event loop). When requests are waiting, those that arrive within
`--batch-window-ms` of each other and ask for the same options are generated as one padded batch (up
to `--max-batch` queries); a request to an idle server is answered at once. Each request gets exactly
its own answer back. See docs/serving.md.
"""

import argparse
import asyncio
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Annotated, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends import Backend, BackendError, add_model_args, default_backend, make_backend
from reformulation.data import parse_subqueries


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, safe defaults for a laptop (api.py flags set all but max_temperature)."""

    max_query_chars: int = 1000
    max_queries: int = 64
    max_new_tokens: int = 256
    max_beams: int = 8
    max_temperature: float = 2.0
    max_body_bytes: int = 256 * 1024
    request_timeout_s: float = 30.0


# ---------------------------------------------------------------- the model thread


@dataclass
class Job:
    queries: list[str]
    options: tuple  # sorted (name, value) pairs: jobs batch together only with identical options
    future: Future = field(default_factory=Future)


_STOP = object()


class Batcher:
    """Owns the backend: one thread takes jobs from a queue, batches them, and resolves their futures.

    Args:
        backend: a Backend; loaded here, on the worker thread, when `model` is given.
        max_batch: most queries generated together.
        window_ms: when more jobs are queued behind the first, how long to keep collecting before generating
            (a job that finds the queue empty is generated at once).
    """

    def __init__(self, backend: Backend, max_batch: int = 16, window_ms: float = 5.0,
                 model: Optional[str] = None, load_options: Optional[dict] = None):
        if max_batch < 1 or window_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and window_ms >= 0 (got {max_batch}, {window_ms})")
        self.backend, self.max_batch, self.window = backend, max_batch, window_ms / 1000
        self._model, self._load_options = model, load_options or {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # submit vs stop: nothing enters the queue behind the stop marker
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self.closing = False
        self.description: dict = {}
        self.stats = {"batches": 0, "queries": 0, "largest_batch": 0}

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker; returns once the model is loaded (raises BackendError if it cannot be)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, queries: list[str], **options) -> Future:
        with self._lock:
            if self.closing or self._thread is None:
                raise RuntimeError("server is shutting down")
            job = Job(list(queries), tuple(sorted(options.items())))
            self._queue.put(job)
        return job.future

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting jobs, finish every queued one, join the worker."""
        with self._lock:
            self.closing = True
            if self._thread is not None:
                self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._model is not None and not self.backend.loaded:
            try:
                self.backend.load(self._model, **self._load_options)
            except BaseException as err:  # reported by start() in the caller's thread
                self._load_error = err if isinstance(err, BackendError) else BackendError(str(err))
                self._ready.set()
                return
        self.description = self.backend.describe()  # read here: describing touches the framework too
        self._ready.set()
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            jobs, stop = self._collect(job)
            self._generate(jobs)
            if stop:
                return

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, size = [first], len(first.queries)
        if self._queue.empty():
            # an idle server answers at once: a lone client never waits out the window. Under load the
            # queue fills while the worker generates, and the next batch takes what is there.
            return jobs, False
        deadline = time.monotonic() + self.window
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:  # everything before it is in `jobs`: finish them, then exit
                return jobs, True
            jobs.append(job)
            size += len(job.queries)
        return jobs, False

    def _generate(self, jobs: list[Job]) -> None:
        groups = defaultdict(list)
        for job in jobs:
            if job.future.set_running_or_notify_cancel():  # False: its request already timed out
                groups[job.options].append(job)
        for options, group in groups.items():
            queries = [q for job in group for q in job.queries]
            try:
                outputs = []
                for i in range(0, len(queries), self.max_batch):
                    chunk = queries[i : i + self.max_batch]
                    outputs += self.backend.generate(chunk, **dict(options))
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(chunk))
            except Exception as err:  # one bad batch fails its requests, never the worker
                for job in group:
                    job.future.set_exception(err)
                continue
            self.stats["queries"] += len(queries)
            start = 0
            for job in group:
                job.future.set_result(outputs[start : start + len(job.queries)])
                start += len(job.queries)


# ---------------------------------------------------------------- request / response schemas


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, in one sentence.")
    field: Optional[str] = Field(None, description="The request field at fault (`queries[2]`), if any.")
    type: str = Field(description="Machine-readable kind: invalid_json, validation_error, too_large, ...")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ReformulateResponse(BaseModel):
    subqueries: list[list[str]] = Field(description="One list of subqueries per input query, in input order.")
    model: str = Field(description="The model folder or hub id being served.")
    backend: str = Field(description="mlx, onnx, torch-int8 or torch.")
    latency_ms: float = Field(description="Server time for this request, queueing included.")


def make_request_model(limits: Limits) -> type[BaseModel]:
    """The request schema with this server's limits in its Field constraints (so /docs shows them)."""
    Query = Annotated[str, Field(min_length=1, max_length=limits.max_query_chars)]

    class ReformulateRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={
            "examples": [{"query": "Who lived longer, Nikola Tesla or Milutin Milankovic?"},
                         {"queries": ["What is the capital of France?", "Who wrote Dune?"], "num_beams": 4}]})

        query: Optional[Query] = Field(None, description="One user question. Give `query` or `queries`, not both.")
        queries: Optional[list[Query]] = Field(
            None, min_length=1, max_length=limits.max_queries,
            description=f"Several questions (at most {limits.max_queries}), answered in order.")
        num_beams: int = Field(1, ge=1, le=limits.max_beams, description="1 = greedy; more = beam search.")
        max_new_tokens: int = Field(64, ge=1, le=limits.max_new_tokens, description="Most tokens generated per query.")
        temperature: float = Field(0.0, ge=0.0, le=limits.max_temperature,
                                   description="0 = deterministic; > 0 samples (with num_beams = 1 only).")

        @field_validator("query")
        @classmethod
        def _query_not_blank(cls, value):
            if value is not None and not value.strip():
                raise ValueError("must not be blank")
            return value

        @field_validator("queries")
        @classmethod
        def _queries_not_blank(cls, value):
            for i, q in enumerate(value or []):
                if not q.strip():
                    raise ValueError(f"item {i} must not be blank")
            return value

        @model_validator(mode="after")
        def _exactly_one(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
            if self.temperature > 0 and self.num_beams > 1:
                raise ValueError("temperature > 0 (sampling) needs num_beams = 1")
            return self

        def texts(self) -> list[str]:
            return [self.query] if self.query is not None else list(self.queries)

    return ReformulateRequest


# ---------------------------------------------------------------- errors


def error_response(status: int, message: str, kind: str, field: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field, "type": kind}}, status_code=status)


def _field_name(loc) -> Optional[str]:
    parts = [p for p in loc if p != "body"]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": "validation_error"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return error_response(400, f"request body is not valid JSON ({reason})", "invalid_json")
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and await request.body():  # curl -d without -H sends a form
        return error_response(415, f"send JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})",
                              "unsupported_media_type")
    field = _field_name(first.get("loc", ()))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing" and field is None:
        message = "request body is required (JSON object with 'query' or 'queries')"
    elif first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        message = "request body must be a JSON object with 'query' or 'queries'"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, f"{field}: {message}" if field else message, "validation_error", field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), kind)


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared or actually sent), before any parsing."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "invalid Content-Length header", "bad_request")(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body is larger than {self.max_bytes} bytes", "too_large")
        await response(scope, receive, send)


# ---------------------------------------------------------------- the app


def create_app(backend: Backend, *, model: Optional[str] = None, load_options: Optional[dict] = None,
               max_batch: int = 16, batch_window_ms: float = 5.0, limits: Limits = Limits(),
               ignore_eos: bool = False) -> FastAPI:
    """The FastAPI app serving `backend` (loaded already, or loaded from `model` on the worker thread).

    Args:
        ignore_eos: benchmarks only: every query generates exactly max_new_tokens tokens.
    """
    backend.preload()
    batcher = Batcher(backend, max_batch=max_batch, window_ms=batch_window_ms, model=model,
                      load_options=load_options)
    RequestBody = make_request_model(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not batcher.started:
            await asyncio.to_thread(batcher.start)
        yield
        # uvicorn has stopped accepting connections and let in-flight requests finish: drain and join
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="Query reformulation", version="0.1.0", lifespan=lifespan,
                  description="A user's question in, search-engine subqueries out (fine-tuned Flan-T5).")
    app.state.batcher, app.state.limits, app.state.ignore_eos = batcher, limits, ignore_eos
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 500, 503, 504)}

    @app.post("/v1/reformulate", response_model=ReformulateResponse, responses=errors)
    async def reformulate(body: RequestBody) -> ReformulateResponse:
        """Subqueries for one query (`query`) or several (`queries`), with greedy, beam or sampled decoding."""
        start = time.perf_counter()
        try:
            future = batcher.submit(body.texts(), num_beams=body.num_beams, max_new_tokens=body.max_new_tokens,
                                    temperature=body.temperature, ignore_eos=ignore_eos)
        except RuntimeError:
            return error_response(503, "server is shutting down", "unavailable")
        try:
            # on timeout wait_for cancels the wrapper, which cancels the job if it has not started yet
            outputs = await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(504, f"generation took longer than {limits.request_timeout_s:g} s", "timeout")
        except BackendError as err:
            return error_response(422, str(err), "invalid_options")
        except Exception as err:  # noqa: BLE001 - a model failure is a 500 with a message, not a dump
            return error_response(500, f"generation failed ({type(err).__name__}: {err})", "generation_error")
        return ReformulateResponse(subqueries=[parse_subqueries(text) for text in outputs], model=str(backend.path),
                                   backend=backend.name, latency_ms=round((time.perf_counter() - start) * 1000, 2))

    @app.get("/healthz")
    async def healthz():
        """Liveness: 200 while serving, 503 once shutting down."""
        ok = batcher.started and not batcher.closing
        return JSONResponse({"status": "ok" if ok else "shutting_down", "queued": batcher.pending},
                            status_code=200 if ok else 503)

    @app.get("/v1/model")
    async def model_info():
        """What is served and how: backend, model, dtype, size, batching and request limits."""
        return {**batcher.description, "serving": {"max_batch": batcher.max_batch,
                                                  "batch_window_ms": batcher.window * 1000,
                                                  "ignore_eos": ignore_eos, **batcher.stats},
                "limits": asdict(limits)}

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python api.py", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (torch intra-op / OpenBLAS / ONNX Runtime); default: 1 for "
                             "onnx and torch-int8, else the library's")
    parser.add_argument("--onnx-batches", action="store_true",
                        help="onnx backend: generate a micro-batch as one batch (~2.2x throughput at 32 clients) "
                             "instead of query by query; an answer can then depend on its batch at near-tie tokens")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="most queries generated together (default 16)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="when requests queue up, how long to keep collecting a batch (default 5; 0 = only "
                             "what is queued); a request to an idle server never waits")
    defaults = Limits()
    parser.add_argument("--max-queries", type=int, default=defaults.max_queries, help="queries per request")
    parser.add_argument("--max-query-chars", type=int, default=defaults.max_query_chars, help="characters per query")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="most max_new_tokens a request may ask for")
    parser.add_argument("--max-beams", type=int, default=defaults.max_beams, help="upper bound for num_beams")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body size limit")
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout_s, help="seconds before a 504")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="benchmarks only: generate exactly max_new_tokens tokens for every query")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    # torch's OpenMP workers spin while idle by default: on a shared or small CPU that burns the cores the
    # next request needs (measured 10x slower per query with 2 threads on a busy 2-core box)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.backend = args.backend or default_backend()  # may import torch: after the line above

    import uvicorn
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    for name in ("max_batch", "max_queries", "max_query_chars", "max_new_tokens", "max_beams", "max_body_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0 or args.batch_window_ms < 0:
        parser.error("--timeout must be > 0 and --batch-window-ms >= 0")
    limits = Limits(max_query_chars=args.max_query_chars, max_queries=args.max_queries,
                    max_new_tokens=args.max_new_tokens, max_beams=args.max_beams, max_body_bytes=args.max_body_bytes,
                    request_timeout_s=args.timeout)
    try:
        backend = make_backend(args.backend)
        load_options = {k: v for k, v in (("dtype", args.dtype), ("threads", args.threads)) if v is not None}
        if args.onnx_batches:
            if args.backend != "onnx":
                parser.error("--onnx-batches applies to --backend onnx")
            load_options["exact_batches"] = False
        app = create_app(backend, model=args.model, load_options=load_options,
                         max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, limits=limits,
                         ignore_eos=args.ignore_eos)
        with err.status(f"loading {escape(args.model)} ({args.backend})"):
            app.state.batcher.start()  # loads on the worker thread; errors surface here, before binding
    except BackendError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    err.print(f"[green]serving[/] {escape(args.model)} with {args.backend} on http://{args.host}:{args.port} "
              f"(docs: /docs; Ctrl-C stops after in-flight requests)", highlight=False)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(args.timeout, 1.0))
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once the graceful shutdown is done
        pass
    err.print("[dim]stopped[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
