"""api.py against its own OpenAPI schema: Schemathesis, in-process over ASGI, every check it has.

The same run as `schemathesis run http://127.0.0.1:PORT/openapi.json --checks all` against a live server,
through Schemathesis' pytest integration: for every operation its examples, coverage and fuzzing phases,
and each response is checked by every registered check (no exclusions). A schema-valid request must
be answered (not 4xx), a schema-invalid one refused with a 4xx, every status and header must be
documented, every body must match its schema, an undeclared method must get 405 with `Allow`, and
nothing may be a 5xx.

Tiny limits keep each generated request cheap (the HTTP layer does not care how long the answer is);
the onnx backend, the default on Linux CPUs, answers a tiny model in milliseconds.
"""

import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig

from serving.api import Limits, create_app
from serving.backends import make_backend
from hf_models import save_model

SEED = 20261202
FUZZ_EXAMPLES = 450  # per operation, in the fuzzing phase (examples and coverage phases come on top)
MIN_CASES = 1000  # over all operations
BUDGET_S = 150  # ~40 s on an idle 2-core x86; a request path that turns slow fails here instead of bloating CI
LIMITS = Limits(max_query_chars=100, max_queries=4, max_new_tokens=4, max_beams=2, request_timeout_s=30.0,
                # every schema-valid body fits, even with each character \u-escaped as a surrogate pair (12
                # bytes): a 413 would be a schema-valid request refused (413 is for bodies no schema allows)
                max_body_bytes=64 * 1024)
assert LIMITS.max_body_bytes > LIMITS.max_queries * (LIMITS.max_query_chars * 12 + 4) + 1024

load_all_checks()
# `--checks all`: every check function Schemathesis registers (its classes are stateful-phase helpers)
ALL_CHECKS = [check for check in CHECKS.get_all() if not isinstance(check, type)]

# The schema is read from the app at collection (Schemathesis makes one test per operation from it);
# the model is built and loaded by a fixture, before the first request starts the app's lifespan.
# (schemathesis.pytest.from_fixture would defer all of it, but 4.32 sets `node._nodeid`, which pytest 9
# no longer has.)
BACKEND = make_backend("onnx")
APP = create_app(BACKEND, limits=LIMITS)
schema = schemathesis.openapi.from_dict(APP.openapi(), config=SchemathesisConfig.from_dict({
    "seed": SEED,  # a fixed seed: the same cases on every run, a failure reproduces
    "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none"},  # no .hypothesis/ replay
    "cache": {"enabled": False},  # nothing written to .schemathesis/
}))
schema.app = APP  # in-process: requests go to the ASGI app (as schemathesis.openapi.from_asgi sets it)


@pytest.fixture(scope="module")
def fuzz_stats(tmp_path_factory, tokenizer_dir):
    BACKEND.load(save_model("odd-heads", tmp_path_factory.mktemp("fuzz") / "model", tokenizer_dir))
    stats = {"cases": Counter(), "start": time.monotonic()}
    yield stats
    elapsed = time.monotonic() - stats["start"]
    print(f"\nschemathesis: {sum(stats['cases'].values())} cases in {elapsed:.1f} s: {dict(stats['cases'])}")
    assert sum(stats["cases"].values()) >= MIN_CASES, stats["cases"]
    assert elapsed < BUDGET_S, f"the fuzz run took {elapsed:.0f} s (budget {BUDGET_S} s)"


def test_every_check_runs():
    """The list above is what `--checks all` means: the checks behind the issue's failures are in it."""
    names = {check.__name__ for check in ALL_CHECKS}
    assert {"not_a_server_error", "positive_data_acceptance", "negative_data_rejection", "unsupported_method",
            "status_code_conformance", "response_schema_conformance", "response_headers_conformance",
            "content_type_conformance"} <= names, names


@schema.parametrize()
@settings(deadline=None)  # a model call's time varies with the machine's load; the budget above bounds the run
def test_api_conforms_to_its_schema(case, fuzz_stats):
    fuzz_stats["cases"][f"{case.method} {case.path}"] += 1
    case.call_and_validate(checks=ALL_CHECKS)
