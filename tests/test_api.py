"""api.py over real HTTP: a uvicorn server on 127.0.0.1 serving a tiny random-init T5 with the real tokenizer."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from serving.api import Batcher, Limits, create_app
from serving.backends import Engine, make_backend
from hf_models import save_model
from reformulation.data import parse_subqueries

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8  # random weights rarely emit EOS: keep every answer short
# "odd-heads" (tests/hf_models.py): tiny, and its random answers differ from query to query
LIMITS = Limits(max_query_chars=200, max_queries=8, max_new_tokens=32, max_beams=4, max_body_bytes=4096,
                request_timeout_s=30.0)
QUERIES = [f"Who lived longer, person {i} or person {i * 7 % 50}?" for i in range(50)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app):
    """Run `app` under uvicorn in a thread; yield its base URL; shut it down (gracefully) afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return save_model("odd-heads", tmp_path_factory.mktemp("api") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def backend(model_dir):
    return make_backend("mlx").load(model_dir)


@pytest.fixture(scope="module")
def server(backend):
    app = create_app(backend, max_batch=16, batch_window_ms=20, limits=LIMITS)
    with serve(app) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, app


def expected(backend, query, **options):
    """What one sequential backend call gives (only called while the server's worker is idle)."""
    return parse_subqueries(backend.generate([query], max_new_tokens=MAX_NEW, **options)[0])


def test_single_and_batch(server, backend):
    client, _ = server
    r = client.post("/v1/reformulate", json={"query": QUERIES[0], "max_new_tokens": MAX_NEW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["subqueries"] == [expected(backend, QUERIES[0])]
    assert body["backend"] == backend.name and body["model"] == backend.path and body["latency_ms"] > 0

    r = client.post("/v1/reformulate", json={"queries": QUERIES[:3], "max_new_tokens": MAX_NEW, "num_beams": 2})
    assert r.status_code == 200, r.text
    assert r.json()["subqueries"] == [expected(backend, q, num_beams=2) for q in QUERIES[:3]]


def test_model_health_and_docs(server, backend):
    client, _ = server
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["backend"] == backend.name and info["d_model"] == 96
    assert info["limits"]["max_queries"] == LIMITS.max_queries
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ReformulateRequest"]["properties"]
    assert request["num_beams"]["maximum"] == LIMITS.max_beams
    assert request["queries"]["maxItems"] == LIMITS.max_queries
    assert "description" in request["query"]
    # a default within the server's limit (64 > LIMITS.max_new_tokens = 32): what an omitted field gets
    assert request["max_new_tokens"]["default"] == request["max_new_tokens"]["maximum"] == LIMITS.max_new_tokens


@pytest.mark.parametrize("payload, status, needle, field", [
    ({}, 422, "exactly one of 'query'", None),
    ({"query": "a", "queries": ["b"]}, 422, "exactly one of 'query'", None),
    ({"query": ""}, 422, "at least 1 character", "query"),
    ({"query": "   "}, 422, "blank", "query"),
    ({"query": "x" * 201}, 422, "at most 200 characters", "query"),
    ({"query": 42}, 422, "valid string", "query"),
    ({"queries": "one string"}, 422, "valid list", "queries"),
    ({"queries": []}, 422, "at least 1 item", "queries"),
    ({"queries": ["ok", 3]}, 422, "valid string", "queries[1]"),
    ({"queries": ["ok", " "]}, 422, "must not be blank", "queries[1]"),
    ({"query": None}, 422, "valid string", "query"),
    ({"queries": ["q"] * 9}, 422, "at most 8 items", "queries"),
    ({"query": "a", "num_beams": 0}, 422, "greater than or equal to 1", "num_beams"),
    ({"query": "a", "num_beams": 5}, 422, "less than or equal to 4", "num_beams"),
    ({"query": "a", "num_beams": "2"}, 422, "valid integer", "num_beams"),
    ({"query": "a", "max_new_tokens": 33}, 422, "less than or equal to 32", "max_new_tokens"),
    ({"query": "a", "temperature": -0.5}, 422, "greater than or equal to 0", "temperature"),
    ({"query": "a", "temperature": 0.7, "num_beams": 2}, 422, "num_beams = 1", None),
    ({"query": "a", "top_k": 3}, 422, "Extra inputs are not permitted", "top_k"),
    ([{"query": "a"}], 422, "JSON object", None),
])
def test_bad_requests(server, payload, status, needle, field):
    client, _ = server
    r = client.post("/v1/reformulate", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert error["field"] == field


def test_bad_bodies(server):
    client, _ = server
    headers = {"content-type": "application/json"}
    r = client.post("/v1/reformulate", content=b'{"query": "unterminated', headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json", r.text
    r = client.post("/v1/reformulate", content=b'{"query": "a"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    r = client.post("/v1/reformulate", content=b'{"query": "\\ud800"}', headers=headers)  # a lone surrogate
    assert r.status_code == 422 and r.json()["error"]["field"] == "query", r.text
    r = client.post("/v1/reformulate", content=b"", headers=headers)
    assert r.status_code == 422 and "request body is required" in r.json()["error"]["message"], r.text
    big = b'{"query": "' + b"x" * 5000 + b'"}'
    r = client.post("/v1/reformulate", content=big, headers=headers)
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["error"]["message"], r.text
    # chunked upload (no Content-Length): counted as it arrives
    r = client.post("/v1/reformulate", content=iter([big[:3000], big[3000:]]), headers=headers)
    assert r.status_code == 413, r.text
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.get("/v1/reformulate")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/healthz").status_code == 200  # still serving


# Each: (body, whether it is a valid request). The served schema must say the same as the server.
AGREEMENT = [
    ({}, False),  # Schemathesis' ST202: the schema had both fields optional
    ({"query": "a", "queries": ["b"]}, False),
    ({"query": "a"}, True),
    ({"queries": ["a", "b"]}, True),
    ({"query": None}, False),
    ({"query": " \t"}, False),
    ({"query": "\x1c\u3000"}, False),  # str.strip() whitespace that JavaScript's \s does not all know
    ({"query": "\u200b"}, True),  # zero-width space: not whitespace to either
    ({"queries": ["a", "\u2028"]}, False),
    ({"query": "a", "num_beams": 2.0}, True),  # JSON Schema's integer includes 2.0
    ({"query": "a", "num_beams": 2.5}, False),
    ({"query": "a", "num_beams": "2"}, False),
    ({"query": "a", "max_new_tokens": True}, False),
    ({"query": "a", "temperature": 0.5}, True),
    ({"query": "a", "temperature": 0.5, "num_beams": 1}, True),
    ({"query": "a", "temperature": 0.5, "num_beams": 2}, False),
    ({"query": "a", "temperature": 0, "num_beams": 2}, True),
    ({"query": "a", "top_k": 3}, False),
    ({"queries": []}, False),
    (["a"], False),
]


@pytest.mark.parametrize("body, valid", AGREEMENT)
def test_schema_and_server_agree(server, body, valid):
    """The request schema at /openapi.json accepts exactly what the server answers (else Schemathesis'
    positive_data_acceptance / negative_data_rejection fail): oneOf query/queries, non-blank text, whole
    numbers, no sampling with beams."""
    import jsonschema_rs

    client, _ = server
    openapi = client.get("/openapi.json").json()
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/ReformulateRequest", "components": openapi["components"]})
    assert validator.is_valid(body) is valid
    r = client.post("/v1/reformulate", json=body if not isinstance(body, dict) else {"max_new_tokens": 2, **body})
    assert r.status_code == (200 if valid else 422), r.text


def test_blank_pattern_knows_every_whitespace():
    """api.WHITESPACE (the schema's non-blank pattern) scans the BMP only: no White_Space character is beyond."""
    from serving.api import WHITESPACE

    assert WHITESPACE == "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


@pytest.mark.parametrize("path, allowed", [("/healthz", {"GET"}), ("/v1/model", {"GET"}),
                                           ("/v1/reformulate", {"POST"})])
def test_405_says_which_methods_are_allowed(server, path, allowed):
    """RFC 9110: a 405 carries `Allow` (Schemathesis' ST204 on all three paths, e.g. curl -X TRACE)."""
    client, _ = server
    for method in ("TRACE", "DELETE", "PUT"):
        r = client.request(method, path)
        assert r.status_code == 405, r.text
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed
        assert r.json()["error"]["type"] == "method_not_allowed"
    assert {m.upper() for m in client.get("/openapi.json").json()["paths"][path]} == allowed


TEN_MB = b'{"query": "' + b"x" * 10_000_000 + b'"}'


def test_413_reaches_clients_that_send_everything_first(server):
    """A 10 MB body: the rest is read and dropped before the 413, so urllib (Connection: close, reads only
    after sending) gets the 413 and not `Connection reset by peer`; httpx too, and its connection stays usable."""
    import urllib.error
    import urllib.request

    client, _ = server
    url = f"{client.base_url}/v1/reformulate"
    for _ in range(3):  # a reset would depend on timing: more than one try
        request = urllib.request.Request(url, data=TEN_MB, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 413
        assert "larger than 4096 bytes" in json.loads(caught.value.read())["error"]["message"]

    with httpx.Client(base_url=str(client.base_url), timeout=60) as http:
        for content in (TEN_MB, iter([TEN_MB[:5_000_000], TEN_MB[5_000_000:]])):  # declared, then chunked
            r = http.post("/v1/reformulate", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text
            assert r.headers.get("connection") != "close"  # all of it was read: the connection is reusable
        r = http.post("/v1/reformulate", json={"query": QUERIES[0], "max_new_tokens": 2})
        assert r.status_code == 200, r.text


def test_413_without_reading_for_a_client_that_waits_for_100_continue(server):
    """curl sends `Expect: 100-continue` with a large body and waits: answered at once, nothing read, and
    the connection closed (the body it announced never came)."""
    client, _ = server
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/reformulate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert b"100 Continue" not in head and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["type"] == "too_large"


def test_body_limit_stops_dropping_at_its_bound():
    """A body past max_discard_bytes is not read to its end: 413 with Connection: close once the bound is
    passed (an endless body would otherwise hold the connection)."""
    from serving.api import BodyLimit

    received, sent = [0], []

    async def receive():  # an endless chunked body
        received[0] += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not see a too-large body")

    limit = BodyLimit(app, max_bytes=5000, max_discard_bytes=20_000, discard_timeout_s=10)
    asyncio.run(limit({"type": "http", "method": "POST", "headers": []}, receive, send))
    start = sent[0]
    assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
    assert 6 + 20 <= received[0] <= 6 + 21  # to the limit, then to the bound (and the chunk that crossed it)


def test_queue_full_is_429_with_retry_after(backend):
    """More queries outstanding than max_queued_queries: 429 with Retry-After (seconds, from the measured
    rate), documented in the schema; once the queue drains, requests are answered again."""
    slow = SlowBackend(backend, 0.8)
    app = create_app(slow, limits=Limits(max_queries=2, max_queued_queries=2))
    with serve(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/reformulate", json={"query": QUERIES[0], "max_new_tokens": 2}).status_code == 200
        first = []
        thread = threading.Thread(target=lambda: first.append(client.post(
            "/v1/reformulate", json={"queries": QUERIES[:2], "max_new_tokens": 2})))
        slow.generating.clear()
        thread.start()
        assert slow.generating.wait(30)
        r = client.post("/v1/reformulate", json={"query": QUERIES[2], "max_new_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full", r.text
        assert int(r.headers["retry-after"]) >= 1
        thread.join(30)
        assert first[0].status_code == 200
        assert client.post("/v1/reformulate", json={"query": QUERIES[2], "max_new_tokens": 2}).status_code == 200
        assert app.state.batcher.outstanding == 0
        doc = client.get("/openapi.json").json()["paths"]["/v1/reformulate"]["post"]["responses"]
        assert doc["429"]["headers"]["Retry-After"]["required"] is True
    with pytest.raises(ValueError, match="max_queued_queries"):
        create_app(backend, limits=Limits(max_queries=8, max_queued_queries=4))


def test_draining_server_says_when_to_retry(backend):
    """503 while shutting down (health and requests), with Retry-After."""
    app = create_app(backend, limits=LIMITS)
    with serve(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        app.state.batcher.stop(30)  # what the lifespan does once uvicorn begins to shut down
        for r in (client.get("/healthz"), client.post("/v1/reformulate", json={"query": "a"})):
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["type"] == "unavailable"


def burst_of_50(client, app, backend):
    """50 clients at once: all answered, each with what a sequential call gives, in batches."""
    want = [expected(backend, q) for q in QUERIES]  # before the load: the worker is idle
    assert len({tuple(w) for w in want}) > 40, "the model must answer differently, or mix-ups go unseen"
    url = str(client.base_url)

    async def one(http, query):
        r = await http.post("/v1/reformulate", json={"query": query, "max_new_tokens": MAX_NEW})
        return r.status_code, r.json()

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=50)) as http:
            return await asyncio.gather(*(one(http, q) for q in QUERIES))

    batches_before = app.state.batcher.stats["batches"]
    results = asyncio.run(burst())
    assert [status for status, _ in results] == [200] * len(QUERIES)
    assert [body["subqueries"] for _, body in results] == [[w] for w in want]
    stats = app.state.batcher.stats
    assert stats["largest_batch"] > 1, "concurrent requests were never batched together"
    assert stats["batches"] - batches_before < len(QUERIES)
    assert client.get("/healthz").json() == {"status": "ok", "queued": 0}


def test_50_concurrent_clients_get_their_own_answers(server, backend):
    burst_of_50(*server, backend)


def test_50_concurrent_clients_onnx(model_dir):
    """The onnx backend (the default on Linux CPUs): its int8 kernels round a lone row differently from
    rows in pairs, so by default it generates a batch query by query and answers stay the sequential ones."""
    backend = make_backend("onnx").load(model_dir)
    app = create_app(backend, max_batch=16, batch_window_ms=20, limits=LIMITS)
    with serve(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        burst_of_50(client, app, backend)


class SlowBackend(Engine):
    """Fault injection for timeouts and shutdown: the real backend, `delay` seconds late."""

    def __init__(self, inner, delay):
        super().__init__()
        self.inner, self.delay, self.name, self.path, self.model = inner, delay, inner.name, inner.path, inner.model
        self.generating = threading.Event()

    def generate(self, queries, **options):
        self.generating.set()
        time.sleep(self.delay)
        return self.inner.generate(queries, **options)


def test_idle_server_does_not_wait_out_the_batch_window(backend):
    """A lone request is generated at once; the window only gathers requests that queue behind another."""
    batcher = Batcher(SlowBackend(backend, 0.3), window_ms=60_000)
    batcher.start()
    try:
        first = batcher.submit([QUERIES[0]], max_new_tokens=MAX_NEW)
        assert first.result(timeout=30) == backend.generate([QUERIES[0]], max_new_tokens=MAX_NEW)  # not 60 s
        # five jobs at once with max_batch 4: however the worker's first take races the submits, nothing
        # waits out the minute-long window (a batch leaves when full, a job alone when the queue is empty)
        batcher.max_batch = 4
        queries = QUERIES[:5]
        jobs = [batcher.submit([q], max_new_tokens=MAX_NEW) for q in queries]
        assert [j.result(timeout=30) for j in jobs] == [backend.generate([q], max_new_tokens=MAX_NEW)
                                                      for q in queries]
        assert batcher.stats["largest_batch"] == 4
    finally:
        batcher.stop(30)


def test_timeout_is_504_and_shutdown_finishes_in_flight_requests(backend):
    app = create_app(SlowBackend(backend, 0.6), limits=Limits(request_timeout_s=0.2))
    with serve(app) as (url, server):
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/v1/reformulate", json={"query": QUERIES[0], "max_new_tokens": MAX_NEW})
            assert r.status_code == 504 and "longer than 0.2 s" in r.json()["error"]["message"], r.text
            assert client.get("/healthz").status_code == 200

    slow = SlowBackend(backend, 0.5)
    app = create_app(slow)
    with serve(app) as (url, server):
        answers = []

        def request():
            with httpx.Client(base_url=url, timeout=30) as client:
                answers.append(client.post("/v1/reformulate", json={"query": QUERIES[1], "max_new_tokens": MAX_NEW}))

        thread = threading.Thread(target=request)
        thread.start()
        assert slow.generating.wait(30)  # shutdown begins while the request is being generated
        server.should_exit = True
        thread.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["subqueries"] == [expected(backend, QUERIES[1])]
    assert app.state.batcher.closing and not app.state.batcher._thread.is_alive()


def test_cli_torch_int8(model_dir):
    """python api.py --backend torch-int8: quantizes an HF folder on load, serves, stops cleanly on SIGINT."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "api.py", "--model", str(model_dir), "--backend", "torch-int8",
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        queries = QUERIES[:4]
        r = httpx.post(f"{url}/v1/reformulate", json={"queries": queries, "max_new_tokens": MAX_NEW}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "torch-int8"
        info = httpx.get(f"{url}/v1/model").json()
        assert info["dtype"] == "int8" and info["int8_linear_layers"] > 0
        local = make_backend("torch-int8").load(model_dir)
        assert r.json()["subqueries"] == [parse_subqueries(t) for t in local.generate(queries, max_new_tokens=MAX_NEW)]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err


def test_cli_bad_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "api.py", "--model", str(tmp_path / "missing"), "--backend", "mlx",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr, proc.stderr
