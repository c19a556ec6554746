"""The web page (serving/web/) served by a real `python api.py` process with a tiny random-init T5, used in a real
headless Chromium as a person would: type, press Enter, read; what it shows must equal the JSON API's
answers. Skipped, with the reason, where no Chromium + chromedriver + selenium can be found (setup.sh
installs them on Linux)."""

import re
import struct
from contextlib import ExitStack
from dataclasses import replace

import httpx
import pytest

from serving.api import create_app
from serving.backends import make_backend
from hf_models import QUERIES, save_model
from test_api import LIMITS, serve
from test_api_stream import StreamFaults
from serving.web.browser import BrowserUnavailable, Page, api_server, chromium

MAX_CHARS = 120  # --max-query-chars: an over-long question is quick to type
MAX_NEW = 8  # random weights rarely emit EOS: keep every answer short


@pytest.fixture(scope="module")
def url(tmp_path_factory, tokenizer_dir):
    model = save_model("odd-heads", tmp_path_factory.mktemp("web") / "model", tokenizer_dir)
    with api_server(model, "--max-query-chars", str(MAX_CHARS), "--max-beams", "4", "--max-new-tokens", "32") as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    with ExitStack() as stack:
        try:
            driver = stack.enter_context(chromium())
        except BrowserUnavailable as err:
            pytest.skip(f"no headless browser for the page test: {err}")
        yield driver


def api_answer(url, query, **options) -> dict:
    r = httpx.post(f"{url}/v1/reformulate", json={"query": query, **options}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def csp_directives(header: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in header.split(";") if part.strip())}


def test_page_is_self_contained_with_a_strict_csp(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assets = re.findall(r'<(?:script|link)\b[^>]*\b(?:src|href)="([^"]*)"', html)
    assert "/web/app.js" in assets and "/web/style.css" in assets, assets
    assert all(a.startswith("/") and not a.startswith("//") or a.startswith("data:") for a in assets), assets
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html), "inline style or event handler"
    for response, media_type in [(page, "text/html"), (httpx.get(f"{url}/web/app.js"), "text/javascript"),
                                 (httpx.get(f"{url}/web/style.css"), "text/css")]:
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"https?://|@import|url\(", response.text), f"{response.url} reaches out"
        csp = csp_directives(response.headers["content-security-policy"])
        assert csp["default-src"] == ["'none'"]
        for directive in ("script-src", "style-src", "connect-src"):
            assert csp[directive] == ["'self'"], (directive, csp)
        assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert httpx.get(f"{url}/web/other.js").status_code == 404  # only the page's own files are served


def test_page_answers_as_the_api_does(url, driver, tmp_path):
    first, second = QUERIES[0], QUERIES[4]
    want_first = api_answer(url, first, max_new_tokens=MAX_NEW)
    want_second = api_answer(url, second, max_new_tokens=MAX_NEW, num_beams=2)
    assert want_first["subqueries"][0] and want_second["subqueries"][0]
    assert want_first["subqueries"] != want_second["subqueries"], "equal answers would hide a stale page"

    page = Page(driver, url)
    box = page.element("question")
    assert driver.switch_to.active_element == box, "the question box has the focus on load"
    assert want_first["model"] in page.text("model") and want_first["backend"] in page.text("model")

    shown = page.ask(first, beams=1, max_tokens=MAX_NEW)  # greedy: streamed from /v1/reformulate/stream
    assert shown.error is None and shown.subqueries == want_first["subqueries"][0]
    assert want_first["backend"] in shown.status and want_first["model"] in shown.status
    assert re.search(r"\d+ ms", shown.status) and "greedy" in shown.status
    assert driver.switch_to.active_element == box, "the focus stays in the question box"

    shown = page.ask(second, beams=2)  # beam search: /v1/reformulate
    assert shown.error is None and shown.subqueries == want_second["subqueries"][0]
    assert "2 beams" in shown.status
    assert page.history() == [second, first]

    too_long = (first + " ") * (MAX_CHARS // len(first) + 1)
    r = httpx.post(f"{url}/v1/reformulate/stream", json={"query": too_long, "num_beams": 1,
                                                         "max_new_tokens": MAX_NEW})
    assert r.status_code == 422
    shown = page.ask(too_long, beams=1)
    assert shown.error and r.json()["error"]["message"] in shown.error and "422" in shown.error, shown
    assert shown.subqueries == [] and page.history() == [second, first]

    shown = page.ask("   ")
    assert shown.error and "type a question" in shown.error

    driver.find_elements(page.by.CSS_SELECTOR, "#history li button")[1].click()  # the first question again
    assert page.shown().subqueries == want_first["subqueries"][0] and box.get_attribute("value") == first
    assert driver.switch_to.active_element == box

    # nothing failed to load and nothing broke the CSP; the one expected failure is the 422 above
    errors = [e for e in page.console_errors() if "status of 422" not in e]
    assert errors == [], errors

    png = page.screenshot(tmp_path / "web.png", 900)
    width, height = struct.unpack(">II", png.read_bytes()[16:24])  # the PNG's IHDR
    assert width == 900 and height > 600
    print(f"\nscreenshot: {png}")


def test_page_fits_a_phone(url, driver):
    page = Page(driver, url)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844,
                                                                  "deviceScaleFactor": 1, "mobile": True})
    try:
        shown = page.ask(QUERIES[1], beams=1, max_tokens=MAX_NEW)
        assert shown.error is None and shown.subqueries
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
        for element_id in ("question", "beams", "max-tokens"):
            rect = page.element(element_id).rect
            assert 0 <= rect["x"] and rect["x"] + rect["width"] <= 390, (element_id, rect)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_page_explains_timeouts_and_a_stopped_server(driver, tokenizer_dir, tmp_path):
    """Fault injection (an in-process server whose model is slower than its timeout), then no server at all:
    the page says what happened, for the streamed and the JSON path."""
    backend = make_backend("mlx").load(save_model("odd-heads", tmp_path / "model", tokenizer_dir))
    app = create_app(StreamFaults(backend, delay=0.6), limits=replace(LIMITS, request_timeout_s=0.5))
    with serve(app) as (url, _):
        page = Page(driver, url)
        shown = page.ask(QUERIES[0], beams=1, max_tokens=MAX_NEW)  # an `error` event of the stream
        assert shown.error == "Timed out: generation took longer than 0.5 s" and shown.subqueries == [], shown
        shown = page.ask(QUERIES[0], beams=2)  # a 504 from /v1/reformulate
        assert shown.error == "Timed out: generation took longer than 0.5 s (HTTP 504)", shown
    shown = page.ask(QUERIES[1], beams=1)
    assert shown.error and shown.error.startswith("No connection: could not reach the server"), shown
