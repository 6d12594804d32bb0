"""`aggregator serve` on loopback without a token generates one: printed once, kept with mode 0600 beside the
database, reused on a restart; off loopback a token stays mandatory."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest
from aggregator_helpers import REPO, write_yaml_config

from edge_client.transport import AggregatorClient, FatalError
from prufed.cli import main


def serve(db: str, model_dir, config) -> tuple[subprocess.Popen, list[str], str]:
    """`prufed aggregator serve` on 127.0.0.1:0 with no token; returns (process, stderr lines so far, address)."""
    proc = subprocess.Popen([sys.executable, "-m", "prufed", "aggregator", "serve", "--listen", "127.0.0.1:0",
                             "--db", db, "--model", str(model_dir), "--config", str(config)],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("listening on "):
            return proc, lines, line.split()[-1]
    raise AssertionError(f"server exited ({proc.wait()}) before listening:\n{''.join(lines)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def test_loopback_serve_generates_a_private_token_once(tmp_path, tiny_model_dir):
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    config = write_yaml_config(tmp_path / "agg.yaml")
    token_file = tmp_path / "agg.db.enroll-token"
    proc, lines, address = serve(db, tiny_model_dir, config)
    try:
        token = token_file.read_text().strip()
        assert len(token) >= 32 and stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        printed = [line for line in lines if token in line]
        assert len(printed) == 1 and str(token_file) in printed[0]
        with AggregatorClient(address) as client:
            assert client.register(token, [0, 1]).client_id
            with pytest.raises(FatalError):
                client.register(token[:-1] + ("x" if token[-1] != "x" else "y"), [0, 1])
    finally:
        stop(proc)
    # A restart reuses the token (enrolled agents keep working) and does not print it again.
    proc, lines, address = serve(db, tiny_model_dir, config)
    try:
        assert token_file.read_text().strip() == token
        assert not [line for line in lines if token in line]
        assert any(str(token_file) in line for line in lines)
        with AggregatorClient(address) as client:
            assert client.register(token, [2, 3]).client_id
    finally:
        stop(proc)


def test_non_loopback_still_needs_a_token(tmp_path, tiny_model_dir, capsys):
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    assert main(["aggregator", "serve", "--listen", "0.0.0.0:0", "--insecure", "--db", db,
                 "--model", str(tiny_model_dir)]) == 2
    assert "error: --enroll-token" in capsys.readouterr().err
    assert not (tmp_path / "agg.db.enroll-token").exists()


def test_generated_token_needs_a_sqlite_file(tmp_path, tiny_model_dir, capsys):
    """Beside a PostgreSQL database there is no file to keep the token in: say so instead of guessing a path."""
    assert main(["aggregator", "serve", "--db", "postgresql+psycopg://u@127.0.0.1:1/x", "--blob-dir",
                 str(tmp_path / "blobs"), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: --enroll-token" in err and "postgresql" in err
