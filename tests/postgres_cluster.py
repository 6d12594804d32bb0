"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temp dir, listening on 127.0.0.1 and a unix socket.

PostgreSQL refuses to run as root, so when the tests run as root (CI here does) the server runs as the `postgres`
system user that Debian's package creates. Missing binaries are a hard failure that names the Debian package: the
PostgreSQL tests are part of the suite and never skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEBIAN_HINT = "install the Debian package `postgresql` (apt-get install postgresql), or set PRUFED_PG_BIN to its bin/"


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries (initdb, pg_ctl) are not installed."""


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: $PRUFED_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates = [os.environ["PRUFED_PG_BIN"]] if os.environ.get("PRUFED_PG_BIN") else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    raise PostgresMissing(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {DEBIAN_HINT}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresCluster:
    """One running cluster; `url(db)` gives a SQLAlchemy URL, `create_database(name)` a fresh database."""

    root: Path
    bin_dir: Path
    port: int
    user: str

    @classmethod
    def start(cls) -> PostgresCluster:
        bin_dir = find_bin_dir()
        run_as = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="prufed-pg-"))
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        user = run_as or pwd.getpwuid(os.geteuid()).pw_name
        cluster = cls(root=root, bin_dir=bin_dir, port=_free_port(), user=user)
        cluster._run("initdb", "-D", str(root / "data"), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {cluster.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200 -c shared_buffers=32MB")
        cluster._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", options, "-w", "start")
        return cluster

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL over TCP on 127.0.0.1 (psycopg 3)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` (lower-case letters, digits, _) and return its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster's files."""
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    shutil.rmtree(self.root)
                    break
                except OSError:
                    time.sleep(0.2)


if __name__ == "__main__":  # `make test` runs this first: fail up front, naming the package, when PostgreSQL is missing
    import sys

    try:
        print(f"PostgreSQL server binaries: {find_bin_dir()}")
    except PostgresMissing as exc:
        sys.exit(f"make test: {exc}")
