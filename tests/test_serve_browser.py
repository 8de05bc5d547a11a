"""The page in a real headless Chromium: add history titles, click Recommend, see recommendations and the explanation.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with httpx (no selenium needed). Needs Debian's
``chromium`` and ``chromium-driver`` packages (scripts/install.sh installs them); without them this test FAILS.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from delrec.recommend import DELRec
from delrec.serve import create_app
from test_serve import ServerThread, free_port
from tiny_run import build_tiny_run

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


def _which(*names: str) -> str | None:
    return next((p for n in names if (p := shutil.which(n))), None)


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self, driver_url: str, chromium: str, profile: Path) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=60)
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": [*FLAGS, f"--user-data-dir={profile}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def find(self, css: str) -> str:
        return str(self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def type(self, element: str, text: str) -> None:
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def click(self, element: str) -> None:
        self.cmd("POST", f"/element/{element}/click", {})

    def text(self, element: str) -> str:
        return str(self.cmd("GET", f"/element/{element}/text"))

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := cond():
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; page error: {self.text(self.find('#error'))!r}")

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chromium = _which("chromium", "chromium-browser")
    driver = _which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(f"the browser test needs Chromium and chromedriver; install them with: {INSTALL}", pytrace=False)
    port = free_port()
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromedriver ({driver}) did not start", pytrace=False)
            time.sleep(0.1)
        b = Browser(url, chromium, tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield b
        finally:
            b.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, DELRec]]:
    model = DELRec.from_pretrained(build_tiny_run(tmp_path_factory.mktemp("browser")))
    srv = ServerThread(create_app(model), free_port()).start()
    yield srv.url, model
    srv.stop()


def test_page_recommends_and_explains(browser: Browser, served: tuple[str, DELRec]) -> None:
    url, model = served
    browser.get(url + "/")
    browser.wait("the /health info line", lambda: "40 items" in browser.text(browser.find("#info")))
    history = [model.dataset.titles[int(i)] for i in model.dataset.sequences[0][:3]]
    box = browser.find("#title-input")
    for title in history:
        browser.type(box, title + "\ue007")  # \ue007: the Enter key submits the add form
    assert [browser.text(li).rstrip("×").strip() for li in browser.find_all("#history li")] == history
    k = browser.find("#k")
    browser.cmd("POST", f"/element/{k}/clear", {})
    browser.type(k, "5")
    browser.click(browser.find("#recommend"))

    browser.wait("5 recommendations", lambda: len(browser.find_all("#recommendations li")) == 5)
    shown = [browser.text(e) for e in browser.find_all("#recommendations .rec-title")]
    scores = [float(browser.text(e)) for e in browser.find_all("#recommendations .score")]
    assert not set(shown) & set(history) and set(shown) <= set(model.dataset.titles[1:])
    assert scores == sorted(scores, reverse=True)
    assert shown == [r.title for r in model.recommend(history, k=5)]  # what the library answers

    bars = browser.wait("influence bars", lambda: browser.find_all(".influence"))
    assert len(bars) == 3
    assert {browser.text(browser.find_all(".bar-label")[j]) for j in range(3)} == set(history)
    picks = browser.wait("the teacher's top-k", lambda: browser.find_all(".teacher-pick"))
    assert len(picks) == 5
    assert browser.text(browser.find("#error")) == ""
