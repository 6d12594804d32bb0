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
from sqlalchemy import insert, select

from aggregator.state import Store, federation, uploads
from prufed.common.errors import ConfigError

INCREMENT = """
import sys
from sqlalchemy import select, update
from aggregator.state import Store, federation
store = Store(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None)
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
    blob_dir = [] if store.is_sqlite else [str(tmp_path / "blobs")]
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
