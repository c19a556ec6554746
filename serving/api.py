"""HTTP API for query reformulation (FastAPI + uvicorn), micro-batched on one model thread.

    python api.py --model runs/base/final [--backend mlx|onnx|torch-int8|torch] [--port 8000]   # or t5r-api
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
import json
import math
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import asynccontextmanager, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from reformulation.data import parse_subqueries
from reformulation.engine import DEFAULT_DECODING, LIMITS, Engine, EngineError

from .backends import add_model_args, default_backend, make_backend


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, safe defaults for a laptop (api.py flags set all but max_temperature and
    discard_timeout_s). The decoding bounds are reformulation.engine.LIMITS, which chat and the engines
    share; this server may lower them.

    max_body_bytes: 64 queries of 1000 characters fit even at 4 UTF-8 bytes a character.
    max_queued_queries: queries waiting or being generated; a request that would go over gets 429.
    max_discard_bytes, discard_timeout_s: how much of a too-large body is read and dropped before the 413
        (clients that send the whole body before reading, like Python's urllib, see only a reset
        connection if the server closes on an unread body).
    """

    max_query_chars: int = 1000
    max_queries: int = 64
    max_new_tokens: int = LIMITS.max_new_tokens
    max_beams: int = LIMITS.max_beams
    max_temperature: float = LIMITS.max_temperature
    max_body_bytes: int = 256 * 1024
    request_timeout_s: float = 30.0
    max_queued_queries: int = 256
    max_discard_bytes: int = 32 * 1024 * 1024
    discard_timeout_s: float = 10.0


# ---------------------------------------------------------------- the model thread


@dataclass
class Job:
    queries: list[str]
    options: tuple  # sorted (name, value) pairs: jobs batch together only with identical options
    future: Future = field(default_factory=Future)


@dataclass
class StreamJob:
    """One query generated alone, its text pieces handed to `emit` (on the worker thread) as they come, then
    STREAM_END or the exception that stopped it. Setting `cancelled` stops it between two pieces."""

    queries: list[str]
    options: dict
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


_STOP = object()
STREAM_END = object()


class QueueFull(Exception):
    """Batcher.submit: the queue holds max_queued queries already; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    """Owns the backend: one thread takes jobs from a queue, batches them, and resolves their futures.

    Args:
        backend: an Engine; loaded here, on the worker thread, when `model` is given.
        max_batch: most queries generated together.
        window_ms: when more jobs are queued behind the first, how long to keep collecting before generating
            (a job that finds the queue empty is generated at once).
        max_queued: most queries submitted and not yet answered (None: no bound); submit raises QueueFull
            beyond it.
    """

    def __init__(self, backend: Engine, max_batch: int = 16, window_ms: float = 5.0,
                 model: Optional[str] = None, load_options: Optional[dict] = None,
                 max_queued: Optional[int] = None):
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
        self.stats = {"batches": 0, "queries": 0, "largest_batch": 0, "streams": 0}
        self.max_queued, self.outstanding = max_queued, 0  # queries submitted and not yet answered
        self._count_lock = threading.Lock()  # done-callbacks run on the worker or the event loop thread
        self._busy_s = 0.0  # time spent generating batches: with stats["queries"], the rate behind Retry-After

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker; returns once the model is loaded (raises EngineError if it cannot be).

        A stopped batcher starts again (its backend stays loaded): an app's lifespan can run more than once
        in one process, e.g. under test clients (Schemathesis ends it after each test)."""
        with self._lock:
            if self._thread is not None and self.closing and not self._thread.is_alive():
                self._thread, self.closing = None, False
                self._ready.clear()
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
            with self._count_lock:
                if self.max_queued is not None and self.outstanding + len(queries) > self.max_queued:
                    raise QueueFull(self.retry_after())
                self.outstanding += len(queries)
            job = Job(list(queries), tuple(sorted(options.items())))
            # answered, failed or cancelled (its request timed out while queued): exactly one callback
            job.future.add_done_callback(lambda _, n=len(job.queries): self._release(n))
            self._queue.put(job)
        return job.future

    def _release(self, n: int) -> None:
        with self._count_lock:
            self.outstanding -= n

    def retry_after(self) -> int:
        """Whole seconds until what is outstanding now has been generated, at the rate measured so far."""
        per_query = self._busy_s / self.stats["queries"] if self.stats["queries"] else 0.0
        return min(60, max(1, math.ceil(self.outstanding * per_query)))

    def submit_stream(self, query: str, emit: Callable[[object], None], **options) -> StreamJob:
        """Queue one streamed query (never batched); see StreamJob."""
        with self._lock:
            if self.closing or self._thread is None:
                raise RuntimeError("server is shutting down")
            with self._count_lock:
                if self.max_queued is not None and self.outstanding + 1 > self.max_queued:
                    raise QueueFull(self.retry_after())
                self.outstanding += 1
            job = StreamJob([query], options, emit)
            self._queue.put(job)
        return job

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
                self._load_error = err if isinstance(err, EngineError) else EngineError(str(err))
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
        groups, streams = defaultdict(list), []
        for job in jobs:
            if isinstance(job, StreamJob):
                streams.append(job)
            elif job.future.set_running_or_notify_cancel():  # False: its request already timed out
                groups[job.options].append(job)
        for options, group in groups.items():
            queries = [q for job in group for q in job.queries]
            began = time.perf_counter()
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
            self._busy_s += time.perf_counter() - began
            start = 0
            for job in group:
                job.future.set_result(outputs[start : start + len(job.queries)])
                start += len(job.queries)
        for job in streams:
            self._stream(job)

    def _stream(self, job: StreamJob) -> None:
        try:
            if job.cancelled.is_set():  # its client has gone (or timed out) while it was queued
                return
            began = time.perf_counter()
            try:
                with closing(self.backend.stream(job.queries[0], **job.options)) as pieces:
                    for piece in pieces:
                        if job.cancelled.is_set():
                            return
                        job.emit(piece)
            except Exception as err:  # fails its request, never the worker
                job.emit(err)
                return
            self.stats["streams"] += 1
            self.stats["queries"] += 1
            self._busy_s += time.perf_counter() - began
            job.emit(STREAM_END)
        finally:
            self._release(1)


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


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]
    queued: int = Field(ge=0, description="Requests waiting for the model thread.")


