"""Upload acceptance: cheap checks on the header, streaming to a spool file, validation, exactly-once recording.

An upload is stored once per (round, client): the same bytes again return the original receipt, different bytes
for the same round are refused. Streams spool to a temp file beside the blobs (never whole into memory) and are
renamed into the content-addressed blob store only once complete, checksummed and validated.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
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
from aggregator.streams import StreamSlots, timed
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import SafetensorsHeaderError, header_cap, safetensors_index

INT32_MAX = 2**31 - 1  # the portable SQL INTEGER range (PostgreSQL's integer)
MAX_NAME_BYTES = 1024
MAX_DIMS = 8
DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"})

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
        self.slots = StreamSlots(config.max_uploads_per_client, config.max_concurrent_uploads)

    def receive(self, client_id: str, parts: Iterator[UploadPart]) -> UploadReceipt:
        """Consume one UploadUpdate stream (header, data..., trailer) and record the update it carries.

        The stream holds one of the client's and one of the server's upload slots, and is cut off after
        `stream_idle_s` without a message or `upload_deadline_s` in all.
        """
        cfg = self.config
        with self.slots.hold(client_id), \
                contextlib.closing(timed(parts, cfg.stream_idle_s, cfg.upload_deadline_s)) as stream:
            return self._receive(client_id, stream)

    def _receive(self, client_id: str, parts: Iterator[UploadPart]) -> UploadReceipt:
        header = next(parts, None)
        if not isinstance(header, UploadHeaderInfo):
            raise Refused(RefusalCode.BAD_REQUEST, "the first UploadChunk must carry the UploadHeader")
        self.check_fields(header)
        self.check(client_id, header)
        cap = header_cap(header.tensors)
        spool = self.store.blobs.spool()
        started = time.perf_counter()
        try:
            trailer = None
            prefix = b""
            for part in parts:
                if isinstance(part, bytes) and trailer is None:
                    if spool.size + len(part) > header.total_bytes:
                        raise Refused(RefusalCode.OVERFLOW, f"stream exceeds the declared total_bytes "
                                                            f"{header.total_bytes}")
                    if len(prefix) < 8:  # the safetensors header length: refuse a huge header before storing it
                        prefix += part[:8 - len(prefix)]
                        if len(prefix) == 8:
                            self._check_header_length(struct.unpack("<Q", prefix)[0], cap, header.total_bytes)
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

    def check_fields(self, header: UploadHeaderInfo) -> None:
        """Range-check every header field before any database or blob work (so nothing fails deeper down)."""
        limit = self.config.max_upload_bytes
        if header.total_bytes > limit:
            raise Refused(RefusalCode.TOO_LARGE, f"declared total_bytes {header.total_bytes} exceeds the limit of "
                                                 f"{limit} bytes (--max-upload-mib)")
        if header.total_bytes == 0 or not header.tensors:
            raise Refused(RefusalCode.BAD_REQUEST, "UploadHeader must declare total_bytes > 0 and a tensor index")
        if header.round > INT32_MAX:
            raise Refused(RefusalCode.BAD_REQUEST, f"round must be <= {INT32_MAX}, got {header.round}")
        if not 1 <= header.num_examples <= self.config.max_num_examples:
            raise Refused(RefusalCode.BAD_NUM_EXAMPLES, f"num_examples must be in [1, {self.config.max_num_examples}] "
                                                        f"(max_num_examples), got {header.num_examples}")
        for name, shape, dtype in header.tensors:
            if not name or len(name.encode()) > MAX_NAME_BYTES:
                raise Refused(RefusalCode.BAD_REQUEST, f"tensors: a name must have 1..{MAX_NAME_BYTES} bytes, got "
                                                       f"{len(name.encode())}")
            if len(shape) > MAX_DIMS or dtype not in DTYPES:
                raise Refused(RefusalCode.BAD_REQUEST, f"tensors: {name[:80]} has {len(shape)} dims (max {MAX_DIMS}) "
                                                       f"and dtype {dtype[:16]!r} (one of {sorted(DTYPES)})")

    def check(self, client_id: str, header: UploadHeaderInfo) -> None:
        """Cheap checks before any byte is received: the round is open and the client was sampled for it."""
        with self.store.read() as tx:
            registered = Clients.layers(tx, client_id)
            open_round_for(tx, client_id, header.round)
        if tuple(header.kept_layers) != registered:
            raise Refused(RefusalCode.BAD_KEPT_LAYERS, f"kept_layers {list(header.kept_layers)} differ from the "
                                                       f"registered {list(registered)}")
        if header.eval is not None:
            loss, examples = header.eval
            if not (math.isfinite(loss) and loss >= 0):
                raise Refused(RefusalCode.BAD_REQUEST, f"eval.loss must be a finite number >= 0, got {loss}")
            if not 1 <= examples <= self.config.max_num_examples:
                raise Refused(RefusalCode.BAD_REQUEST, f"eval.examples must be in 1..{self.config.max_num_examples}, "
                                                       f"got {examples}")

    @staticmethod
    def _check_header_length(length: int, cap: int, total_bytes: int) -> None:
        if length > cap:
            raise Refused(RefusalCode.HEADER_TOO_LARGE, f"the safetensors header declares {length} bytes, more than "
                                                        f"the {cap} its tensor index needs")
        if length > total_bytes - 8:
            raise Refused(RefusalCode.BAD_FILE, f"the safetensors header declares {length} bytes, more than the "
                                                f"upload's total_bytes {total_bytes} hold")

    def accept(self, client_id: str, header: UploadHeaderInfo, part_path: Path, sha256: str) -> UploadReceipt:
        """Validate a fully received update file and record it (exactly once per client and round)."""
        upload_id = hashlib.sha256(f"{header.round}:{client_id}:{sha256}".encode()).hexdigest()[:32]
        with self.store.read() as tx:
            existing = tx.upload_of(header.round, client_id)
        started = time.perf_counter()
        norm = None
        if existing is None:
            norm = self._validate_file(header, part_path)
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
            tx.touch_client(client_id, self.clock())  # an upload is a sign of life too (liveness window)
            tx.insert_upload(upload_id, header.round, client_id, sha256, header.total_bytes, header.num_examples, blob,
                             self.clock(), norm)
            if header.eval is not None:
                tx.insert_upload_eval(header.round, client_id, *header.eval)
        log.info("accepted update", extra={"client": client_id, "round": header.round, "sha256": sha256,
                                           "bytes": header.total_bytes, "num_examples": header.num_examples,
                                           "validate_s": round(validated - started, 4),
                                           "commit_s": round(time.perf_counter() - validated, 4)})
        return UploadReceipt(upload_id, sha256, header.round, size=header.total_bytes)

    def _validate_file(self, header: UploadHeaderInfo, path: Path) -> float:
        """Check the received file against its header and the round's global; returns the update's L2 norm."""
        from aggregator.core.robust import update_norm
        from aggregator.core.validate import validate_update
        from prufed.common.adapter_format import DELTA_FORMAT, AdapterFormatError, load_adapter

        try:
            actual = safetensors_index(path, header_cap(header.tensors), label="update")
            tensors, meta = load_adapter(path)
        except (AdapterFormatError, SafetensorsHeaderError) as exc:
            detail = str(exc).replace(str(path), "update")  # never reveal server paths
            raise Refused(RefusalCode.BAD_FILE, f"update is not a readable adapter file: {detail}") from exc
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
        return update_norm(tensors)
