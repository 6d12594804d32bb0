"""Client library for the aggregator's gRPC API (used by the edge agent, `prufed simulate` and the tests).

`address` may list replicas, `HOST:PORT[,HOST:PORT...]`: the channel then balances over all of them with gRPC's own
policy (round_robin by default: a dead replica's subchannel drops out of the rotation, calls go to the live ones),
and gRPC's retry policy re-sends a call that failed UNAVAILABLE, on another replica, as long as its messages still
fit the retry buffer (`RETRY_BUFFER_BYTES`). Beyond that, calls do not retry: `TransientError` (UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED from the transport) means "back off and try again" (the agent does, and the
channel then picks a live replica), `FatalError` means the server refused the request; both carry the gRPC code
and details.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from prufed.common.errors import ConfigError, PrufedError
from prufed.common.wire import (
    CHUNK_CAP_BYTES,
    DEFAULT_CHUNK_BYTES,
    MESSAGE_CAP_BYTES,
    canonical_safetensors,
    iter_chunks,
    safetensors_index,
)
from prufed.v1 import aggregator_pb2 as pb
from prufed.v1 import aggregator_pb2_grpc as pb_grpc

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
LB_POLICIES = ("round_robin", "pick_first")
RETRY_BUFFER_BYTES = 8 * 1024 * 1024  # per call: uploads up to this size are replayed by gRPC itself on failover


def service_config(lb_policy: str = "round_robin") -> str:
    """gRPC service config: the load-balancing policy plus transparent retries of UNAVAILABLE on every method (safe:
    the aggregator's calls are idempotent; an upload is recorded once per client and round)."""
    if lb_policy not in LB_POLICIES:
        raise ConfigError("--lb-policy", f"must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    return json.dumps({
        "loadBalancingConfig": [{lb_policy: {}}],
        "methodConfig": [{"name": [{"service": "prufed.v1.Aggregator"}],
                          "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                                          "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def parse_addresses(spec: str) -> list[tuple[str, int]]:
    """`HOST:PORT[,HOST:PORT...]` -> [(host, port)]; errors name --aggregator."""
    out = []
    for item in spec.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("--aggregator", f"must be HOST:PORT[,HOST:PORT...], got {spec!r} ({item!r})")
        out.append((host, int(port)))
    return out


def channel_target(spec: str) -> tuple[str, str | None]:
    """(gRPC target, TLS name) for an address list. One address: itself, as before. Several: an `ipv4:`/`ipv6:`
    multi-address target, hostnames resolved here once; TLS then checks every replica's certificate against the
    first host's name (give replicas a certificate whose SAN covers it)."""
    addresses = parse_addresses(spec)
    if len(addresses) == 1:
        return spec.strip(), None
    resolved: list[tuple[int, str, int]] = []
    for host, port in addresses:
        try:
            literal = ipaddress.ip_address(host)
            resolved.append((literal.version, str(literal), port))
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ConfigError("--aggregator", f"cannot resolve {host!r}: {exc}") from exc
            for info in infos:
                ip = ipaddress.ip_address(info[4][0])
                resolved.append((ip.version, str(ip), port))
    versions = {v for v, _, _ in resolved}
    version = 4 if 4 in versions else 6
    parts = [(f"[{ip}]:{port}" if v == 6 else f"{ip}:{port}") for v, ip, port in dict.fromkeys(resolved) if v == version]
    first_host = addresses[0][0]
    tls_name = None if _is_ip(first_host) else first_host
    return f"ipv{version}:{','.join(parts)}", tls_name


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TransportError(PrufedError):
    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method}: {code.name}: {details}")


class TransientError(TransportError):
    """The server was unreachable or slow; retry with backoff."""


class FatalError(TransportError):
    """The server refused the call (auth, validation, stale round, ...); retrying the same request will not help."""


@dataclass(frozen=True)
class Registration:
    client_id: str
    token: str
    federation: dict


@dataclass(frozen=True)
class Task:
    kind: str  # "task" | "wait" | "done"
    round: int = 0
    global_version: int = 0
    training: dict = field(default_factory=dict)
    retry_after_s: float = 0.0
    deadline_unix: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Receipt:
    upload_id: str
    sha256: str
    accepted: bool
    duplicate: bool
    round: int


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


_KIND = {pb.Task.TASK: "task", pb.Task.WAIT: "wait", pb.Task.DONE: "done"}


def _training(msg: pb.TrainingParams) -> dict:
    return {"max_steps": msg.max_steps, "lr": msg.lr, "batch_size": msg.batch_size, "seq_len": msg.seq_len}


class AggregatorClient:
    """One channel to the aggregator (one replica or several, see the module doc). `token` is the per-client bearer
    token (set by `register`)."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | Path | None = None,
                 chunk_size: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 120.0,
                 client_cert: tuple[str | Path, str | Path] | None = None, lb_policy: str = "round_robin"):
        if not 1 <= chunk_size <= CHUNK_CAP_BYTES:
            raise ValueError(f"chunk_size must be in [1, {CHUNK_CAP_BYTES}], got {chunk_size}")
        self.address = address
        self.token = token
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        target, server_name = channel_target(address)
        options = [("grpc.max_receive_message_length", MESSAGE_CAP_BYTES),
                   ("grpc.max_send_message_length", MESSAGE_CAP_BYTES),
                   ("grpc.service_config", service_config(lb_policy)),
                   ("grpc.enable_retries", 1),
                   ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
                   # a restarted replica is found again within a second or two, not gRPC's default minutes
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        if server_name and tls_ca is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is not None:
            key = cert = None
            if client_cert is not None:
                cert, key = (Path(p).read_bytes() for p in client_cert)
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(), private_key=key, certificate_chain=cert)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.AggregatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self, token: str | None = None) -> list[tuple[str, str]]:
        token = token or self.token
        return [("authorization", f"Bearer {token}")] if token else []

    def _call(self, method: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            cls = TransientError if code in TRANSIENT_CODES else FatalError
            raise cls(method, code, details) from None

    # ---- RPCs --------------------------------------------------------------------------------------------------
    def register(self, enroll_token: str, kept_layers: Sequence[int], hardware: Mapping | None = None, *,
                 base_model: str = "", name: str = "") -> Registration:
        """Enrol with `enroll_token`; stores and returns the per-client token."""
        hw = dict(hardware or {})
        summary = pb.HardwareSummary(
            name=str(hw.get("name", "")), accelerator=str(hw.get("accelerator", "")),
            total_memory_bytes=int(hw.get("total_memory_bytes", 0)), budget_bytes=int(hw.get("budget_bytes", 0)),
            bnb_4bit=bool(hw.get("bnb_4bit", False)), profile_json=json.dumps(hw, default=str, sort_keys=True))
        request = pb.RegisterRequest(hardware=summary, kept_layers=[int(i) for i in kept_layers],
                                     base_model=base_model, name=name)
        reply = self._call("Register", self.stub.Register, request, metadata=self._metadata(enroll_token),
                           timeout=self.timeout_s)
        self.token = reply.token
        f = reply.federation
        federation = {"base_model": f.base_model, "num_layers": f.num_layers,
                      "lora": {"r": f.lora.r, "alpha": f.lora.alpha, "targets": list(f.lora.targets)},
                      "training": _training(f.training), "rounds": f.rounds, "chunk_size": f.chunk_size,
                      "max_upload_bytes": f.max_upload_bytes}
        return Registration(reply.client_id, reply.token, federation)

    def pull_task(self) -> Task:
        t = self._call("PullTask", self.stub.PullTask, pb.PullTaskRequest(), metadata=self._metadata(),
                       timeout=self.timeout_s)
        return Task(_KIND.get(t.kind, "wait"), t.round, t.global_version, _training(t.training), t.retry_after_s,
                    t.deadline_unix, t.reason)

    def download_global(self, version: int | None = None, out_path: str | Path | None = None):
        """The global adapter slice for this client's kept layers: (tensors, AdapterMeta, version).

        Bytes are checked against the header's size and sha256; with `out_path` the file is also kept there.
        """
        from prufed.common.adapter_format import load_adapter

        request = pb.DownloadRequest(version=version) if version is not None else pb.DownloadRequest()

        def fetch():
            stream = self.stub.DownloadGlobal(request, metadata=self._metadata(), timeout=self.timeout_s)
            header, digest, size = None, hashlib.sha256(), 0
            target = Path(out_path) if out_path else None
            fd, tmp = tempfile.mkstemp(prefix=".global.", dir=target.parent if target else None)
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in stream:
                        if chunk.WhichOneof("part") == "header":
                            header = chunk.header
                        else:
                            out.write(chunk.data)
                            digest.update(chunk.data)
                            size += len(chunk.data)
                if header is None or size != header.total_bytes or digest.hexdigest() != header.sha256:
                    raise TransientError("DownloadGlobal", grpc.StatusCode.DATA_LOSS,
                                         f"download incomplete or corrupt ({size} bytes)")
                tensors, meta = load_adapter(tmp)
                if target:
                    os.replace(tmp, target)
                return tensors, meta, header.version
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        return self._call("DownloadGlobal", fetch)

    def upload_update(self, update: str | Path | Mapping, round: int, num_examples: int,
                      kept_layers: Sequence[int], *, base_model: str = "",
                      eval: tuple[float, int] | None = None) -> Receipt:
        """Stream an update (a delta file, or tensors that are first written as one) and return the receipt.

        `eval`: (loss, examples) of this client's federated evaluation of the round's global, sent in the header."""
        if isinstance(update, Mapping):
            from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta

            # canonical bytes: the same tensors always give the same sha256, so a retried upload is a duplicate
            meta = AdapterMeta(DELTA_FORMAT, tuple(kept_layers), base_model, round, num_examples)
            with tempfile.TemporaryDirectory(prefix="prufed-upload-") as tmp:
                path = Path(tmp) / "update.safetensors"
                path.write_bytes(canonical_safetensors(update, meta.to_strings()))
                return self.upload_update(path, round, num_examples, kept_layers, eval=eval)
        path = Path(update)
        index = safetensors_index(path)
        header = pb.UploadHeader(
            round=round, total_bytes=path.stat().st_size, num_examples=num_examples,
            kept_layers=[int(i) for i in kept_layers],
            tensors=[pb.TensorInfo(name=n, shape=list(s), dtype=d) for n, s, d in index],
            eval=pb.FederatedEval(loss=float(eval[0]), examples=int(eval[1])) if eval is not None else None)
        reply = self._call("UploadUpdate", self.stub.UploadUpdate, self._upload_stream(header, path),
                           metadata=self._metadata(), timeout=self.timeout_s)
        return Receipt(reply.upload_id, reply.sha256, reply.accepted, reply.duplicate, reply.round)

    def _upload_stream(self, header: pb.UploadHeader, path: Path) -> Iterator[pb.UploadChunk]:
        # hash on a helper thread (hashlib releases the GIL) so the trailer costs no time after the last chunk
        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(_file_sha256, path)
            yield pb.UploadChunk(header=header)
            for block in iter_chunks(path, self.chunk_size):
                yield pb.UploadChunk(data=block)
            yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=digest.result()))

    def status(self) -> dict:
        s = self._call("Status", self.stub.Status, pb.StatusRequest(), metadata=self._metadata(),
                       timeout=self.timeout_s)
        return {"global_version": s.global_version, "rounds_total": s.rounds_total, "rounds_closed": s.rounds_closed,
                "done": s.done, "clients_per_depth": {d.depth: d.clients for d in s.clients_per_depth},
                "rounds": [{"round": r.round, "state": r.state, "sampled": r.sampled, "uploads": r.uploads,
                            "deadline": r.deadline_unix, "metrics": json.loads(r.metrics_json or "{}"),
                            "eval": json.loads(r.eval_json or "{}")}
                           for r in s.rounds],
                "last_metrics": json.loads(s.last_metrics_json or "{}"), "mode": s.mode or "heteagg",
                "groups": json.loads(s.groups_json or "[]")}

    def health(self) -> str:
        """The standard gRPC health status of the aggregator service (e.g. "SERVING")."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call("Health", stub.Check, health_pb2.HealthCheckRequest(service="prufed.v1.Aggregator"),
                           timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
