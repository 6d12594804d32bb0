"""gRPC servicer: decode a request, make one `Federation` call, encode the answer.

Each `FederationError.code` maps to exactly one gRPC status; the message (which names the fault) goes to the client
as the status details. Uploads stream to a temp file beside the blobs, never whole into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator

import grpc

from aggregator.config import AggregatorConfig
from aggregator.rounds import DONE, TASK, Federation, FederationError, UploadHeaderInfo, fault_point
from prufed.v1 import aggregator_pb2 as pb
from prufed.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger("prufed.aggregator")

STATUS_OF_CODE: dict[str, grpc.StatusCode] = {
    "unknown_client": grpc.StatusCode.UNAUTHENTICATED,
    "stale_round": grpc.StatusCode.FAILED_PRECONDITION,
    "not_sampled": grpc.StatusCode.PERMISSION_DENIED,
    "upload_conflict": grpc.StatusCode.ALREADY_EXISTS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "checksum": grpc.StatusCode.DATA_LOSS,
    "no_version": grpc.StatusCode.NOT_FOUND,
}
"""Codes not listed (bad_request, truncated, bad_layers, bad_format, index_mismatch, meta_mismatch, wrong_layers,
and validate's wrong_keys, bad_shape, bad_dtype, non_finite, bad_num_examples) are INVALID_ARGUMENT."""

TASK_KIND = {TASK: pb.Task.TASK, DONE: pb.Task.DONE}


def status_of(code: str) -> grpc.StatusCode:
    return STATUS_OF_CODE.get(code, grpc.StatusCode.INVALID_ARGUMENT)


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


def _domain_errors(method: Callable) -> Callable:
    """Turn a FederationError into its gRPC status, counting rejected uploads on the way."""

    def wrapper(self: AggregatorServicer, request, context):
        try:
            return method(self, request, context)
        except FederationError as exc:
            if method.__name__ == "UploadUpdate":
                self.metrics.upload_rejected(exc.code)
            log.info("refused call", extra={"method": method.__name__, "code": exc.code, "reason": str(exc)})
            context.abort(status_of(exc.code), str(exc))

    wrapper.__name__ = method.__name__
    return wrapper


class AggregatorServicer(pb_grpc.AggregatorServicer):
    def __init__(self, federation: Federation, config: AggregatorConfig, metrics, on_upload: Callable[[], None]):
        self.fed = federation
        self.config = config
        self.metrics = metrics
        self.on_upload = on_upload

    def _training(self) -> pb.TrainingParams:
        c = self.config
        return pb.TrainingParams(max_steps=c.max_steps, lr=c.lr, batch_size=c.batch_size, seq_len=c.seq_len)

    @_domain_errors
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        hw = request.hardware
        profile = json.loads(hw.profile_json) if hw.profile_json else {}
        profile.setdefault("summary", {"name": hw.name, "accelerator": hw.accelerator,
                                       "total_memory_bytes": hw.total_memory_bytes,
                                       "budget_bytes": hw.budget_bytes, "bnb_4bit": hw.bnb_4bit})
        client_id, token = self.fed.register(list(request.kept_layers), profile, name=request.name,
                                             base_model=request.base_model)
        params = self.fed.federation_params()
        c = self.config
        federation = pb.FederationParams(
            base_model=params["base_model"], num_layers=params["num_layers"],
            lora=pb.LoraSpec(r=c.lora_r, alpha=c.lora_alpha, targets=list(c.lora_targets)),
            training=self._training(), rounds=c.rounds, chunk_size=c.chunk_size, max_upload_bytes=c.max_upload_bytes)
        return pb.RegisterReply(client_id=client_id, token=token, federation=federation)

    @_domain_errors
    def PullTask(self, request: pb.PullTaskRequest, context) -> pb.Task:
        task = self.fed.pull_task(caller_id(context))
        return pb.Task(kind=TASK_KIND.get(task.kind, pb.Task.WAIT), round=task.round,
                       global_version=task.global_version, training=self._training(),
                       retry_after_s=task.retry_after_s, deadline_unix=task.deadline, reason=task.reason)

    def DownloadGlobal(self, request: pb.DownloadRequest, context) -> Iterator[pb.DownloadChunk]:
        try:
            with self.fed.store.read() as conn:
                kept = self.fed.client_layers(conn, caller_id(context))
            version = request.version if request.HasField("version") else None
            version, round_id, payload = self.fed.global_slice(kept, version)
        except FederationError as exc:
            context.abort(status_of(exc.code), str(exc))
        yield pb.DownloadChunk(header=pb.DownloadHeader(
            version=version, round=round_id, total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
            kept_layers=list(kept)))
        view = memoryview(payload)
        for start in range(0, len(payload), self.config.chunk_size):
            yield pb.DownloadChunk(data=bytes(view[start:start + self.config.chunk_size]))
        self.metrics.downloaded(len(payload))

    @_domain_errors
    def UploadUpdate(self, request_iterator: Iterator[pb.UploadChunk], context) -> pb.Receipt:
        client_id = caller_id(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise FederationError("bad_request", "the first UploadChunk must carry the UploadHeader")
        h = first.header
        header = UploadHeaderInfo(
            round=h.round, total_bytes=h.total_bytes, num_examples=h.num_examples, kept_layers=tuple(h.kept_layers),
            tensors=tuple((t.name, tuple(t.shape), t.dtype) for t in h.tensors))
        if header.total_bytes > self.config.max_upload_bytes:
            raise FederationError("too_large", f"declared total_bytes {header.total_bytes} exceeds the limit of "
                                               f"{self.config.max_upload_bytes} bytes (--max-upload-mib)")
        if header.total_bytes == 0 or not header.tensors:
            raise FederationError("bad_request", "UploadHeader must declare total_bytes > 0 and a tensor index")
        self.fed.check_upload(client_id, header)
        spool = self.fed.store.blobs.spool()
        started = time.perf_counter()
        try:
            trailer = None
            for message in request_iterator:
                kind = message.WhichOneof("part")
                if kind == "data" and trailer is None:
                    if spool.size + len(message.data) > header.total_bytes:
                        raise FederationError("overflow", f"stream exceeds the declared total_bytes "
                                                          f"{header.total_bytes}")
                    spool.write(message.data)
                    fault_point("mid_upload")
                elif kind == "trailer" and trailer is None:
                    trailer = message.trailer.sha256
                else:
                    raise FederationError("bad_request", f"unexpected {kind} message in the upload stream")
            received, digest = spool.size, spool.finish()
            log.info("upload received", extra={"client": client_id, "bytes": received,
                                               "receive_s": round(time.perf_counter() - started, 4)})
            if trailer is None or received != header.total_bytes:
                raise FederationError("truncated", f"truncated stream: received {received} of "
                                                   f"{header.total_bytes} declared bytes"
                                                   + ("" if trailer is not None else " and no trailer"))
            if trailer.lower() != digest:
                raise FederationError("checksum", f"sha256 mismatch: trailer says {trailer[:16]}…, received bytes "
                                                  f"hash to {digest[:16]}…")
            receipt = self.fed.accept_upload(client_id, header, spool.path, digest)
        finally:
            spool.discard()  # a no-op for the file once accept_upload renamed it into the blob store
        fault_point("after_accept")
        self.metrics.upload_accepted(received, receipt.duplicate)
        if not receipt.duplicate:
            self.on_upload()
        return pb.Receipt(upload_id=receipt.upload_id, sha256=receipt.sha256, accepted=True,
                          duplicate=receipt.duplicate, round=receipt.round)

    @_domain_errors
    def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_to_proto(self.fed.status())


def status_to_proto(status: dict) -> pb.StatusReply:
    return pb.StatusReply(
        global_version=status["global_version"], rounds_total=status["rounds_total"],
        rounds_closed=status["rounds_closed"], done=status["done"],
        rounds=[pb.RoundStatus(round=r["round"], state=r["state"], sampled=r["sampled"], uploads=r["uploads"],
                               deadline_unix=r["deadline"], metrics_json=json.dumps(r["metrics"], sort_keys=True))
                for r in status["rounds"]],
        clients_per_depth=[pb.DepthCount(depth=d, clients=n) for d, n in status["clients_per_depth"].items()],
        last_metrics_json=json.dumps(status["last_metrics"], sort_keys=True))
