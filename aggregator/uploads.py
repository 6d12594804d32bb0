"""Upload acceptance: cheap checks on the header, streaming to a spool file, validation, exactly-once recording.

An upload is stored once per (round, client): the same bytes again return the original receipt, different bytes
for the same round are refused. Streams spool to a temp file beside the blobs (never whole into memory) and are
renamed into the content-addressed blob store only once complete, checksummed and validated.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aggregator.clients import Clients
from aggregator.config import AggregatorConfig
from aggregator.faults import fault_point
from aggregator.globals import Globals
from aggregator.rounds import open_round_for
from aggregator.state import Store
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import SafetensorsHeaderError, safetensors_index

log = logging.getLogger("prufed.aggregator")


@dataclass(frozen=True)
class UploadHeaderInfo:
    """What an uploader declares before sending bytes (decoded from the wire header)."""

    round: int
    total_bytes: int
    num_examples: int
    kept_layers: tuple[int, ...]
    tensors: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (name, shape, safetensors dtype tag)
    eval: tuple[float, int] | None = None  # federated evaluation of the round's global: (loss, examples scored)


@dataclass(frozen=True)
class Trailer:
    sha256: str


UploadPart = UploadHeaderInfo | bytes | Trailer | None
"""One decoded stream message: the header, a data chunk, the trailer, or None for an empty message."""


@dataclass(frozen=True)
class UploadReceipt:
    upload_id: str
    sha256: str
    round: int
    duplicate: bool = False
    accepted: bool = True
    size: int = 0


class Uploads:
    """Receive, check and record client updates."""

    def __init__(self, store: Store, config: AggregatorConfig, globals_: Globals, clock: Callable[[], float]):
        self.store = store
        self.config = config
        self.globals = globals_
        self.clock = clock

    def receive(self, client_id: str, parts: Iterator[UploadPart]) -> UploadReceipt:
        """Consume one UploadUpdate stream (header, data..., trailer) and record the update it carries."""
        header = next(parts, None)
        if not isinstance(header, UploadHeaderInfo):
            raise Refused(RefusalCode.BAD_REQUEST, "the first UploadChunk must carry the UploadHeader")
        if header.total_bytes > self.config.max_upload_bytes:
            raise Refused(RefusalCode.TOO_LARGE, f"declared total_bytes {header.total_bytes} exceeds the limit of "
                                                 f"{self.config.max_upload_bytes} bytes (--max-upload-mib)")
        if header.total_bytes == 0 or not header.tensors:
            raise Refused(RefusalCode.BAD_REQUEST, "UploadHeader must declare total_bytes > 0 and a tensor index")
        self.check(client_id, header)
        spool = self.store.blobs.spool()
        started = time.perf_counter()
        try:
            trailer = None
            for part in parts:
                if isinstance(part, bytes) and trailer is None:
                    if spool.size + len(part) > header.total_bytes:
                        raise Refused(RefusalCode.OVERFLOW, f"stream exceeds the declared total_bytes "
                                                            f"{header.total_bytes}")
                    spool.write(part)
                    fault_point("mid_upload")
                elif isinstance(part, Trailer) and trailer is None:
                    trailer = part.sha256
                else:
                    kind = {bytes: "data", Trailer: "trailer", UploadHeaderInfo: "header"}.get(type(part))
                    raise Refused(RefusalCode.BAD_REQUEST, f"unexpected {kind} message in the upload stream")
            received, digest = spool.size, spool.finish()
            log.info("upload received", extra={"client": client_id, "bytes": received,
                                               "receive_s": round(time.perf_counter() - started, 4)})
            if trailer is None or received != header.total_bytes:
                raise Refused(RefusalCode.TRUNCATED, f"truncated stream: received {received} of "
                                                     f"{header.total_bytes} declared bytes"
                                                     + ("" if trailer is not None else " and no trailer"))
            if trailer.lower() != digest:
                raise Refused(RefusalCode.CHECKSUM, f"sha256 mismatch: trailer says {trailer[:16]}…, received "
                                                    f"bytes hash to {digest[:16]}…")
            receipt = self.accept(client_id, header, spool.path, digest)
        finally:
            spool.discard()  # a no-op for the file once accept() renamed it into the blob store
        fault_point("after_accept")
        return receipt

    def check(self, client_id: str, header: UploadHeaderInfo) -> None:
        """Cheap checks before any byte is received: the round is open and the client was sampled for it."""
        with self.store.read() as tx:
            registered = Clients.layers(tx, client_id)
            open_round_for(tx, client_id, header.round)
        if tuple(header.kept_layers) != registered:
            raise Refused(RefusalCode.BAD_KEPT_LAYERS, f"kept_layers {list(header.kept_layers)} differ from the "
                                                       f"registered {list(registered)}")
        if header.num_examples < 1:
            raise Refused(RefusalCode.BAD_NUM_EXAMPLES, f"num_examples must be >= 1, got {header.num_examples}")
        if header.eval is not None:
            loss, examples = header.eval
            if not (math.isfinite(loss) and loss >= 0):
                raise Refused(RefusalCode.BAD_REQUEST, f"eval.loss must be a finite number >= 0, got {loss}")
            if examples < 1:
                raise Refused(RefusalCode.BAD_REQUEST, f"eval.examples must be >= 1, got {examples}")

    def accept(self, client_id: str, header: UploadHeaderInfo, part_path: Path, sha256: str) -> UploadReceipt:
        """Validate a fully received update file and record it (exactly once per client and round)."""
        upload_id = hashlib.sha256(f"{header.round}:{client_id}:{sha256}".encode()).hexdigest()[:32]
        with self.store.read() as tx:
            existing = tx.upload_of(header.round, client_id)
        started = time.perf_counter()
        if existing is None:
            self._validate_file(header, part_path)
            # rename + directory fsync outside the write lock; if the insert below loses a race the blob is an
            # unreferenced, content-addressed file (harmless)
            blob = self.store.blobs.adopt(part_path, sha256)
        validated = time.perf_counter()
        with self.store.write() as tx:
            existing = tx.upload_of(header.round, client_id)
            if existing is not None:
                if existing.sha256 == sha256:
                    return UploadReceipt(existing.id, sha256, header.round, duplicate=True, size=header.total_bytes)
                raise Refused(RefusalCode.UPLOAD_CONFLICT, f"client {client_id} already uploaded different bytes "
                                                           f"for round {header.round} (sha256 {existing.sha256[:12]}…)")
            open_round_for(tx, client_id, header.round)
            tx.insert_upload(upload_id, header.round, client_id, sha256, header.total_bytes, header.num_examples, blob,
                             self.clock())
            if header.eval is not None:
                tx.insert_upload_eval(header.round, client_id, *header.eval)
        log.info("accepted update", extra={"client": client_id, "round": header.round, "sha256": sha256,
                                           "bytes": header.total_bytes, "num_examples": header.num_examples,
                                           "validate_s": round(validated - started, 4),
                                           "commit_s": round(time.perf_counter() - validated, 4)})
        return UploadReceipt(upload_id, sha256, header.round, size=header.total_bytes)

    def _validate_file(self, header: UploadHeaderInfo, path: Path) -> None:
        from aggregator.core.validate import validate_update
        from prufed.common.adapter_format import DELTA_FORMAT, AdapterFormatError, load_adapter

        try:
            actual = safetensors_index(path)
            tensors, meta = load_adapter(path)
        except (AdapterFormatError, SafetensorsHeaderError) as exc:
            raise Refused(RefusalCode.BAD_FILE, f"update is not a readable adapter file: {exc}") from exc
        declared = tuple(sorted(header.tensors))
        if declared != actual:
            diff = sorted(set(declared) ^ set(actual))[:3]
            raise Refused(RefusalCode.INDEX_MISMATCH, f"declared tensor index does not match the file, e.g. {diff}")
        if meta.format != DELTA_FORMAT:
            raise Refused(RefusalCode.BAD_FORMAT, f"update format is {meta.format!r}, expected {DELTA_FORMAT!r}")
        if meta.round != header.round or meta.num_examples != header.num_examples \
                or tuple(meta.kept_layers) != tuple(header.kept_layers):
            raise Refused(RefusalCode.META_MISMATCH, "file metadata (round, num_examples, kept_layers) "
                                                     f"{(meta.round, meta.num_examples, list(meta.kept_layers))} "
                                                     f"differs from the upload header")
        with self.store.read() as tx:
            base = tx.round(header.round).base_version
        validate_update(tensors, kept_layers=header.kept_layers, global_state=self.globals.state(base),
                        num_examples=header.num_examples)
