"""A real headless chromium for tests of the web pages (Debian's package; scripts/test.sh installs it): a page's DOM
after its scripts ran (`rendered_page`), or a page driven like a person would (`Chromium`: the DevTools protocol over
chromium's --remote-debugging-pipe, so no driver or websocket library is needed)."""

import contextlib
import fcntl
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking"]


def browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed; scripts/test.sh installs it (apt-get install chromium)")
    return path


def rendered_page(url: str) -> str:
    """The page's DOM after its scripts ran, as headless chromium renders it."""
    result = subprocess.run([browser(), *FLAGS, "--virtual-time-budget=4000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Page:
    """One tab, attached with a DevTools session."""

    def __init__(self, browser: "Chromium", session_id: str):
        self.browser, self.session_id = browser, session_id

    def command(self, method: str, **params) -> dict:
        return self.browser.command(method, session_id=self.session_id, **params)

    def evaluate(self, expression: str):
        reply = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Polls `expression` until it is truthy (one that throws, e.g. while the page loads, counts as falsy);
        returns its value."""
        deadline, problem = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                if value := self.evaluate(expression):
                    return value
            except AssertionError as error:
                problem = error
            time.sleep(0.05)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s (last error: {problem})")

    def type_text(self, text: str) -> None:
        """Types into the focused element, as a keyboard would (input events and all)."""
        self.command("Input.insertText", text=text)

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.command("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


class Chromium:
    """A headless chromium spoken to over its DevTools pipe (fd 3 in, fd 4 out, messages ending in NUL)."""

    def __init__(self):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child's ends move above 9 first, so that putting them at 3 and 4 cannot overwrite one with the other.
        to_browser_read, from_browser_write = (_above_nine(fd) for fd in (to_browser_read, from_browser_write))
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        argv = [browser(), *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser_read} 4>&{from_browser_write}', "bash", *argv],
            pass_fds=(to_browser_read, from_browser_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                reply = json.loads(message)
                if "id" in reply:
                    with self._lock:
                        waiting = self._replies.get(reply["id"])
                    if waiting is not None:
                        waiting.put(reply)

    def command(self, method: str, session_id: str | None = None, timeout: float = 30.0, **params) -> dict:
        message_id = next(self._ids)
        waiting: queue.Queue = queue.Queue()
        with self._lock:
            self._replies[message_id] = waiting
        message = {"id": message_id, "method": method, "params": params}
        if session_id:
            message["sessionId"] = session_id
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        try:
            reply = waiting.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"chromium did not answer {method} within {timeout} s") from None
        finally:
            with self._lock:
                del self._replies[message_id]
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> Page:
        target = self.command("Target.createTarget", url=url)["targetId"]
        session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("Browser.close", timeout=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()
