"""The aggregator's only state: a SQL database (SQLite by default, PostgreSQL by URL) plus a content-addressed blob dir.

Every state change is one transaction. On SQLite, write transactions start with BEGIN IMMEDIATE, so two server
processes on one file serialise instead of failing late; WAL lets readers run beside a writer. Blobs (uploads and
global versions) are files named by their sha256, written tmp + fsync + rename, so a reference in the DB always
points at complete bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine, make_url

from prufed.common.errors import ConfigError
from prufed.common.fsio import fsync_dir

metadata = MetaData()

clients = Table(
    "clients", metadata,
    Column("id", String(64), primary_key=True),
    Column("token_salt", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False),  # sha256(salt || secret), hex
    Column("kept_layers", Text, nullable=False),  # JSON list of ORIGINAL indices
    Column("profile", Text, nullable=False),  # JSON
    Column("name", String(200), nullable=False, default=""),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

rounds = Table(
    "rounds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("state", String(16), nullable=False),  # open | closing | closed | failed
    Column("base_version", Integer, nullable=False),  # global version the clients train from
    Column("sampled", Text, nullable=False),  # JSON list of client ids
    Column("deadline", Float, nullable=False),
    Column("extensions", Integer, nullable=False, default=0),
    Column("lease_until", Float),  # while state == closing: the claimant's lease
    Column("created_at", Float, nullable=False),
    Column("closed_at", Float),
    Column("reason", Text, nullable=False, default=""),
    Column("metrics", Text, nullable=False, default="{}"),
)

uploads = Table(
    "uploads", metadata,
    Column("id", String(64), primary_key=True),
    Column("round", Integer, nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("num_examples", Integer, nullable=False),
    Column("blob", String(200), nullable=False),
    Column("accepted_at", Float, nullable=False),
    UniqueConstraint("round", "client_id", name="uq_upload_round_client"),
)

global_versions = Table(
    "global_versions", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("round", Integer, nullable=False),
    Column("blob", String(200), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

federation = Table(
    "federation", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


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
            return sha
        fd, tmp = self.temp_file()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return self.adopt(tmp, sha)

    def read_bytes(self, ref: str) -> bytes:
        return self.path(ref).read_bytes()

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


class Store:
    """Engine + blobs. Use `write()` for state changes (one transaction each) and `read()` for queries."""

    def __init__(self, url: str, blob_dir: str | Path | None = None):
        try:
            parsed = make_url(url)
        except Exception as exc:  # sqlalchemy raises ArgumentError subclasses with long messages
            raise ConfigError("--db", f"{url!r} is not a database URL (e.g. sqlite:///agg.db)") from exc
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if not parsed.database or parsed.database == ":memory:":
                raise ConfigError("--db", "SQLite needs a file path (sqlite:///path/agg.db); replicas share the file")
            db_path = Path(parsed.database).expanduser().resolve()
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": 30.0})
            _configure_sqlite(self.engine)
            default_blobs = Path(f"{db_path}.blobs")
        else:
            if blob_dir is None:
                raise ConfigError("--blob-dir", "a non-SQLite database needs an explicit blob directory")
            self.engine = create_engine(url, pool_pre_ping=True)
            default_blobs = Path(blob_dir)
        self.blobs = BlobStore(Path(blob_dir) if blob_dir is not None else default_blobs)
        metadata.create_all(self.engine)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite); commits on success, rolls back on error."""
        with self.engine.connect() as conn:
            conn.execution_options(prufed_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    """WAL + busy_timeout, and take the write lock at BEGIN so concurrent writers queue instead of deadlocking."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's begin event emit BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("prufed_write") else "BEGIN")
