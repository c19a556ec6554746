"""The page of api.py in a real headless Chromium, used as a person would: type, press Enter, read.

    with api_server("runs/quickstart/best") as url, chromium() as driver:
        page = Page(driver, url)
        page.ask("Who wrote Dune?", beams=4)   # -> Shown(subqueries=[...], status="...", error=None)

Selenium drives the system's Chromium through its chromedriver (Debian: `apt-get install chromium
chromium-driver`; setup.sh does it on Linux), both from the same distribution package, so their versions
match; nothing is downloaded. CHROMIUM and CHROMEDRIVER override the paths.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]  # the checkout: api.py, docs/
# a closed network: anything Chromium does in the background only fails or waits, so none of it runs
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--disable-dev-shm-usage"]


class BrowserUnavailable(RuntimeError):
    """No Chromium, chromedriver or selenium here; the message says which and how to install it."""


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserUnavailable saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (pip install -e '.[dev]')") from None
    browser = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        raise BrowserUnavailable(f"no {' or '.join(missing)} on PATH (Debian/Ubuntu: apt-get install chromium "
                                 "chromium-driver; setup.sh does it on Linux)")
    return browser, driver


@contextmanager
def chromium(width: int = 1000, height: int = 800) -> Iterator["WebDriver"]:  # noqa: F821
    """A headless Chromium with a fresh profile and its console log kept; quit and removed afterwards."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            driver = webdriver.Chrome(options=options, service=Service(driver_path))
        except WebDriverException as err:
            raise BrowserUnavailable(f"{browser} did not start: {err.msg or err}".strip()) from None
        try:
            yield driver
        finally:
            driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_server(model: str, *args: str, timeout: float = 180.0) -> Iterator[str]:
    """`python api.py --model MODEL ARGS...` on a free port of 127.0.0.1; yields its URL once /healthz
    answers; Ctrl-C (SIGINT) and a clean exit afterwards."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "api.py"), "--model", str(model), "--port", str(port),
                             "--log-level", "warning", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"api.py exited with status {proc.returncode}: {proc.communicate()[1].strip()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"api.py did not answer on {url} within {timeout:g} s")
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


@dataclass
class Shown:
    """What the page shows after a question: the subqueries listed, the line under them, the error."""

    subqueries: list[str]
    status: str
    error: Optional[str]


class Page:
    """The page at `url`, used through the keyboard like a person would."""

    def __init__(self, driver, url: str, timeout: float = 120.0):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.by = driver, url, By
        self.wait = WebDriverWait(driver, timeout)
        driver.get(url + "/")
        # the model line is filled in from /v1/model once the script has run
        self.wait.until(lambda d: not self.text("model").startswith("Asking"))

    def element(self, element_id: str):
        return self.driver.find_element(self.by.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.element(element_id).text

    def answered(self) -> int:
        return int(self.element("answer").get_attribute("data-answered") or 0)

    def type_into(self, element_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.element(element_id)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)

    def ask(self, question: str, beams: Optional[int] = None, max_tokens: Optional[int] = None) -> Shown:
        """Set the options that are given, type the question, press Enter; wait for the answer or the error."""
        from selenium.webdriver.common.keys import Keys

        if beams is not None:
            self.type_into("beams", str(beams))
        if max_tokens is not None:
            self.type_into("max-tokens", str(max_tokens))
        before = self.answered()
        self.type_into("question", question)
        self.element("question").send_keys(Keys.ENTER)
        self.wait.until(lambda d: self.answered() > before)
        return self.shown()

    def shown(self) -> Shown:
        items = self.driver.find_elements(self.by.CSS_SELECTOR, "#subqueries li")
        error = self.element("error")
        return Shown(subqueries=[li.get_attribute("textContent") for li in items], status=self.text("status"),
                     error=error.text if error.is_displayed() else None)

    def history(self) -> list[str]:
        """The questions of the history list, newest first."""
        return [b.text for b in self.driver.find_elements(self.by.CSS_SELECTOR, "#history li button")]

    def console_errors(self) -> list[str]:
        """Messages the page logged at level SEVERE since the last call (failed loads, CSP violations, ...)."""
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def screenshot(self, path: Path, width: int, mobile: bool = False) -> Path:
        """A PNG of the whole page at `width` CSS pixels (a phone's viewport with mobile=True)."""
        cdp = self.driver.execute_cdp_cmd
        cdp("Emulation.setDeviceMetricsOverride", {"width": width, "height": 600, "deviceScaleFactor": 1,
                                                  "mobile": mobile})
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        cdp("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                  "mobile": mobile})
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not self.driver.save_screenshot(str(path)):
                raise RuntimeError(f"could not write {path}")
        finally:
            cdp("Emulation.clearDeviceMetricsOverride", {})
        return Path(path)
