"""gRPC servicer: decode a request, make one federation call, encode the answer.

Every RPC goes through `rpc()`, the one error path: a `Refused` becomes the status its `RefusalCode` maps to
(`prufed.common.refusals.STATUS_NAME`), with the message (which names the field) as details and the code in the
`prufed-refusal` trailing metadata; any other exception is logged with its traceback and answered INTERNAL with no
server detail. Both are logged and counted in `prufed_refusals_total{method, code}`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc

from aggregator.clients import Enrolment
from aggregator.config import AggregatorConfig
from aggregator.federation import Federation
from aggregator.rounds import DONE, TASK
from aggregator.uploads import Trailer, UploadHeaderInfo, UploadPart
from prufed.common.refusals import REFUSAL_METADATA_KEY, STATUS_NAME, RefusalCode, Refused
from prufed.v1 import aggregator_pb2 as pb
from prufed.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger("prufed.aggregator")

TASK_KIND = {TASK: pb.Task.TASK, DONE: pb.Task.DONE}
CLIENT_CALLS = frozenset({"PullTask", "DownloadGlobal", "UploadUpdate"})
"""Calls made with a per-client token: under mTLS each must present the certificate bound at registration."""
INT32_MAX = 2**31 - 1


def status_of(code: RefusalCode) -> grpc.StatusCode:
    return grpc.StatusCode[STATUS_NAME[code]]


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip() or None
    return None


def caller_id(context: grpc.ServicerContext) -> str:
    """The client id; the auth interceptor has already verified the token it comes from."""
    token = bearer_token(context.invocation_metadata()) or ""
    return token.partition(".")[0]


def cert_fingerprint(context: grpc.ServicerContext) -> str | None:
    """sha256 (hex, of the DER bytes) of the peer's TLS client certificate, if it presented one."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pems[0].decode())).hexdigest()