class ModelInfo(BaseModel):
    """The backend's own details (dtype, parameters, threads, ...) come beside these fields."""

    model_config = ConfigDict(extra="allow")
    backend: str
    model: str
    serving: dict = Field(description="Batching settings and counters.")
    limits: Limits


RETRY_AFTER_DOC = {"Retry-After": {"description": "Seconds to wait before trying again.", "required": True,
                                   "schema": {"type": "integer", "minimum": 1}}}
# a server that is shutting down comes back (restarted, or another instance) in seconds, not at once
SHUTDOWN_RETRY_AFTER = {"Retry-After": "5"}


def error_docs(limits: Limits) -> dict:
    """The error statuses of /v1/reformulate, each with the ErrorResponse body and when it happens."""
    when = {
        400: "The body is not valid JSON (`invalid_json`), or Content-Length is not a number.",
        413: f"The body is over {limits.max_body_bytes} bytes (`too_large`).",
        415: "A body without `Content-Type: application/json` (`unsupported_media_type`).",
        422: "The body does not match the schema, `field` names the culprit (`validation_error`); or the backend "
             "cannot honour the options (`invalid_options`).",
        429: f"{limits.max_queued_queries} queries are queued already (`queue_full`): retry after `Retry-After`.",
        500: "Generation failed (`generation_error`).",
        503: "The server is shutting down (`unavailable`).",
        504: f"Not answered within {limits.request_timeout_s:g} s (`timeout`).",
    }
    return {code: {"model": ErrorResponse, "description": text, **({"headers": RETRY_AFTER_DOC} if code in (429, 503)
                                                                    else {})} for code, text in when.items()}


# What str.strip() removes (every Unicode White_Space character is in the BMP): a query made only of
# these is blank. The schema's `pattern` is built from the same set, so schema and validator agree.
WHITESPACE = "".join(c for c in map(chr, range(0x10000)) if c.isspace())
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "]"
# JSON Schema for "no sampling with beam search": temperature 0 (or left out), or num_beams 1 (or left out)
SAMPLING_WITHOUT_BEAMS = {"anyOf": [{"properties": {"temperature": {"const": 0}}},
                                    {"properties": {"num_beams": {"const": 1}}}]}


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def query_text(max_chars: int):
    """A query string: 1..max_chars characters, not only whitespace; the schema says the same. (Strict
    pydantic also refuses a lone surrogate, "\ud800" in the JSON: no text for a tokenizer.)"""
    return Annotated[str, Field(min_length=1, max_length=max_chars, json_schema_extra={"pattern": NOT_BLANK_PATTERN}),
                     AfterValidator(_not_blank)]


