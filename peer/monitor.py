"""`swarm-peer monitor`: a web dashboard of the swarm, served from this machine (no outside assets, so it works
for private swarms). A background thread keeps one snapshot fresh; every page view reads that snapshot."""

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files

from swarm.swarm_state import take_snapshot

logger = logging.getLogger(__name__)


class SnapshotKeeper:
    """Re-reads the swarm from the DHT every `period` seconds; holds the latest snapshot as JSON."""

    def __init__(self, dht, period: float):
        self.dht, self.period = dht, period
        self.json: bytes | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarm-snapshots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period + 30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.json, self.error = json.dumps(take_snapshot(self.dht).to_dict()).encode(), None
            except Exception as error:  # the DHT may be unreachable for a while; the page says so and we retry
                logger.warning(f"cannot read the swarm: {error!r}")
                self.error = repr(error)
            self._stop.wait(self.period)


def dashboard_page(refresh_seconds: float) -> bytes:
    page = files("peer").joinpath("static/dashboard.html").read_text()
    return page.replace("__REFRESH_MS__", str(int(refresh_seconds * 1000))).encode()


def make_handler(keeper: SnapshotKeeper, page: bytes) -> type[BaseHTTPRequestHandler]:
    class DashboardHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", page)
            elif path == "/api/swarm":
                if keeper.json is not None:
                    self._send(HTTPStatus.OK, "application/json", keeper.json)
                else:
                    body = json.dumps({"error": keeper.error or "reading the swarm, try again in a moment"}).encode()
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", body)
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # one line per request would drown the operator's log
            logger.debug(format, *args)

    return DashboardHandler


class Dashboard:
    """The HTTP server and its snapshot thread; `start()` returns once it listens, `stop()` takes both down."""

    def __init__(self, dht, host: str, port: int, refresh_seconds: float):
        self.keeper = SnapshotKeeper(dht, refresh_seconds)
        self.server = ThreadingHTTPServer((host, port), make_handler(self.keeper, dashboard_page(refresh_seconds)))
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/"

    def start(self) -> None:
        self.keeper.start()
        threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.keeper.stop()
