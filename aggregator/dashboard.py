"""A live dashboard for `prufed aggregator serve --dashboard HOST:PORT`.

One self-contained page (no CDN, no build step: machines here are offline) that polls `GET /api/snapshot` once a
second and draws the rounds, clients per depth, federated-evaluation loss per depth over rounds, uploads and bytes,
and refusals by code. The server is the standard library's threading HTTP server; it knows nothing of the
federation except a `snapshot()` callable, so it works over any replica's database.

Access: on a loopback address it is open. On any other address it needs TLS and the bearer token, as the gRPC API
does (`Authorization: Bearer T`, or `?token=T` for a browser, which the page then keeps for its API calls).
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prufed.common.errors import ConfigError
from prufed.common.net import is_loopback_host

log = logging.getLogger("prufed.aggregator.dashboard")

Snapshot = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class DashboardConfig:
    """Where the page listens and how it is protected."""

    host: str = "127.0.0.1"
    port: int = 0  #: 0 = any free port (the bound one is `Dashboard.port`)
    token: str | None = None  #: bearer token; required off loopback
    tls_cert: str | None = None  #: PEM files; required off loopback
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("--dashboard", f"port {self.port} is out of range")
        if not is_loopback_host(self.host) and (not self.token or not (self.tls_cert and self.tls_key)):
            raise ConfigError("--dashboard", f"{self.host} is not a loopback address: the dashboard then needs TLS "
                                             "(--tls-cert/--tls-key) and an enrolment token, as the API does")


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[::1]:PORT') -> (host, port), with a message that names --dashboard."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("--dashboard", f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_snapshot(status: Mapping[str, Any], registry: Any) -> dict[str, Any]:
    """The page's data: the federation status (from the database, so any replica shows the same rounds) plus this
    replica's Prometheus counters (uploads, bytes, refusals by code).

    Loss per depth over rounds is the federated evaluation (`rounds[i]["eval"][depth]["loss"]`) when clients report
    it, else the held-out loss a simulation records (`rounds[i]["metrics"]["heldout_loss"][depth]`)."""

    def total(name: str, **labels: str) -> float:
        return float(registry.get_sample_value(name, labels) or 0.0)

    refusals: dict[str, float] = {}
    for family in registry.collect():
        if family.name == "prufed_refusals":
            for sample in family.samples:
                if sample.name == "prufed_refusals_total":
                    code = sample.labels.get("code", "")
                    refusals[code] = refusals.get(code, 0.0) + sample.value
    federated: dict[str, list[list[float]]] = {}
    heldout: dict[str, list[list[float]]] = {}
    for row in status.get("rounds", []):
        for depth, entry in (row.get("eval") or {}).items():
            federated.setdefault(str(depth), []).append([row["round"], float(entry["loss"])])
        for depth, loss in ((row.get("metrics") or {}).get("heldout_loss") or {}).items():
            heldout.setdefault(str(depth), []).append([row["round"], float(loss)])
    return {
        "status": dict(status),
        "uploads": {"count": total("prufed_uploads_total", outcome="accepted", code=""),
                    "bytes": total("prufed_upload_bytes_total")},
        "downloads": {"bytes": total("prufed_download_bytes_total")},
        "refusals": {code: int(count) for code, count in sorted(refusals.items())},
        "loss_per_depth": federated or heldout,
        "loss_source": "federated" if federated else "heldout",
    }


def _page() -> bytes:
    return resources.files("aggregator").joinpath("dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _DashboardHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard %s", format % args)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        given = given or parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, b'{"error": "missing or wrong token"}', "application/json")
            return
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
        elif path == "/api/snapshot":
            try:
                body = json.dumps(self.server.snapshot(), sort_keys=True, default=str).encode()
            except Exception:  # the page shows the failure; the server keeps serving
                log.exception("dashboard snapshot failed")
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b'{"error": "snapshot failed"}', "application/json")
                return
            self._send(HTTPStatus.OK, body, "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}', "application/json")


class _DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot: Snapshot, token: str | None) -> None:
        self.snapshot = snapshot
        self.token = token
        super().__init__(address, _Handler)


class Dashboard:
    """The running page: `start()` binds and serves on a daemon thread, `stop()` shuts it down."""

    def __init__(self, config: DashboardConfig, snapshot: Snapshot) -> None:
        self.config = config
        self._server = _DashboardHTTPServer((config.host, config.port), snapshot, config.token)
        if config.tls_cert and config.tls_key:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.tls_cert, config.tls_key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        log.info("dashboard listening", extra={"url": self.url})
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
