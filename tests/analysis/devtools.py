"""Headless Chromium driven over the DevTools protocol, for tests that act on a page as a user does.

`open_page(url, folder)` starts Chromium with `--remote-debugging-pipe` (the protocol's JSON
messages, each ended by a NUL byte, on file descriptors 3 and 4 of the browser), opens one tab,
records every network request the tab makes (Network.requestWillBeSent), loads `url` and yields a
`Page`. `Page.click(x, y)` is a real mouse click (Input.dispatchMouseEvent: press and release of
the left button at that point of the viewport), which the page receives as a user's click.
The browser runs with name resolution mapped to nowhere and a proxy that does not exist, so a
request that tried to leave the machine would fail (and is recorded either way).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from tests.local_processes import CHROMIUM_FLAGS, require_chromium

OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


class Page:
    """One tab of a Chromium under test; `requests` lists the URL of every request it made."""

    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int, timeout: float):
        self._process, self._out, self._in, self._timeout = process, to_browser, from_browser, timeout
        self._buffer, self._next_id, self._events = b"", 0, []
        self.session: str | None = None
        self.requests: list[str] = []

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send one command and return its result (a RuntimeError for a protocol error)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, method: str) -> dict:
        """The next event named `method` (events seen before are searched first)."""
        while True:
            for position, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(position)
            self._events.append(self._read())

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """Press and release the left mouse button at (x, y) of the viewport, as a user clicks."""
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def _read(self) -> dict:
        deadline = time.monotonic() + self._timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._in], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"Chromium sent nothing for {self._timeout:.0f} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the protocol pipe (exit {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        event = json.loads(message)
        if event.get("method") == "Network.requestWillBeSent":
            self.requests.append(event["params"]["request"]["url"])
        return event


@contextmanager
def open_page(url: str, folder: Path, window: str = "1280,900", timeout: float = 60.0):
    """Chromium (offline, headless) with `url` loaded in one tab; yields its `Page`."""
    chromium = require_chromium()
    to_browser_read, to_browser = os.pipe()
    from_browser, from_browser_write = os.pipe()

    def as_fds_3_and_4():
        """In the browser's process: its ends of the pipes as fds 3 and 4, where --remote-debugging-pipe
        wants them (copied above 9 first, so neither overwrites the other)."""
        reading, writing = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_read, from_browser_write))
        os.dup2(reading, 3)
        os.dup2(writing, 4)

    command = [chromium, *CHROMIUM_FLAGS, *OFFLINE_FLAGS, "--remote-debugging-pipe", f"--window-size={window}",
               f"--user-data-dir={folder / 'profile'}", "about:blank"]
    # close_fds=False: fds 3 and 4 (inheritable, as dup2 makes them) stay open in the browser; Python's
    # own descriptors are not inheritable, so nothing else leaks into it.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=as_fds_3_and_4, close_fds=False)
    os.close(to_browser_read)
    os.close(from_browser_write)
    page = Page(process, to_browser, from_browser, timeout)
    try:
        target = page.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        page.session = page.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page.send("Network.enable")
        page.send("Page.enable")
        page.send("Page.navigate", {"url": url})
        page.wait_for("Page.loadEventFired")
        yield page
    finally:
        try:
            page.send("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(to_browser)
        os.close(from_browser)
