"""All of the aggregator's SQL: the tables and every query, behind `Store.read()` / `Store.write()` transactions.

SQLAlchemy Core, portable SQL only: SQLite by default (one file, shared by replicas on one host), PostgreSQL by URL
(replicas on several hosts). Every state change is one transaction. On SQLite, write transactions start with
BEGIN IMMEDIATE, so two server processes on one file serialise instead of failing late; WAL lets readers run beside
a writer. On PostgreSQL, write transactions take one transaction-scoped advisory lock first (the same serial order
between replicas on any host, so read-then-write logic such as "claim the close if quorum" or "insert the upload
unless one exists" cannot interleave), and read transactions run at REPEATABLE READ (one snapshot per read).
No other aggregator module issues SQL: they call the `Tx` methods below.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row, make_url
from sqlalchemy.exc import IntegrityError

from aggregator.blobs import BlobStore, DbBlobStore
from prufed.common.errors import ConfigError

WRITE_LOCK_KEY = 0x70727566  # "pruf": the advisory lock every PostgreSQL write transaction holds until commit

OPEN, CLOSING, CLOSED, FAILED = "open", "closing", "closed", "failed"
"""Round states: open (sampled, accepting) -> closing (claimed with a lease) -> closed | failed."""

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
    Column("cert_sha256", String(64)),  # under mTLS: sha256 of the client certificate bound at registration
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
    Column("norm", Float),  # ‖Δ‖₂ of the update, for the round's adaptive clipping
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

group_globals = Table(
    "group_globals", metadata,  # per-group modes: global version v of each depth group (its kept-layer list)
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("kept_layers", String(1000), primary_key=True),  # canonical JSON list of ORIGINAL indices, e.g. "[0,1,7]"
    Column("blob", String(200), nullable=False),
    Column("clients", Integer, nullable=False),  # updates of the group folded into this version (0: carried)
    Column("examples", Integer, nullable=False),
)

upload_evals = Table(
    "upload_evals", metadata,  # federated evaluation sent with an upload (the round's base global, before training)
    Column("round", Integer, primary_key=True, autoincrement=False),
    Column("client_id", String(64), primary_key=True),
    Column("loss", Float, nullable=False),  # nats/token on the client's held-out examples
    Column("examples", Integer, nullable=False),
)

federation = Table(
    "federation", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# --blob-store db: content-addressed blobs as ~1 MiB rows; the `blobs` row is written last, in the same transaction,
# so its presence means every chunk is there.
blob_chunks = Table(
    "blob_chunks", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
)

blob_index = Table(
    "blobs", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)


def group_key(kept_layers: Sequence[int]) -> str:
    """The canonical text of a depth group (its kept-layer list) as stored: compact JSON, e.g. "[0,1,7]"."""
    return json.dumps([int(i) for i in kept_layers], separators=(",", ":"))


class Tx:
    """One transaction's queries. Rows are SQLAlchemy `Row`s; JSON columns are decoded where a caller needs them."""

    def __init__(self, conn: Connection):
        self.conn = conn

    # ---- federation metadata and global versions ------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {row.key: row.value for row in self.conn.execute(select(federation))}

    def insert_meta(self, values: dict[str, str]) -> None:
        self.conn.execute(insert(federation), [{"key": k, "value": v} for k, v in values.items()])

    def version_row(self, version: int | None = None) -> Row | None:
        """Global version `version` (None: the latest)."""
        if version is None:
            version = self.latest_version()
        return self.conn.execute(select(global_versions).where(global_versions.c.version == version)).first()

    def insert_version(self, version: int, round_id: int, blob: str, created_at: float) -> None:
        self.conn.execute(insert(global_versions).values(version=version, round=round_id, blob=blob, sha256=blob,
                                                         created_at=created_at))

    def latest_version(self) -> int:
        return int(self.conn.execute(select(func.max(global_versions.c.version))).scalar() or 0)

    def insert_group_globals(self, version: int, groups: Sequence[dict[str, Any]]) -> None:
        """Rows {"kept_layers": [...], "blob", "clients", "examples"} of version `version` (per-group modes)."""
        self.conn.execute(insert(group_globals), [
            {"version": version, "kept_layers": group_key(g["kept_layers"]), "blob": g["blob"],
             "clients": g["clients"], "examples": g["examples"]} for g in groups])

    def group_globals(self, version: int) -> list[dict[str, Any]]:
        """The per-group globals of `version` (empty for a one-global version), sorted by group."""
        rows = self.conn.execute(select(group_globals).where(group_globals.c.version == version)
                                 .order_by(group_globals.c.kept_layers)).fetchall()
        return [{"kept_layers": json.loads(r.kept_layers), "blob": r.blob, "clients": r.clients,
                 "examples": r.examples} for r in rows]

    def group_global(self, version: int, kept_layers: Sequence[int]) -> str | None:
        """The blob of group `kept_layers` at `version`, or None."""
        return self.conn.execute(select(group_globals.c.blob).where(
            group_globals.c.version == version, group_globals.c.kept_layers == group_key(kept_layers))).scalar()

    # ---- clients --------------------------------------------------------------------------------------------
    def insert_client(self, client_id: str, salt: str, token_hash: str, kept_layers: Sequence[int], profile: str,
                      name: str, now: float, cert_sha256: str | None = None) -> None:
        self.conn.execute(insert(clients).values(
            id=client_id, token_salt=salt, token_hash=token_hash, kept_layers=json.dumps(list(kept_layers)),
            profile=profile, name=name, registered_at=now, last_seen=now, cert_sha256=cert_sha256))

    def count_clients(self) -> int:
        return int(self.conn.execute(select(func.count()).select_from(clients)).scalar_one())

    def client_cert(self, client_id: str) -> str | None:
        """The certificate fingerprint bound to a client (None: registered without mTLS, or unknown)."""
        return self.conn.execute(select(clients.c.cert_sha256).where(clients.c.id == client_id)).scalar()

    def client_credentials(self, client_id: str) -> Row | None:
        """(token_salt, token_hash) of a client, or None."""
        return self.conn.execute(select(clients.c.token_salt, clients.c.token_hash)
                                 .where(clients.c.id == client_id)).first()

    def client_layers(self, client_id: str) -> tuple[int, ...] | None:
        row = self.conn.execute(select(clients.c.kept_layers).where(clients.c.id == client_id)).first()
        return None if row is None else tuple(json.loads(row.kept_layers))

    def touch_client(self, client_id: str, now: float) -> None:
        self.conn.execute(update(clients).where(clients.c.id == client_id).values(last_seen=now))

    def active_clients(self, since: float) -> list[str]:
        """Ids of clients seen at or after `since`."""
        return [r.id for r in self.conn.execute(select(clients.c.id).where(clients.c.last_seen >= since))]

    def depth_counts(self) -> dict[int, int]:
        """{number of kept layers: clients}."""
        depths: dict[int, int] = {}
        for row in self.conn.execute(select(clients.c.kept_layers)):
            depth = len(json.loads(row.kept_layers))
            depths[depth] = depths.get(depth, 0) + 1
        return dict(sorted(depths.items()))

    # ---- rounds ---------------------------------------------------------------------------------------------
    def latest_round(self) -> Row | None:
        return self.conn.execute(select(rounds).order_by(rounds.c.id.desc()).limit(1)).first()

    def round(self, round_id: int) -> Row | None:
        return self.conn.execute(select(rounds).where(rounds.c.id == round_id)).first()

    def all_rounds(self) -> list[Row]:
        return list(self.conn.execute(select(rounds).order_by(rounds.c.id)).fetchall())

    def current_round_id(self) -> int | None:
        return self.conn.execute(select(func.max(rounds.c.id))).scalar()

    def open_round(self, round_id: int, base_version: int, sampled: Sequence[str], deadline: float,
                   now: float) -> None:
        self.conn.execute(insert(rounds).values(
            id=round_id, state=OPEN, base_version=base_version, sampled=json.dumps(list(sampled)), deadline=deadline,
            extensions=0, created_at=now, reason="", metrics="{}"))

    def claim_round(self, round_id: int, now: float, lease_s: float) -> bool:
        """Conditional UPDATE open|expired-closing -> closing: exactly one replica wins the close."""
        result = self.conn.execute(
            update(rounds)
            .where(rounds.c.id == round_id,
                   (rounds.c.state == OPEN) | ((rounds.c.state == CLOSING) & (rounds.c.lease_until < now)))
            .values(state=CLOSING, lease_until=now + lease_s))
        return result.rowcount == 1

    def extend_round(self, round_id: int, deadline: float, extensions: int) -> None:
        self.conn.execute(update(rounds).where(rounds.c.id == round_id, rounds.c.state == OPEN).values(
            deadline=deadline, extensions=extensions))

    def fail_round(self, round_id: int, now: float, reason: str, *, from_state: str = OPEN) -> None:
        self.conn.execute(update(rounds).where(rounds.c.id == round_id, rounds.c.state == from_state).values(
            state=FAILED, closed_at=now, lease_until=None, reason=reason))

    def close_round(self, round_id: int, now: float, metrics: dict[str, Any]) -> None:
        self.conn.execute(update(rounds).where(rounds.c.id == round_id, rounds.c.state == CLOSING).values(
            state=CLOSED, closed_at=now, lease_until=None, metrics=json.dumps(metrics, sort_keys=True)))

    # ---- uploads --------------------------------------------------------------------------------------------
    def upload_of(self, round_id: int, client_id: str) -> Row | None:
        return self.conn.execute(select(uploads).where(uploads.c.round == round_id,
                                                       uploads.c.client_id == client_id)).first()

    def insert_upload(self, upload_id: str, round_id: int, client_id: str, sha256: str, size: int,
                      num_examples: int, blob: str, now: float, norm: float | None = None) -> None:
        self.conn.execute(insert(uploads).values(
            id=upload_id, round=round_id, client_id=client_id, sha256=sha256, bytes=size, num_examples=num_examples,
            blob=blob, accepted_at=now, norm=norm))

    def referenced_blobs(self) -> set[str]:
        """Every blob ref a row points at (uploads, global versions and per-group globals)."""
        refs = {r.blob for r in self.conn.execute(select(uploads.c.blob))}
        refs |= {r.blob for r in self.conn.execute(select(group_globals.c.blob))}
        return refs | {r.blob for r in self.conn.execute(select(global_versions.c.blob))}

    def count_uploads(self, round_id: int) -> int:
        return int(self.conn.execute(select(func.count()).select_from(uploads)
                                     .where(uploads.c.round == round_id)).scalar_one())

    def round_uploads(self, round_id: int) -> list[Row]:
        """A round's uploads in content order (sha256, then client id), so sums are the same on every replica.

        Sorted here, not by ORDER BY: PostgreSQL would order text by its collation, SQLite bytewise."""
        rows = self.conn.execute(select(uploads).where(uploads.c.round == round_id)).fetchall()
        return sorted(rows, key=lambda r: (r.sha256, r.client_id))

    def insert_upload_eval(self, round_id: int, client_id: str, loss: float, examples: int) -> None:
        self.conn.execute(insert(upload_evals).values(round=round_id, client_id=client_id, loss=loss,
                                                      examples=examples))

    def upload_evals(self, round_id: int | None = None) -> list[Row]:
        """(round, client_id, loss, examples, kept_layers) of every federated evaluation (of one round if given)."""
        query = (select(upload_evals.c.round, upload_evals.c.client_id, upload_evals.c.loss, upload_evals.c.examples,
                        clients.c.kept_layers)
                 .join(clients, clients.c.id == upload_evals.c.client_id)
                 .order_by(upload_evals.c.round, upload_evals.c.client_id))
        if round_id is not None:
            query = query.where(upload_evals.c.round == round_id)
        return list(self.conn.execute(query).fetchall())

    def upload_counts(self) -> dict[int, int]:
        """{round: accepted uploads}."""
        return {int(r): int(n) for r, n in
                self.conn.execute(select(uploads.c.round, func.count()).group_by(uploads.c.round)).all()}


    # ---- blobs in the database (--blob-store db) ---------------------------------------------------------------
    def blob_info(self, sha256: str) -> Row | None:
        """(sha256, size, chunks, created_at) of a complete blob, or None."""
        return self.conn.execute(select(blob_index).where(blob_index.c.sha256 == sha256)).first()

    def blob_chunk(self, sha256: str, seq: int) -> bytes:
        return bytes(self.conn.execute(select(blob_chunks.c.data).where(
            blob_chunks.c.sha256 == sha256, blob_chunks.c.seq == seq)).scalar_one())