def refuse(context: grpc.ServicerContext, metrics, method: str, error: Refused) -> NoReturn:
    """Log, count and send one refusal (the only place a call is aborted)."""
    metrics.refused(method, error.code)
    log.info("refused call", extra={"method": method, "code": error.code.value, "reason": str(error)})
    # a refusal is an answer, not a lost connection: "-1" tells the client channel's retry policy (which replays
    # calls cut off by a dying replica) not to re-send this one
    context.set_trailing_metadata(((REFUSAL_METADATA_KEY, error.code.value), ("grpc-retry-pushback-ms", "-1")))
    context.abort(status_of(error.code), str(error))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def rpc(method: Callable) -> Callable:
    """Wrap a servicer method in the one error path (see the module docstring)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: AggregatorServicer, request, context: grpc.ServicerContext):
        try:
            if self.mtls and name in CLIENT_CALLS:
                self.fed.clients.check_cert(caller_id(context), cert_fingerprint(context))
            return method(self, request, context)
        except Refused as exc:
            error = exc
        except Exception:
            if not context.is_active():  # the client cancelled or its deadline passed: nobody to answer
                log.info("call ended by the client", extra={"method": name})
                raise
            log.exception("internal error", extra={"method": name})
            error = Refused(RefusalCode.INTERNAL, f"{name}: internal server error (logged on the server)")
        if name == "UploadUpdate":
            self.metrics.upload_rejected(error.code)
        refuse(context, self.metrics, name, error)

    return wrapper


def decode_upload(messages: Iterator[pb.UploadChunk]) -> Iterator[UploadPart]:
    """UploadChunk messages as upload parts (header info, data bytes, trailer, or None for an empty message)."""
    for message in messages:
        kind = message.WhichOneof("part")
        if kind == "header":
            h = message.header
            yield UploadHeaderInfo(round=h.round, total_bytes=h.total_bytes, num_examples=h.num_examples,
                                   kept_layers=tuple(h.kept_layers),
                                   tensors=tuple((t.name, tuple(t.shape), t.dtype) for t in h.tensors),
                                   eval=(h.eval.loss, h.eval.examples) if h.HasField("eval") else None)
        elif kind == "data":
            yield message.data
        elif kind == "trailer":
            yield Trailer(message.trailer.sha256)
        else:
            yield None


class AggregatorServicer(pb_grpc.AggregatorServicer):
    def __init__(self, federation: Federation, config: AggregatorConfig, metrics, on_upload: Callable[[], None],
                 *, mtls: bool = False):
        self.fed = federation
        self.config = config
        self.metrics = metrics
        self.on_upload = on_upload
        self.mtls = mtls

    def _training(self) -> pb.TrainingParams:
        c = self.config
        return pb.TrainingParams(max_steps=c.max_steps, lr=c.lr, batch_size=c.batch_size, seq_len=c.seq_len)

    @rpc
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        hw = request.hardware
        summary = {"name": hw.name[:200], "accelerator": hw.accelerator[:64], "total_memory_bytes": hw.total_memory_bytes,
                   "budget_bytes": hw.budget_bytes, "bnb_4bit": hw.bnb_4bit}
        client_id, token = self.fed.clients.enrol(Enrolment(
            tuple(request.kept_layers), hw.profile_json, summary, name=request.name, base_model=request.base_model,
            enroll_token=bearer_token(context.invocation_metadata()) or "", peer=context.peer(),
            cert_sha256=cert_fingerprint(context) if self.mtls else None))
        params = self.fed.globals.params()
        c = self.config
        federation = pb.FederationParams(
            base_model=params["base_model"], num_layers=params["num_layers"],
            lora=pb.LoraSpec(r=c.lora_r, alpha=c.lora_alpha, targets=list(c.lora_targets)),
            training=self._training(), rounds=c.rounds, chunk_size=c.chunk_size, max_upload_bytes=c.max_upload_bytes)
        return pb.RegisterReply(client_id=client_id, token=token, federation=federation)

    @rpc
    def PullTask(self, request: pb.PullTaskRequest, context) -> pb.Task:
        task = self.fed.rounds.pull_task(caller_id(context))
        return pb.Task(kind=TASK_KIND.get(task.kind, pb.Task.WAIT), round=task.round,
                       global_version=task.global_version, training=self._training(),
                       retry_after_s=task.retry_after_s, deadline_unix=task.deadline, reason=task.reason)

    @rpc
    def DownloadGlobal(self, request: pb.DownloadRequest, context) -> Iterator[pb.DownloadChunk]:
        with self.fed.store.read() as tx:
            kept = self.fed.clients.layers(tx, caller_id(context))
        version = request.version if request.HasField("version") else None
        if version is not None and version > INT32_MAX:
            raise Refused(RefusalCode.BAD_REQUEST, f"version must be <= {INT32_MAX}, got {version}")
        version, round_id, payload = self.fed.globals.slice(kept, version)
        return self._chunks(pb.DownloadHeader(version=version, round=round_id, total_bytes=len(payload),
                                              sha256=hashlib.sha256(payload).hexdigest(), kept_layers=list(kept),
                                              per_group=self.config.per_group),
                            payload)

    def _chunks(self, header: pb.DownloadHeader, payload: bytes) -> Iterator[pb.DownloadChunk]:
        yield pb.DownloadChunk(header=header)
        view = memoryview(payload)
        for start in range(0, len(payload), self.config.chunk_size):
            yield pb.DownloadChunk(data=bytes(view[start:start + self.config.chunk_size]))
        self.metrics.downloaded(len(payload))

    @rpc
    def UploadUpdate(self, request_iterator: Iterator[pb.UploadChunk], context) -> pb.Receipt:
        receipt = self.fed.uploads.receive(caller_id(context), decode_upload(request_iterator))
        self.metrics.upload_accepted(receipt.size, receipt.duplicate)
        if not receipt.duplicate:
            self.on_upload()
        return pb.Receipt(upload_id=receipt.upload_id, sha256=receipt.sha256, accepted=True,
                          duplicate=receipt.duplicate, round=receipt.round)

    @rpc
    def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_to_proto(self.fed.status())


SERVER_ONLY_METRICS = frozenset({"closed_by"})
"""Round metrics kept out of Status replies: `closed_by` is the replica's host name and PID."""


def _public(metrics: dict) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k not in SERVER_ONLY_METRICS}, sort_keys=True)


def status_to_proto(status: dict) -> pb.StatusReply:
    return pb.StatusReply(
        global_version=status["global_version"], rounds_total=status["rounds_total"],
        rounds_closed=status["rounds_closed"], done=status["done"],
        rounds=[pb.RoundStatus(round=r["round"], state=r["state"], sampled=r["sampled"], uploads=r["uploads"],
                               deadline_unix=r["deadline"], metrics_json=_public(r["metrics"]),
                               eval_json=json.dumps(r["eval"], sort_keys=True))
                for r in status["rounds"]],
        clients_per_depth=[pb.DepthCount(depth=d, clients=n) for d, n in status["clients_per_depth"].items()],
        last_metrics_json=_public(status["last_metrics"]), mode=status["mode"],
        groups_json=json.dumps(status["groups"], sort_keys=True))