def _whole_float_to_int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's "integer" is any number without a fraction, 2.0 included: accept what the schema accepts
# (strict pydantic otherwise refuses a float for an int; "2", true and 2.5 stay refused)
WholeNumber = Annotated[int, BeforeValidator(_whole_float_to_int)]


def _request_schema(schema: dict) -> None:
    """What the validators enforce across fields, in the schema: exactly one of query / queries (oneOf), no
    sampling with beams (anyOf). Neither text field has a default there: each is given a value or left out."""
    schema["oneOf"] = [{"required": ["query"]}, {"required": ["queries"]}]
    schema.update(SAMPLING_WITHOUT_BEAMS)
    schema["examples"] = [{"query": "Who lived longer, Nikola Tesla or Milutin Milankovic?"},
                          {"queries": ["What is the capital of France?", "Who wrote Dune?"], "num_beams": 4}]
    for name in ("query", "queries"):
        schema["properties"][name].pop("default", None)


def make_decoding_options(limits: Limits) -> type[BaseModel]:
    """The decoding options both request bodies take, with this server's limits."""

    class DecodingOptions(BaseModel):
        num_beams: WholeNumber = Field(DEFAULT_DECODING.num_beams, ge=1, le=limits.max_beams,
                                       description="1 = greedy (the stream sends it token by token); more = beam "
                                                   "search (the stream sends one piece at the end).")
        max_new_tokens: WholeNumber = Field(min(DEFAULT_DECODING.max_new_tokens, limits.max_new_tokens), ge=1,
                                            le=limits.max_new_tokens, description="Most tokens generated per query.")
        temperature: float = Field(DEFAULT_DECODING.temperature, ge=0.0, le=limits.max_temperature,
                                   description="0 = deterministic; > 0 samples (with num_beams = 1 only).")

        @model_validator(mode="after")
        def _sampling_without_beams(self):
            if self.temperature > 0 and self.num_beams > 1:
                raise ValueError("temperature > 0 (sampling) needs num_beams = 1")
            return self

    return DecodingOptions


def make_request_model(limits: Limits) -> type[BaseModel]:
    """The request schema with this server's limits in its Field constraints (so /docs shows them)."""
    Query = query_text(limits.max_query_chars)

    class ReformulateRequest(make_decoding_options(limits)):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_request_schema)

        # typed without None: an explicit null is a 422, as the schema says (None is only "left out")
        query: Query = Field(None, description="One user question. Give `query` or `queries`, not both.")
        queries: list[Query] = Field(
            None, min_length=1, max_length=limits.max_queries,
            description=f"Several questions (at most {limits.max_queries}), answered in order.")

        @model_validator(mode="after")
        def _exactly_one(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
            return self

        def texts(self) -> list[str]:
            return [self.query] if self.query is not None else list(self.queries)

    return ReformulateRequest


def make_stream_request_model(limits: Limits) -> type[BaseModel]:
    """The streaming request: one `query` and the same options and limits as /v1/reformulate."""

    def schema_extra(schema: dict) -> None:
        schema.update(SAMPLING_WITHOUT_BEAMS)
        schema["examples"] = [{"query": "Who lived longer, Nikola Tesla or Milutin Milankovic?"}]

    class ReformulateStreamRequest(make_decoding_options(limits)):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=schema_extra)

        query: query_text(limits.max_query_chars) = Field(description="One user question.")

    return ReformulateStreamRequest


# ---------------------------------------------------------------- the web page (web/: no build step, no CDN)

WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
             "/web/style.css": ("style.css", "text/css; charset=utf-8")}
