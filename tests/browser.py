"""Headless Chromium driven through Debian's chromedriver, with a minimal W3C WebDriver client.

The browser test of the Snakemake report (tests/test_report.py) opens the report in a real browser
and reads the DOM the page's scripts render. Chromium and chromedriver come from Debian's packages
``chromium`` and ``chromium-driver`` (scripts/install_browser.sh, run by scripts/setup_env.sh and
.ci/run). The client speaks the W3C WebDriver protocol over HTTP on loopback with the standard
library only: a session, navigation, script execution and screenshots are all the test needs.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# What Chromium needs on this machine: no sandbox as root, no GPU, and none of its background
# connections (the network is closed), a fresh profile.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000"]


def available() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session (``with Browser() as b: b.open(url) ...``)."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.port = _free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.session = None
        try:
            self._wait_ready()
            caps = {"browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={self.profile}"]}}
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except Exception:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.code} {err.read()[:2000]!r}") from None

    def _wait_ready(self) -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.driver.poll() is not None:
                raise RuntimeError(f"chromedriver exited with {self.driver.returncode}")
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise RuntimeError("chromedriver did not start within 30 s")

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        """Run JavaScript in the page (a function body: ``return ...``) and return its value."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *args, timeout: float = 30.0):
        """Run ``script`` until it returns something true; return that (or raise after ``timeout``)."""
        deadline = time.time() + timeout
        while True:
            value = self.run(script, *args)
            if value or time.time() > deadline:
                if not value:
                    raise TimeoutError(f"the page never satisfied: {script}")
                return value
            time.sleep(0.1)

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))
        return path

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}")
            except (OSError, RuntimeError):
                pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
