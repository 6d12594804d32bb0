"""Content-addressed blobs (uploads and global versions): files beside the database, or rows inside it.

Two stores, one interface (`spool`, `adopt`, `put_bytes`, `read_bytes`, `local_path`, `sweep_partials`):
- `BlobStore` (--blob-store dir, the default): files named by their sha256, written tmp + fsync + rename, so a
  reference in the DB always points at complete bytes. Incoming streams spool into `<root>/tmp/` and are renamed
  into place once verified.
- `DbBlobStore` (--blob-store db): ~1 MiB chunk rows in the database (SQL in `aggregator.state`), so replicas on
  several hosts share nothing but the database. Incoming streams still spool to a local temp file (validation
  reads it), then stream into the database chunk by chunk; readers stream chunks back out to a local temp file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from prufed.common.adapter_format import AdapterMeta, load_adapter
from prufed.common.fsio import fsync_dir


class BlobStore:
    """Content-addressed files: `<root>/<sha[:2]>/<sha>`; partial writes live in `<root>/tmp/` until renamed."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def temp_file(self) -> tuple[int, Path]:
        """An open fd and path for streaming bytes that may become a blob."""
        fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".part", dir=self.tmp_dir)
        return fd, Path(name)

    def spool(self) -> Spool:
        """A background writer for an incoming stream (see `Spool`)."""
        fd, path = self.temp_file()
        return Spool(fd, path)

    def adopt(self, tmp_path: Path, sha256: str) -> str:
        """Rename a finished, fsynced temp file into place; returns the blob ref (the sha256)."""
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
        return sha256

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.path(sha).is_file():
            os.utime(self.path(sha))  # a fresh mtime keeps it out of the orphan sweep until its row exists
            return sha
        fd, tmp = self.temp_file()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return self.adopt(tmp, sha)

    def read_bytes(self, ref: str) -> bytes:
        return self.path(ref).read_bytes()

    @contextlib.contextmanager
    def local_path(self, ref: str) -> Iterator[Path]:
        """A readable local file holding blob `ref` (here: the blob itself), valid inside the `with`."""
        yield self.path(ref)

    def load(self, ref: str) -> tuple[dict, AdapterMeta]:
        """The tensors and metadata of adapter blob `ref`."""
        return load_adapter(self.path(ref))

    def sweep_orphans(self, referenced: set[str], grace_s: float) -> int:
        """Delete blobs that no row references and that are older than `grace_s` (a younger one may be between its
        rename and its row insert: `adopt` and `put_bytes` leave a fresh mtime). Returns how many were removed."""
        cutoff = time.time() - grace_s
        removed = 0
        for shard in self.root.iterdir():
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for blob in shard.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if blob.name not in referenced and blob.stat().st_mtime < cutoff:
                        blob.unlink()
                        removed += 1
        return removed

    def sweep_partials(self, older_than_s: float = 3600.0) -> int:
        """Delete abandoned partial streams: those of a dead local process (the pid prefixes the name), or older
        than `older_than_s` (a replica on another host). Returns how many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for part in self.tmp_dir.glob("*.part"):
            pid = part.name.split("-", 1)[0]
            with contextlib.suppress(FileNotFoundError):
                if (pid.isdecimal() and not _pid_alive(int(pid))) or part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
        return removed


class ChunkTable(Protocol):
    """What `DbBlobStore` needs from `aggregator.state.Store` (which holds the SQL)."""

    def put_blob(self, sha256: str, chunks: Iterable[bytes]) -> None: ...

    def read_blob_chunks(self, sha256: str) -> Iterator[bytes]: ...

    def sweep_blobs(self, referenced: set[str], older_than: float) -> int: ...


class DbBlobStore:
    """Blobs in the database as `CHUNK_BYTES` rows; a local `BlobStore` directory holds only partial streams."""

    CHUNK_BYTES = 1024 * 1024  # big enough that per-row overhead is small, small enough to stay a few MiB in RAM

    def __init__(self, table: ChunkTable, local: BlobStore):
        self.table = table
        self.local = local
        self.tmp_dir = local.tmp_dir

    def spool(self) -> Spool:
        return self.local.spool()

    def temp_file(self) -> tuple[int, Path]:
        return self.local.temp_file()

    def sweep_partials(self, older_than_s: float = 3600.0) -> int:
        return self.local.sweep_partials(older_than_s)

    def sweep_orphans(self, referenced: set[str], grace_s: float) -> int:
        """Delete blobs no row references, stored more than `grace_s` ago. Returns how many were removed."""
        return self.table.sweep_blobs(referenced, time.time() - grace_s)

    def adopt(self, tmp_path: Path, sha256: str) -> str:
        """Stream a finished temp file into the database chunk by chunk, then delete it; returns the ref."""
        with open(tmp_path, "rb") as handle:
            self.table.put_blob(sha256, iter(lambda: handle.read(self.CHUNK_BYTES), b""))
        tmp_path.unlink()
        return sha256

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        view = memoryview(data)
        self.table.put_blob(sha, (view[i:i + self.CHUNK_BYTES] for i in range(0, len(view), self.CHUNK_BYTES)))
        return sha

    def read_bytes(self, ref: str) -> bytes:
        return b"".join(self.table.read_blob_chunks(ref))

    def load(self, ref: str) -> tuple[dict, AdapterMeta]:
        """The tensors and metadata of adapter blob `ref` (streamed through a local temp file)."""
        with self.local_path(ref) as path:
            return load_adapter(path)

    @contextlib.contextmanager
    def local_path(self, ref: str) -> Iterator[Path]:
        """Blob `ref` streamed out into a local temp file (checked against its sha256), deleted after the `with`."""
        fd, path = self.local.temp_file()
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in self.table.read_blob_chunks(ref):
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != ref:
                raise OSError(f"blob {ref[:16]}… in the database hashes to {digest.hexdigest()[:16]}…")
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """sha256 of incoming chunks on the receiving thread; write + periodic fdatasync on a helper thread.

    hashlib and file writes release the GIL, so hashing (~1.3 GiB/s here) and disk writes + writeback run on two
    cores at once and overlap with gRPC receiving the next chunk; by `finish()` only the tail remains to be synced.
    (Hashing on the writer thread too was measured ~10% slower end to end in scripts/bench_transport.py.)
    """

    SYNC_EVERY_BYTES = 4 * 1024 * 1024  # bounds the tail left for the final fsync

    def __init__(self, fd: int, path: Path):
        self.path = path
        self.size = 0
        self._fd = fd
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)  # bounded: memory stays at a few chunks
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="spool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        unsynced = 0
        try:
            while (data := self._queue.get()) is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                unsynced += len(data)
                if unsynced >= self.SYNC_EVERY_BYTES:
                    os.fdatasync(self._fd)
                    unsynced = 0
            os.fsync(self._fd)
        except BaseException as exc:  # surfaced by finish()
            self._error = exc
            while self._queue.get() is not None:  # drain so a blocked producer can finish
                pass

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._queue.put(data)
        self._digest.update(data)

    def finish(self) -> str:
        """Wait for the writer; the file is complete and synced. Returns the sha256 hex digest."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def discard(self) -> None:
        """Stop the writer (if still running) and delete the partial file."""
        self._stop()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