BLOB_STORES = ("dir", "db")


class Store:
    """Engine + blobs. `write()` for state changes (one transaction each), `read()` for queries; both yield a `Tx`.

    `blob_store="dir"` (default): blob files in `blob_dir` (default `<SQLite file>.blobs`; required on PostgreSQL).
    `blob_store="db"`: blobs in the database itself, so replicas on several hosts share nothing else; `blob_dir`
    (default: the system temp dir) then only holds this host's partial uploads."""

    def __init__(self, url: str, blob_dir: str | Path | None = None, blob_store: str = "dir"):
        if blob_store not in BLOB_STORES:
            raise ConfigError("--blob-store", f"must be one of {', '.join(BLOB_STORES)}, got {blob_store!r}")
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
            if blob_dir is None and blob_store == "dir":
                raise ConfigError("--blob-dir", "a non-SQLite database needs an explicit blob directory, or "
                                                "--blob-store db to keep blobs in the database")
            # one connection per concurrently busy RPC thread, up to the server's 64 workers
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=48, pool_timeout=60)
            default_blobs = Path(blob_dir) if blob_dir is not None else Path(tempfile.gettempdir()) / "prufed-blobs"
        local = BlobStore(Path(blob_dir) if blob_dir is not None else default_blobs)
        self.blob_store = blob_store
        self.blobs: BlobStore | DbBlobStore = local if blob_store == "dir" else DbBlobStore(self, local)
        with self.engine.connect() as conn:  # replicas starting together must not race on CREATE TABLE
            conn.execution_options(prufed_write=True)
            with conn.begin():
                self._lock_writes(conn)
                metadata.create_all(conn)
                _add_missing_columns(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        """One write transaction (BEGIN IMMEDIATE on SQLite); commits on success, rolls back on error."""
        with self.engine.connect() as conn:
            conn.execution_options(prufed_write=True)
            with conn.begin():
                self._lock_writes(conn)
                yield Tx(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield Tx(conn)

    def put_blob(self, sha256: str, chunks: Iterable[bytes]) -> None:
        """Store a blob as chunk rows plus its `blobs` row, in one transaction; idempotent. On PostgreSQL without
        the write lock (a long blob must not stall every other writer): a replica storing the same bytes at the
        same moment makes one of the two inserts fail on the primary key, which is then success."""
        with self.engine.connect() as conn:
            conn.execution_options(prufed_write=True)  # SQLite: BEGIN IMMEDIATE, no deadlock on lock upgrade
            try:
                with conn.begin():
                    tx = Tx(conn)
                    if tx.blob_info(sha256) is not None:
                        return
                    size = count = 0
                    for count, chunk in enumerate(chunks, start=1):  # one chunk in memory at a time
                        conn.execute(insert(blob_chunks).values(sha256=sha256, seq=count - 1, data=chunk))
                        size += len(chunk)
                    conn.execute(insert(blob_index).values(sha256=sha256, size=size, chunks=count, created_at=time.time()))
            except IntegrityError:
                with self.read() as tx:
                    if tx.blob_info(sha256) is None:
                        raise

    def sweep_blobs(self, referenced: set[str], older_than: float) -> int:
        """Delete database blobs that no row references and that were stored before `older_than` (a younger one may
        be between its store and its row insert). Returns how many were removed."""
        with self.write() as tx:
            stale = [r.sha256 for r in tx.conn.execute(select(blob_index.c.sha256)
                                                       .where(blob_index.c.created_at < older_than))]
            orphans = [sha for sha in stale if sha not in referenced]
            for start in range(0, len(orphans), 500):  # bounded IN lists
                batch = orphans[start:start + 500]
                tx.conn.execute(delete(blob_index).where(blob_index.c.sha256.in_(batch)))
                tx.conn.execute(delete(blob_chunks).where(blob_chunks.c.sha256.in_(batch)))
        return len(orphans)

    def read_blob_chunks(self, sha256: str) -> Iterator[bytes]:
        """A stored blob's chunks in order, one query (and one chunk in memory) at a time; KeyError if absent."""
        with self.read() as tx:
            info = tx.blob_info(sha256)
            if info is None:
                raise KeyError(f"blob {sha256} is not in the database")
            for seq in range(info.chunks):
                yield tx.blob_chunk(sha256, seq)

    def _lock_writes(self, conn: Connection) -> None:
        """PostgreSQL: serialise write transactions across replicas (SQLite's BEGIN IMMEDIATE does it there)."""
        if not self.is_sqlite:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")

    def reset(self) -> None:
        """Drop and recreate every PruFed table (a fresh federation on a scratch database, e.g. `prufed simulate
        --db URL`), under the write lock."""
        with self.engine.connect() as conn:
            conn.execution_options(prufed_write=True)
            with conn.begin():
                self._lock_writes(conn)
                metadata.drop_all(conn)
                metadata.create_all(conn)

    def dispose(self) -> None:
        self.engine.dispose()


def _add_missing_columns(conn: Connection) -> None:
    """Bring a database made by an older PruFed up to date: ALTER TABLE ... ADD COLUMN for nullable columns only
    (portable to SQLite and PostgreSQL; create_all never alters an existing table)."""
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(DDL(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


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