# the page's own script, style sheet and API calls; nothing inline, nothing from another origin
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _event_schema(name: str, data: dict) -> dict:
    return {"type": "object", "required": ["event", "data"],
            "properties": {"event": {"const": name},
                           "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}}}


# OpenAPI 3.1 reads the `schema` of text/event-stream as the schema of each event (event, data, id, retry)
STREAM_EVENTS_SCHEMA = {"oneOf": [
    _event_schema("piece", {"type": "object", "required": ["text"], "additionalProperties": False,
                            "properties": {"text": {"type": "string", "minLength": 1}}}),
    _event_schema("done", {"$ref": "#/components/schemas/ReformulateResponse"}),
    _event_schema("error", {"$ref": "#/components/schemas/ErrorResponse"}),
]}


def sse_event(event: str, data: dict) -> bytes:
    """One server-sent event; `data` as one line of JSON (json.dumps escapes newlines)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _web_file(name: str, media_type: str):
    async def serve() -> Response:
        path = WEB_DIR / name
        if not path.is_file():
            return error_response(404, f"the web page is not installed ({path} is missing)", "not_found")
        return Response(path.read_bytes(), media_type=media_type, headers=PAGE_HEADERS)

    serve.__name__ = f"web_{name.replace('.', '_')}"
    return serve


# ---------------------------------------------------------------- errors


def error_response(status: int, message: str, kind: str, field: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field, "type": kind}}, status_code=status,
                        headers=headers)


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
    # Starlette puts `Allow` on its 405 (RFC 9110 requires it): keep the exception's headers
    return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers)


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared or actually sent), before any parsing.

    A 413 is sent once the rest of the body has been read and dropped (up to `max_discard_bytes` and
    `discard_timeout_s`). Sent earlier, it goes out while the client is still sending; a client that asked
    for `Connection: close` (Python's urllib always does) then has its connection closed by uvicorn
    (h11_impl: our state MUST_CLOSE -> transport.close()) with the body unread, the kernel answers the
    unread bytes with a reset, and a client that reads only after sending sees `Connection reset by peer`
    instead of the 413. A client that waits for `100 Continue` has sent nothing yet: it is answered at
    once. Past the bounds, or then, the 413 says `Connection: close`: the connection cannot be reused.
    """

    def __init__(self, app, max_bytes: int, max_discard_bytes: int = 0, discard_timeout_s: float = 0.0):
        self.app, self.max_bytes = app, max_bytes
        self.max_discard_bytes, self.discard_timeout_s = max_discard_bytes, discard_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "invalid Content-Length header", "bad_request",
                                            headers={"Connection": "close"})(scope, receive, send)
            if int(declared) > self.max_bytes:
                # reading would send `100 Continue` to a client that waits for it: answer without reading
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                return await self._too_large(scope, receive, send, complete=False, drain=not waits)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send, complete=not more, drain=more)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, complete: bool, drain: bool):
        if drain:
            complete = await self._discard(receive)
        response = error_response(413, f"request body is larger than {self.max_bytes} bytes", "too_large",
                                  headers=None if complete else {"Connection": "close"})
        await response(scope, receive, send)

    async def _discard(self, receive) -> bool:
        """Read and drop the rest of the body; True if it ended within the bounds."""
        async def drain():
            dropped = 0
            while dropped <= self.max_discard_bytes:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
            return False

        try:
            return await asyncio.wait_for(drain(), self.discard_timeout_s)
        except asyncio.TimeoutError:
            return False


# ---------------------------------------------------------------- the app


