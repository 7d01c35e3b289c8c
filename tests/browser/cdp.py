"""A small client for headless Chromium's DevTools protocol, over a pipe (no port, no network).

Chromium is started with ``--remote-debugging-pipe``: it reads commands on its fd 3 and writes
answers and events on its fd 4, each a JSON object ended by a NUL byte. A reader thread splits
them; :meth:`Browser.call` sends a command and waits for its answer, keeping the events
(console messages, exceptions, CSP reports) for :meth:`Page.problems`. Enough to load pages,
type, click, evaluate script and take screenshots, written for these tests.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars")


class CdpError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """Debian's Chromium, installed with apt-get when missing and we may (root, apt-get);
    None when it cannot be had (the caller skips, saying why)."""
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                  "fonts-dejavu-core"], ["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                  "fonts-dejavu-core"]):
        done = subprocess.run(args, env=env, capture_output=True, timeout=600, check=False)
        if done.returncode == 0 and args[1] == "install":
            break
    return shutil.which("chromium")


class Browser:
    """One headless Chromium with a fresh profile in ``profile``."""

    def __init__(self, chromium: str, profile: Path, log: Path) -> None:
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        args = [*FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                "--window-size=1280,900", "about:blank"]
        # fds 3 and 4 of Chromium are the two pipes (bash maps them, Python's subprocess
        # cannot; bash, not sh: dash takes single-digit descriptors only)
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', chromium,
             *args], pass_fds=(to_chrome_r, from_chrome_w), stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._lock = threading.Lock()
        self._answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                for waiting in list(self._answers.values()):
                    waiting.put({"error": {"message": "Chromium closed the pipe"}})
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message and message["id"] in self._answers:
                    self._answers[message["id"]].put(message)
                else:
                    self.events.append(message)

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            ident = self._next
            answer: queue.Queue[dict[str, Any]] = queue.Queue()
            self._answers[ident] = answer
            message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            os.write(self._out, json.dumps(message).encode() + b"\0")
        try:
            reply = answer.get(timeout=timeout)
        except queue.Empty:
            raise CdpError(f"{method}: no answer in {timeout:.0f}s") from None
        finally:
            self._answers.pop(ident, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            page.call(method)
        page.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                        "deviceScaleFactor": 1,
                                                        "mobile": False})
        return page

    def close(self) -> None:
        with contextlib.suppress(CdpError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()


class Page:
    """One tab: navigate, evaluate, type, click, wait, screenshot."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def eval(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            raise CdpError(f"script failed: {text}")
        return result["result"].get("value")

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'",
                  timeout, f"{url} to load")

    def wait(self, expression: str, timeout: float = 30.0, what: str = "") -> None:
        """Until ``expression`` is truthy in the page (errors while it loads count as no)."""
        deadline = time.monotonic() + timeout
        while True:
            value = None
            with contextlib.suppress(CdpError):
                value = self.eval(f"!!({expression})")
            if value:
                return
            if time.monotonic() > deadline:
                raise CdpError(f"timed out after {timeout:.0f}s waiting for {what or expression}")
            time.sleep(0.1)

    def text(self, selector: str) -> str:
        return str(self.eval(f"(document.querySelector({json.dumps(selector)}) || "
                             "{textContent: ''}).textContent"))

    def type(self, selector: str, text: str) -> None:
        """Focus the field and type into it as a user would (keyboard text input)."""
        self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                  "e.focus(); e.select && e.select(); return true; })()")
        self.call("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (after scrolling it into view)."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                        "if (!e) return null; e.scrollIntoView({block: 'center'}); "
                        "const r = e.getBoundingClientRect(); "
                        "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if box is None:
            raise CdpError(f"no element {selector}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the viewport) as PNG."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """Script exceptions, console errors and security reports (CSP) seen by this tab;
        failed network requests are left out (some tests make them on purpose)."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + str((details.get("exception") or {}).get(
                    "description") or details.get("text")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error" and \
                    params["entry"].get("source") != "network":
                found.append(f"{params['entry'].get('source')}: {params['entry']['text']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]))
        return found
