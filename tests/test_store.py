"""The store on SQLite and PostgreSQL: serialised writers across processes, rollback, atomic content-addressed
blobs; WAL on SQLite."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import sqlalchemy
from aggregator_helpers import make_store
from sqlalchemy import insert, select, update

from aggregator.state import Store, federation, uploads
from prufed.common.errors import ConfigError

INCREMENT = """
import sys
from sqlalchemy import select, update
from aggregator.state import Store, federation
store = Store(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None, "db" if len(sys.argv) > 3 else "dir")
for _ in range(int(sys.argv[2])):
    with store.write() as tx:  # read-modify-write: only safe if writers serialise
        value = int(tx.conn.execute(select(federation.c.value).where(federation.c.key == "n")).scalar_one())
        tx.conn.execute(update(federation).where(federation.c.key == "n").values(value=str(value + 1)))
"""


def test_sqlite_file_uses_wal_and_creates_tables(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'sub' / 'agg.db'}")
    with store.read() as tx:
        assert tx.conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert tx.conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert set(sqlalchemy.inspect(store.engine).get_table_names()) >= {"clients", "rounds", "uploads",
                                                                      "global_versions"}
    assert store.blobs.root == tmp_path / "sub" / "agg.db.blobs"
    store.dispose()


def test_two_processes_serialise_writes(db_url, tmp_path):
    store = make_store(db_url, tmp_path)
    with store.write() as tx:
        tx.conn.execute(insert(federation).values(key="n", value="0"))
    blob_dir = [] if store.is_sqlite else [str(tmp_path / "spool")]
    procs = [subprocess.Popen([sys.executable, "-c", INCREMENT, db_url, "60", *blob_dir]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with store.read() as tx:
        assert tx.conn.execute(select(federation.c.value).where(federation.c.key == "n")).scalar_one() == "120"
    store.dispose()


def test_failed_transaction_rolls_back_everything(db_url, tmp_path):
    store = make_store(db_url, tmp_path)
    row = dict(round=1, client_id="c", sha256="s", bytes=1, num_examples=1, blob="b", accepted_at=0.0)
    with store.write() as tx:
        tx.conn.execute(insert(uploads).values(id="u1", **row))
    with pytest.raises(sqlalchemy.exc.IntegrityError), store.write() as tx:
        tx.conn.execute(insert(federation).values(key="side-effect", value="x"))
        tx.conn.execute(insert(uploads).values(id="u2", **row))  # UNIQUE(round, client_id)
    with store.read() as tx:
        assert tx.conn.execute(select(federation)).fetchall() == []
        assert [r.id for r in tx.conn.execute(select(uploads))] == ["u1"]
    store.dispose()


def test_blobs_are_content_addressed_and_atomic(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'agg.db'}")
    data = os.urandom(10_000)
    ref = store.blobs.put_bytes(data)
    assert ref == hashlib.sha256(data).hexdigest() and store.blobs.read_bytes(ref) == data
    assert store.blobs.put_bytes(data) == ref  # idempotent
    assert list(store.blobs.tmp_dir.iterdir()) == []
    fd, part = store.blobs.temp_file()
    os.write(fd, b"partial")
    os.close(fd)
    assert store.blobs.sweep_partials() == 0  # our own live process: kept
    dead = store.blobs.tmp_dir / "999999999-dead.part"
    dead.write_bytes(b"x")
    old = store.blobs.tmp_dir / "notapid-old.part"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.blobs.sweep_partials() == 2
    assert sorted(store.blobs.tmp_dir.iterdir()) == [part]
    store.dispose()


def test_bad_urls_name_the_flag(tmp_path):
    for url in ("not a url", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="^--db"):
            Store(url)
    with pytest.raises(ConfigError, match="^--blob-dir"):
        Store("postgresql+psycopg://u@localhost/db")


def test_db_blob_store_streams_chunks_in_and_out(db_url, tmp_path):
    """--blob-store db: ~1 MiB chunk rows, idempotent, a racing writer of the same bytes is harmless, and neither
    storing a spooled upload nor reading one back holds the whole blob in memory."""
    import threading
    import tracemalloc

    from aggregator.blobs import DbBlobStore
    from aggregator.state import Store, blob_chunks

    store = Store(db_url, tmp_path / "spool", blob_store="db")
    assert isinstance(store.blobs, DbBlobStore)
    data = os.urandom(2 * DbBlobStore.CHUNK_BYTES + 123)
    ref = store.blobs.put_bytes(data)
    assert ref == hashlib.sha256(data).hexdigest() and store.blobs.read_bytes(ref) == data
    assert store.blobs.put_bytes(data) == ref
    with store.read() as tx:
        sizes = [len(r.data) for r in tx.conn.execute(select(blob_chunks).where(blob_chunks.c.sha256 == ref)
                                                      .order_by(blob_chunks.c.seq))]
    assert sizes == [DbBlobStore.CHUNK_BYTES, DbBlobStore.CHUNK_BYTES, 123]

    other = os.urandom(3 * DbBlobStore.CHUNK_BYTES)
    racers = [Store(db_url, tmp_path / "spool", blob_store="db") for _ in range(2)]
    errors: list[BaseException] = []

    def put(racer):
        try:
            racer.blobs.put_bytes(other)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and store.blobs.read_bytes(hashlib.sha256(other).hexdigest()) == other

    big = os.urandom(24 * DbBlobStore.CHUNK_BYTES)
    spool = store.blobs.spool()
    spool.write(big)
    sha = spool.finish()
    del big
    tracemalloc.start()
    store.blobs.adopt(spool.path, sha)
    with store.blobs.local_path(sha) as path:
        assert path.stat().st_size == 24 << 20  # local_path already checked the sha256 while streaming
        _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * DbBlobStore.CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB: a whole 24 MiB blob was copied"
    assert not spool.path.exists() and not path.exists() and list(store.blobs.tmp_dir.iterdir()) == []
    with pytest.raises(KeyError):
        store.blobs.read_bytes("0" * 64)
    for s in (store, *racers):
        s.dispose()


def test_orphan_blobs_are_swept_after_the_grace_period(db_url, tmp_path):
    from aggregator_helpers import fast_config

    from aggregator.federation import Federation
    from aggregator.state import blob_index, global_versions

    store = make_store(db_url, tmp_path)
    kept, orphan, young = (store.blobs.put_bytes(os.urandom(100)) for _ in range(3))
    with store.write() as tx:
        tx.conn.execute(insert(global_versions).values(version=0, round=0, blob=kept, sha256=kept, created_at=0.0))
    old = time.time() - 120
    for ref in (kept, orphan):
        if store.is_sqlite:  # the directory store: file mtimes
            os.utime(store.blobs.path(ref), (old, old))
        else:  # the database store: the blobs row's created_at
            with store.write() as tx:
                tx.conn.execute(update(blob_index).where(blob_index.c.sha256 == ref).values(created_at=old))
    fed = Federation(store, fast_config(blob_sweep_grace_s=60))
    assert fed.sweep_blobs() == 1

    def exists(ref):
        try:
            store.blobs.read_bytes(ref)
        except (FileNotFoundError, KeyError):
            return False
        return True

    assert [exists(r) for r in (kept, orphan, young)] == [True, False, True]
    store.dispose()
