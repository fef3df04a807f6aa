"""A headless Debian Chromium driven over the DevTools protocol (websocket-client), for the OHIF browser test.

Only what the test needs: navigate, evaluate JavaScript, real mouse clicks, screenshots, and the page's console
messages and uncaught exceptions collected as they arrive.
"""

from __future__ import annotations

import base64
import itertools
import json
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from dicomnode.devpacs import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class BrowserError(RuntimeError):
    """Chromium did not start, a command failed, or a wait timed out."""


class Chromium:
    """One headless Chromium process with one page, driven through the DevTools protocol."""

    def __init__(self, profile_dir: Path, width: int = 1400, height: int = 900) -> None:
        self.port = free_port()
        self.width, self.height = width, height
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                f"--window-size={width},{height}", f"--user-data-dir={profile_dir}",
                "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={self.port}", "about:blank"]
        self._log = open(Path(profile_dir).parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.ws = websocket.create_connection(self._page_ws_url(), timeout=30, enable_multithread=True)
        self.ws.settimeout(None)  # the reader thread waits for events as long as the page lives
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _page_ws_url(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            time.sleep(0.2)
        raise BrowserError(f"chromium's DevTools endpoint did not answer within {timeout_s} s")

    def _read(self) -> None:
        while True:
            try:
                msg = json.loads(self.ws.recv())
            except (websocket.WebSocketException, OSError, ValueError):
                return
            if "id" in msg:
                with self._lock:
                    q = self._replies.get(msg["id"])
                if q is not None:
                    q.put(msg)
                continue
            self._event(msg.get("method", ""), msg.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.exceptions.append(str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append(f"{e.get('level')}: {e.get('text')} {e.get('url', '')}")

    def send(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result."""
        msg_id = next(self._ids)
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._replies[msg_id] = q
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        try:
            reply = q.get(timeout=timeout_s)
        except queue.Empty as exc:
            raise BrowserError(f"{method}: no answer within {timeout_s} s") from exc
        finally:
            with self._lock:
                self._replies.pop(msg_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    def navigate(self, url: str) -> None:
        """Open ``url`` in the page."""
        self.send("Page.navigate", url=url)

    def js(self, expression: str, timeout_s: float = 60.0) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value."""
        out = self.send("Runtime.evaluate", timeout_s=timeout_s, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in out:
            raise BrowserError(f"JavaScript failed: {out['exceptionDetails'].get('exception', {}).get('description')}")
        return out.get("result", {}).get("value")

    def wait_js(self, expression: str, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; return its value or fail naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(interval_s)
        raise BrowserError(f"timed out after {timeout_s} s waiting for {what}")

    def click(self, selector: str, count: int = 1) -> None:
        """A real mouse click (``count=2``: double click) on the centre of the first element matching ``selector``."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                      " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise BrowserError(f"nothing matches {selector}")
        x, y = box
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=n)

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> bytes:
        """Write a PNG of the page (or of ``clip``: x, y, width, height) to ``path``; return its bytes."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        Path(path).write_bytes(data)
        return data

    def close(self) -> None:
        """Close the connection and end the browser process."""
        try:
            self.ws.close()
        except (websocket.WebSocketException, OSError):
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()
