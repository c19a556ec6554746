"""POST /v1/reformulate/stream (server-sent events) over real HTTP, against /v1/reformulate's answers."""

import json
import threading
import time
from dataclasses import replace

import httpx
import pytest

from serving.api import create_app
from serving.backends import Engine, make_backend
from hf_models import save_model
from reformulation.data import parse_subqueries
from test_api import LIMITS, MAX_NEW, QUERIES, serve


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) of each server-sent event in a finished response."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            out.append((fields["event"], json.loads(fields["data"])))
    return out


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tokenizer_dir, blas_one_thread):
    model_dir = save_model("odd-heads", tmp_path_factory.mktemp("stream") / "model", tokenizer_dir)
    return make_backend("mlx").load(model_dir)


@pytest.fixture(scope="module")
def client(backend):
    with serve(create_app(backend, limits=LIMITS)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_greedy_streams_the_json_answer(client):
    for query in QUERIES[:3]:
        want = client.post("/v1/reformulate", json={"query": query, "max_new_tokens": MAX_NEW}).json()
        r = client.post("/v1/reformulate/stream", json={"query": query, "max_new_tokens": MAX_NEW})
        assert r.status_code == 200, r.text
        got = events(r)
        kinds = [kind for kind, _ in got]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"piece"}, kinds
        assert len(kinds) > 2, "greedy answers come in several pieces"
        text = "".join(data["text"] for _, data in got[:-1])
        done = got[-1][1]
        assert done["subqueries"] == want["subqueries"] == [parse_subqueries(text)], (text, done, want)
        assert done["subqueries"][0], "an empty answer would prove little"
        assert done["backend"] == want["backend"] and done["model"] == want["model"] and done["latency_ms"] > 0
    assert client.get("/v1/model").json()["serving"]["streams"] >= 3


def test_beam_search_is_one_piece(client):
    query = QUERIES[3]
    want = client.post("/v1/reformulate", json={"query": query, "max_new_tokens": MAX_NEW, "num_beams": 2}).json()
    got = events(client.post("/v1/reformulate/stream", json={"query": query, "max_new_tokens": MAX_NEW,
                                                              "num_beams": 2}))
    assert [kind for kind, _ in got] == ["piece", "done"]
    assert got[1][1]["subqueries"] == want["subqueries"]


@pytest.mark.parametrize("payload, needle, field", [
    ({"query": "a", "queries": ["b"]}, "Extra inputs are not permitted", "queries"),
    ({}, "Field required", "query"),
    ({"query": "x" * 201}, "at most 200 characters", "query"),
    ({"query": " \t"}, "blank", "query"),
    ({"query": "a", "num_beams": 5}, "less than or equal to 4", "num_beams"),
    ({"query": "a", "temperature": 0.5, "num_beams": 2}, "num_beams = 1", None),
])
def test_bad_requests_are_json_errors_before_the_stream(client, payload, needle, field):
    r = client.post("/v1/reformulate/stream", json=payload)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    error = r.json()["error"]
    assert needle in error["message"] and error["field"] == field, error


def test_schema(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/reformulate/stream"]["post"]
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    each_event = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    assert [e["properties"]["event"]["const"] for e in each_event] == ["piece", "done", "error"]
    assert each_event[1]["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/ReformulateResponse"}
    for code in ("422", "429", "503"):
        assert list(operation["responses"][code]["content"]) == ["application/json"], code
    assert "504" not in operation["responses"]  # a timeout is an `error` event of the stream
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    request = client.get("/openapi.json").json()["components"]["schemas"][body]
    assert request["required"] == ["query"] and "queries" not in request["properties"]


class StreamFaults(Engine):
    """The real backend with `delay` seconds before each streamed piece (and before each generate), or a
    stream failing after its first piece."""

    def __init__(self, inner, delay=0.0, fail=False):
        super().__init__()
        self.inner, self.delay, self.fail = inner, delay, fail
        self.name, self.path, self.model = inner.name, inner.path, inner.model
        self.pieces, self.closed = 0, threading.Event()

    def _generate(self, *args):
        time.sleep(self.delay)
        return self.inner._generate(*args)

    def _stream(self, query, options):
        try:
            for piece in self.inner._stream(query, options):
                time.sleep(self.delay)
                if self.fail and self.pieces:
                    raise RuntimeError("injected failure")
                self.pieces += 1
                yield piece
        finally:
            self.closed.set()


def test_timeout_and_failure_are_error_events(backend):
    slow = StreamFaults(backend, delay=0.3)
    limits = replace(LIMITS, request_timeout_s=0.5)
    with serve(create_app(slow, limits=limits)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        got = events(client.post("/v1/reformulate/stream", json={"query": QUERIES[0], "max_new_tokens": 32}))
        assert got[-1] == ("error", {"error": {"message": "generation took longer than 0.5 s", "field": None,
                                               "type": "timeout"}}), got
        assert slow.closed.wait(10) and slow.pieces < 32, "the timed-out generation was not stopped"
        assert client.get("/healthz").status_code == 200

    failing = StreamFaults(backend, fail=True)
    with serve(create_app(failing, limits=LIMITS)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        got = events(client.post("/v1/reformulate/stream", json={"query": QUERIES[0], "max_new_tokens": MAX_NEW}))
        assert [kind for kind, _ in got] == ["piece", "error"], got
        assert got[-1][1]["error"]["type"] == "generation_error" and "injected failure" in got[-1][1]["error"]["message"]
        r = client.post("/v1/reformulate", json={"query": QUERIES[0], "max_new_tokens": MAX_NEW})
        assert r.status_code == 200, r.text  # the worker survived


def test_disconnect_stops_generation_and_a_full_queue_is_429(backend):
    slow = StreamFaults(backend, delay=0.2)
    limits = replace(LIMITS, max_queries=1, max_queued_queries=1)
    with serve(create_app(slow, limits=limits)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/reformulate/stream", json={"query": QUERIES[0], "max_new_tokens": 32}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # generation has begun: it holds the one queue place
            busy = client.post("/v1/reformulate/stream", json={"query": QUERIES[1]})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "queue_full", busy.text
            assert int(busy.headers["Retry-After"]) >= 1
        assert slow.closed.wait(10) and slow.pieces < 32, "generation went on after the client left"
        deadline = time.monotonic() + 10
        while client.post("/v1/reformulate/stream", json={"query": QUERIES[1], "max_new_tokens": 2}).status_code != 200:
            assert time.monotonic() < deadline, "the queue place was never released"
            time.sleep(0.05)
