"""The aggregator gRPC server: auth interceptor, TLS/mTLS, health, metrics, JSON logs, and the round ticker.

`create_server(address, store, config, ...) -> (server, port)`; the server holds no federation state of its own
(see `aggregator.federation`), so several can share one database.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aggregator.config import AggregatorConfig
from aggregator.dashboard import Dashboard, DashboardConfig, build_snapshot
from aggregator.federation import Federation
from aggregator.servicer import AggregatorServicer, bearer_token, refuse
from aggregator.state import Store
from prufed.common.errors import ConfigError
from prufed.common.net import is_loopback_host
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import MESSAGE_CAP_BYTES
from prufed.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger("prufed.aggregator")

SERVICE_NAME = "prufed.v1.Aggregator"
TICK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: mutual TLS, clients must present a cert signed by this CA

    def credentials(self) -> grpc.ServerCredentials:
        for flag, path in (("--tls-cert", self.cert_file), ("--tls-key", self.key_file),
                           ("--tls-client-ca", self.client_ca_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(flag, f"{path}: no such file")
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus any `extra=` fields."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("prufed")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    grpc_log = logging.getLogger("grpc")  # gRPC's own errors (e.g. "Exception calling application") reach the log
    grpc_log.handlers[:] = [handler]
    grpc_log.setLevel(logging.WARNING)
    grpc_log.propagate = False


class Metrics:
    """Prometheus metrics in a private registry (several servers may live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploads = Counter("prufed_uploads_total", "Upload RPCs by outcome and refusal code",
                               ["outcome", "code"], registry=self.registry)
        self.upload_bytes = Counter("prufed_upload_bytes_total", "Bytes of accepted updates", registry=self.registry)
        self.download_bytes = Counter("prufed_download_bytes_total", "Bytes of global slices served",
                                      registry=self.registry)
        self.requests = Counter("prufed_requests_total", "Aggregator RPCs received, by method (before auth)",
                                ["method"], registry=self.registry)
        self.refusals = Counter("prufed_refusals_total", "Refused calls of every RPC by method and refusal code",
                                ["method", "code"], registry=self.registry)
        self.round_seconds = Histogram("prufed_round_duration_seconds", "Round open-to-close wall time",
                                       buckets=(1, 5, 15, 60, 300, 900, 3600, float("inf")), registry=self.registry)
        self.eval_loss = Gauge("prufed_federated_eval_loss", "Federated evaluation of the last closed round's base "
                               "global: example-weighted mean client held-out loss (nats/token) per depth",
                               ["depth"], registry=self.registry)
        self.eval_examples = Gauge("prufed_federated_eval_examples", "Held-out examples behind "
                                   "prufed_federated_eval_loss, per depth", ["depth"], registry=self.registry)

    def upload_accepted(self, size: int, duplicate: bool) -> None:
        self.uploads.labels("duplicate" if duplicate else "accepted", "").inc()
        if not duplicate:
            self.upload_bytes.inc(size)

    def upload_rejected(self, code: str) -> None:
        self.uploads.labels("rejected", code).inc()

    def refused(self, method: str, code: str) -> None:
        self.refusals.labels(method, code).inc()

    def downloaded(self, size: int) -> None:
        self.download_bytes.inc(size)

    def round_closed(self, _round_id: int, metrics: dict) -> None:
        self.round_seconds.observe(float(metrics.get("duration_s", 0.0)))
        for depth, entry in metrics.get("eval", {}).items():
            self.eval_loss.labels(str(depth)).set(float(entry["loss"]))
            self.eval_examples.labels(str(depth)).set(int(entry["examples"]))


class AuthInterceptor(grpc.ServerInterceptor):
    """Register needs an enrolment token; every other Aggregator call needs a valid per-client bearer token.

    Status also accepts an enrolment token (operators). Health checks are open.
    """

    def __init__(self, federation: Federation, enroll_tokens: Sequence[str], metrics: Metrics):
        self.fed = federation
        self.enroll_tokens = tuple(enroll_tokens)
        self.metrics = metrics

    def _is_enroll(self, token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.enroll_tokens)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(handler_call_details)
        name = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(name).inc()
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            problem = "missing 'authorization: Bearer <token>' metadata"
        elif name == "Register":
            problem = None if self._is_enroll(token) else "enrolment token is not valid"
        elif name == "Status" and self._is_enroll(token):
            problem = None
        else:
            problem = None if self.fed.clients.authenticate(token) else "bearer token is not valid for any client"
        handler = continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        return _refusing_handler(handler, self.metrics, name, Refused(RefusalCode.UNAUTHENTICATED, f"{name}: {problem}"))


def _refusing_handler(handler: grpc.RpcMethodHandler, metrics: Metrics, method: str,
                      error: Refused) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that refuses the call through the servicer's one error path."""

    def unary(request, context):
        refuse(context, metrics, method, error)

    def streaming(request, context):
        refuse(context, metrics, method, error)
        yield  # pragma: no cover - makes this a generator, as the stream-response shapes require

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise ConfigError("--listen", f"{address!r} is not HOST:PORT (port 0 picks a free port)")
    return host, int(port)


class AggregatorServer:
    """A started gRPC server plus its round ticker; `stop()` ends both."""

    def __init__(self, grpc_server: grpc.Server, federation: Federation, metrics: Metrics):
        self.grpc = grpc_server
        self.federation = federation
        self.metrics = metrics
        self.dashboard: Dashboard | None = None
        self._next_sweep = 0.0
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="round-ticker", daemon=True)

    def start(self) -> None:
        self.grpc.start()
        self._ticker.start()

    def wake(self) -> None:
        self._wake.set()

    def _tick_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.federation.tick()
                if time.monotonic() >= self._next_sweep:
                    self._next_sweep = time.monotonic() + self.federation.config.blob_sweep_interval_s
                    self.federation.sweep_blobs()
            except Exception:  # a DB hiccup must not kill the ticker; the next tick retries
                log.exception("round tick failed")
            self._wake.wait(TICK_INTERVAL_S)
            self._wake.clear()

    def stop(self, grace: float | None = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        self.grpc.stop(grace).wait()
        if self.dashboard is not None:
            self.dashboard.stop()
        self._ticker.join(timeout=30)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc.wait_for_termination(timeout)


def server_options(config: AggregatorConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments: message caps, keepalive and connection age (docs/deployment.md explains each)."""
    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [("grpc.max_receive_message_length", MESSAGE_CAP_BYTES),
            ("grpc.max_send_message_length", MESSAGE_CAP_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", ms(config.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s, not faster
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(config.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(config.upload_deadline_s))]


def create_server(address: str, store: Store, config: AggregatorConfig, tls: TLSConfig | None = None, *,
                  enroll_tokens: Sequence[str] = (), insecure: bool = False, model_dir: Path | None = None,
                  metrics_port: int | None = None,
                  dashboard: DashboardConfig | None = None) -> tuple[AggregatorServer, int]:
    """Build, bind and start the server; returns it and the bound port (useful with port 0).

    Without TLS only loopback addresses are allowed unless `insecure`. With `model_dir`, the federation is
    initialised (global version 0 written) first.
    """
    host, _port = split_address(address)
    if tls is None and not insecure and not is_loopback_host(host):
        raise ConfigError("--listen", f"refusing to serve {host} without TLS; give --tls-cert/--tls-key or --insecure")
    if not enroll_tokens:
        raise ConfigError("--enroll-token", "Register must be gated: give --enroll-token or --tokens-file")
    federation = Federation(store, config)
    if model_dir is not None:
        federation.initialize(model_dir)
    metrics = Metrics()
    federation.rounds.on_round_closed = metrics.round_closed
    from concurrent.futures import ThreadPoolExecutor

    # uploads hold a pool thread each and are capped at max_concurrent_uploads, so control_workers threads stay
    # free for PullTask / Health / Register / DownloadGlobal however many uploads are open
    workers = config.max_concurrent_uploads + config.control_workers
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                              interceptors=[AuthInterceptor(federation, enroll_tokens, metrics)],
                              options=server_options(config))
    server = AggregatorServer(grpc_server, federation, metrics)
    mtls = tls is not None and tls.client_ca_file is not None
    servicer = AggregatorServicer(federation, config, metrics, server.wake, mtls=mtls)
    pb_grpc.add_AggregatorServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_secure_port(address, tls.credentials()) if tls else grpc_server.add_insecure_port(address)
    if port == 0:
        raise ConfigError("--listen", f"could not bind {address}")
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    server.start()
    if dashboard is not None:
        server.dashboard = Dashboard(dashboard, lambda: build_snapshot(federation.status(), metrics.registry)).start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port