def create_app(backend: Engine, *, model: Optional[str] = None, load_options: Optional[dict] = None,
               max_batch: int = 16, batch_window_ms: float = 5.0, limits: Limits = Limits(),
               ignore_eos: bool = False) -> FastAPI:
    """The FastAPI app serving `backend` (loaded already, or loaded from `model` on the worker thread).

    Args:
        ignore_eos: benchmarks only: every query generates exactly max_new_tokens tokens.
    """
    if limits.max_queued_queries < limits.max_queries:
        raise ValueError(f"max_queued_queries ({limits.max_queued_queries}) must be >= max_queries "
                         f"({limits.max_queries}): a request of max_queries queries would always get 429")
    batcher = Batcher(backend, max_batch=max_batch, window_ms=batch_window_ms, model=model,
                      load_options=load_options, max_queued=limits.max_queued_queries)
    RequestBody, StreamBody = make_request_model(limits), make_stream_request_model(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(batcher.start)  # at once if main() started it; again after a stop
        yield
        # uvicorn has stopped accepting connections and let in-flight requests finish: drain and join
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="Query reformulation", version="0.1.0", lifespan=lifespan,
                  description="A user's question in, search-engine subqueries out (fine-tuned Flan-T5).")
    app.state.batcher, app.state.limits, app.state.ignore_eos = batcher, limits, ignore_eos
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, max_discard_bytes=limits.max_discard_bytes,
                       discard_timeout_s=limits.discard_timeout_s)
    errors = error_docs(limits)

    def refused(err: Exception) -> Response:
        """The answer to a request the batcher turned away: its queue is full, or the server is draining."""
        if isinstance(err, QueueFull):
            return error_response(429, f"{limits.max_queued_queries} queries are queued already; retry in "
                                       f"{err.retry_after} s", "queue_full",
                                  headers={"Retry-After": str(err.retry_after)})
        return error_response(503, "server is shutting down", "unavailable", headers=SHUTDOWN_RETRY_AFTER)

    @app.post("/v1/reformulate", response_model=ReformulateResponse, responses=errors)
    async def reformulate(body: RequestBody) -> ReformulateResponse:
        """Subqueries for one query (`query`) or several (`queries`), with greedy, beam or sampled decoding."""
        start = time.perf_counter()
        try:
            future = batcher.submit(body.texts(), num_beams=body.num_beams, max_new_tokens=body.max_new_tokens,
                                    temperature=body.temperature, ignore_eos=ignore_eos)
        except (QueueFull, RuntimeError) as err:
            return refused(err)
        try:
            # on timeout wait_for cancels the wrapper, which cancels the job if it has not started yet
            outputs = await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(504, f"generation took longer than {limits.request_timeout_s:g} s", "timeout")
        except EngineError as err:
            return error_response(422, str(err), "invalid_options")
        except Exception as err:  # noqa: BLE001 - a model failure is a 500 with a message, not a dump
            return error_response(500, f"generation failed ({type(err).__name__}: {err})", "generation_error")
        return ReformulateResponse(subqueries=[parse_subqueries(text) for text in outputs], model=str(backend.path),
                                   backend=backend.name, latency_ms=round((time.perf_counter() - start) * 1000, 2))

    # errors before the stream starts are JSON (ErrorResponse is in the schema's components: see above); a
    # timeout or a failed generation is an `error` event of the stream
    json_errors = {code: {**{k: v for k, v in errors[code].items() if k != "model"},
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
                   for code in (400, 413, 415, 422, 429, 503)}
    stream_doc = ("Server-sent events: `piece` events `{\"text\": str}`, the text as it is generated (beam search: one "
                  "piece at the end); then `done`, the /v1/reformulate response for this query, or `error`, "
                  "`{\"error\": {\"message\", \"field\", \"type\"}}` (a timeout or a generation failure).")

    # response_class Response (no media type): the 200's only content is the event stream documented here
    # (fastapi.sse.EventSourceResponse would make FastAPI expect a generator, and this returns JSON errors)
    @app.post("/v1/reformulate/stream", response_class=Response, responses={
        200: {"description": stream_doc, "content": {"text/event-stream": {"schema": STREAM_EVENTS_SCHEMA}}},
        **json_errors})
    async def reformulate_stream(body: StreamBody) -> Response:
        """One query's subqueries streamed as they are generated (server-sent events); the web page uses it."""
        start = time.perf_counter()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):  # on the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                pass

        try:
            job = batcher.submit_stream(body.query, emit, num_beams=body.num_beams,
                                        max_new_tokens=body.max_new_tokens, temperature=body.temperature)
        except (QueueFull, RuntimeError) as err:
            return refused(err)

        def failure(message: str, kind: str) -> bytes:
            return sse_event("error", {"error": {"message": message, "field": None, "type": kind}})

        async def stream():
            text = ""
            try:
                while True:
                    remaining = limits.request_timeout_s - (time.perf_counter() - start)
                    try:
                        item = await asyncio.wait_for(events.get(), max(remaining, 0))
                    except asyncio.TimeoutError:
                        yield failure(f"generation took longer than {limits.request_timeout_s:g} s", "timeout")
                        return
                    if item is STREAM_END:
                        break
                    if isinstance(item, EngineError):
                        yield failure(str(item), "invalid_options")
                        return
                    if isinstance(item, BaseException):
                        yield failure(f"generation failed ({type(item).__name__}: {item})", "generation_error")
                        return
                    if item:  # beam search of an empty answer streams nothing
                        text += item
                        yield sse_event("piece", {"text": item})
                done = ReformulateResponse(subqueries=[parse_subqueries(text)], model=str(backend.path),
                                           backend=backend.name,
                                           latency_ms=round((time.perf_counter() - start) * 1000, 2))
                yield sse_event("done", done.model_dump())
            finally:  # finished, timed out or the client went away: the worker stops at the next piece
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    for route, (name, media_type) in WEB_FILES.items():
        app.add_api_route(route, _web_file(name, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/healthz", response_model=Health, responses={503: {
        "model": Health, "description": "Shutting down.", "headers": RETRY_AFTER_DOC}})
    async def healthz():
        """Liveness: 200 while serving, 503 once shutting down."""
        ok = batcher.started and not batcher.closing
        return JSONResponse({"status": "ok" if ok else "shutting_down", "queued": batcher.pending},
                            status_code=200 if ok else 503, headers=None if ok else SHUTDOWN_RETRY_AFTER)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info():
        """What is served and how: backend, model, dtype, size, batching and request limits."""
        return {**batcher.description, "serving": {"max_batch": batcher.max_batch,
                                                  "batch_window_ms": batcher.window * 1000,
                                                  "ignore_eos": ignore_eos, **batcher.stats},
                "limits": asdict(limits)}

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (torch intra-op / OpenBLAS / ONNX Runtime); default: 1 for "
                             "onnx and torch-int8, else the library's")
    parser.add_argument("--onnx-batches", action="store_true",
                        help="onnx backend: generate a micro-batch as one batch (~2.2x throughput at 32 clients) "
                             "instead of query by query; an answer can then depend on its batch at near-tie tokens")
    parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                        help="onnx and mlx backends: greedy answers by speculative decoding, drafts looked up in the "
                             "question and the model's phrasebook, several tokens checked per pass (default: on for "
                             "float32 weights, where the answers are the same; off for int8, where a near-tie can "
                             "differ; BENCHMARKS.md)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="onnx backend, HF model exported on load: weight bits (default 8: no 4-bit variant held "
                             "quality, BENCHMARKS.md \"4-bit weights\"; an ONNX folder keeps its own)")
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
                        help=f"most max_new_tokens a request may ask for (default and most: {LIMITS.max_new_tokens})")
    parser.add_argument("--max-beams", type=int, default=defaults.max_beams,
                        help=f"most num_beams a request may ask for (default and most: {LIMITS.max_beams})")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body size limit")
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout_s, help="seconds before a 504")
    parser.add_argument("--max-queued", type=int, default=defaults.max_queued_queries,
                        help="most queries waiting or being generated; beyond, 429 with Retry-After (default "
                             f"{defaults.max_queued_queries}; at least --max-queries)")
    parser.add_argument("--max-discard-bytes", type=int, default=defaults.max_discard_bytes,
                        help="of a body over --max-body-bytes, how much is read and dropped before the 413, so "
                             "that clients which send everything before reading get it (default 32 MiB)")
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
    for name in ("max_new_tokens", "max_beams"):
        if getattr(args, name) > getattr(LIMITS, name):
            parser.error(f"--{name.replace('_', '-')} must be <= {getattr(LIMITS, name)} (reformulation.engine.LIMITS)")
    if args.timeout <= 0 or args.batch_window_ms < 0 or args.max_discard_bytes < 0:
        parser.error("--timeout must be > 0, --batch-window-ms and --max-discard-bytes >= 0")
    if args.max_queued < args.max_queries:
        parser.error("--max-queued must be >= --max-queries (a request that large would always get 429)")
    limits = Limits(max_query_chars=args.max_query_chars, max_queries=args.max_queries,
                    max_new_tokens=args.max_new_tokens, max_beams=args.max_beams, max_body_bytes=args.max_body_bytes,
                    request_timeout_s=args.timeout, max_queued_queries=args.max_queued,
                    max_discard_bytes=args.max_discard_bytes)
    try:
        backend = make_backend(args.backend)
        load_options = {k: v for k, v in (("dtype", args.dtype), ("threads", args.threads)) if v is not None}
        if args.onnx_batches:
            if args.backend != "onnx":
                parser.error("--onnx-batches applies to --backend onnx")
            load_options["exact_batches"] = False
        if args.bits is not None:
            if args.backend != "onnx":
                parser.error("--bits applies to --backend onnx")
            load_options["bits"] = args.bits
        if args.speculative is not None:
            if args.backend not in ("onnx", "mlx"):
                parser.error("--speculative / --no-speculative apply to --backend onnx and mlx")
            load_options["speculative"] = args.speculative
        app = create_app(backend, model=args.model, load_options=load_options,
                         max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, limits=limits,
                         ignore_eos=args.ignore_eos)
        with err.status(f"loading {escape(args.model)} ({args.backend})"):
            app.state.batcher.start()  # loads on the worker thread; errors surface here, before binding
    except EngineError as e:
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
