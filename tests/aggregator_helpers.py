"""Helpers for the aggregator tests: valid deltas, in-process and subprocess servers, self-signed certificates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from prufed.common.adapter_keys import keys_for_layers

ENROLL = "enroll-secret-123"
REPO = Path(__file__).resolve().parent.parent


def make_delta(global_state: dict, kept_layers, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A valid update for `kept_layers`: random fp32 tensors of the global's shapes (deterministic in seed)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(global_state[k].shape, generator=gen) * scale
            for k in keys_for_layers(global_state, kept_layers)}


def header_for(path: Path, round_id: int, num_examples: int, kept, **overrides):
    """The UploadHeader a well-behaved client would send for the file at `path` (fields overridable)."""
    from prufed.common.wire import safetensors_index
    from prufed.v1 import aggregator_pb2 as pb

    fields = dict(round=round_id, total_bytes=path.stat().st_size, num_examples=num_examples, kept_layers=list(kept),
                  tensors=[pb.TensorInfo(name=n, shape=list(s), dtype=d) for n, s, d in safetensors_index(path)])
    fields.update(overrides)
    return pb.UploadHeader(**fields)


def raw_upload(client, header, data: bytes, sha: str | None, chunk: int = 4096, timeout: float = 30):
    """UploadUpdate by hand: header, `data` in chunks, then a trailer with `sha` (None: no trailer)."""
    from prufed.v1 import aggregator_pb2 as pb

    def stream():
        yield pb.UploadChunk(header=header)
        for start in range(0, len(data), chunk):
            yield pb.UploadChunk(data=data[start:start + chunk])
        if sha is not None:
            yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=sha))

    return client.stub.UploadUpdate(stream(), metadata=client._metadata(), timeout=timeout)


def fast_config(**overrides):
    from aggregator.config import AggregatorConfig

    values = dict(rounds=2, min_clients=2, clients_fraction=1.0, quorum_fraction=1.0, deadline_s=60.0,
                  close_lease_s=2.0, retry_after_s=0.1, lora_r=4, lora_alpha=8.0)
    values.update(overrides)
    return AggregatorConfig(**values)


def store_args(db_url: str, tmp_path: Path) -> tuple[str, ...]:
    """`serve`'s blob flags for `db_url`: SQLite keeps blob files beside its file (the default), PostgreSQL keeps
    blobs in the database (the replica deployment; partial uploads spool in tmp_path/spool)."""
    return () if db_url.startswith("sqlite") else ("--blob-store", "db", "--blob-dir", str(tmp_path / "spool"))


def make_store(db_url: str, tmp_path: Path):
    """A `Store` on `db_url` with the blob store `store_args` gives a server."""
    from aggregator.state import Store

    if db_url.startswith("sqlite"):
        return Store(db_url)
    return Store(db_url, tmp_path / "spool", blob_store="db")


def start_inprocess(tmp_path: Path, model_dir: Path, config=None, db_url: str | None = None, **kwargs):
    """A real gRPC server on 127.0.0.1:0 over `db_url` (default: a SQLite file in tmp_path); returns
    (server, address, store)."""
    from aggregator.server import create_server

    store = make_store(db_url or f"sqlite:///{tmp_path / 'agg.db'}", tmp_path)
    kwargs.setdefault("enroll_tokens", [ENROLL])
    server, port = create_server("127.0.0.1:0", store, config or fast_config(), model_dir=model_dir, **kwargs)
    return server, f"127.0.0.1:{port}", store


def open_round_one(tmp_path: Path, model_dir: Path, config, a_layers, b_layers, enroll: str = ENROLL):
    """An in-process server with clients a and b registered and round 1 open for them, then a late client
    (registered after the round opened, so not sampled). Returns (server, address, store, a, b, late)."""
    from edge_client.transport import AggregatorClient

    server, address, store = start_inprocess(tmp_path, model_dir, config)
    a, b, late = AggregatorClient(address), AggregatorClient(address), AggregatorClient(address)
    a.register(enroll, a_layers)
    b.register(enroll, b_layers)
    deadline = time.monotonic() + 20
    while a.pull_task().kind != "task":
        assert time.monotonic() < deadline, "round 1 did not open"
        time.sleep(0.05)
    late.register(enroll, b_layers)
    return server, address, store, a, b, late


def write_yaml_config(path: Path, **overrides) -> Path:
    import yaml

    values = fast_config(**overrides).to_dict()
    path.write_text(yaml.safe_dump(values))
    return path


class ServerProcess:
    """`prufed aggregator serve` (as `python -m prufed`) in a subprocess on port 0; kill() in a finalizer."""

    def __init__(self, db: str, model_dir: Path, config_path: Path, fault: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        env = dict(os.environ)
        env.pop("PRUFED_FAULT", None)
        if fault:
            env["PRUFED_FAULT"] = fault
        cmd = [sys.executable, "-m", "prufed", "aggregator", "serve", "--listen", "127.0.0.1:0", "--db", db,
               "--model", str(model_dir), "--config", str(config_path), "--enroll-token", ENROLL, *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.log: list[str] = []
        self.address = self._wait_listening()

    def _wait_listening(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.poll()}) before listening:\n{''.join(self.log)}")
            self.log.append(line)
            if line.startswith("listening on "):
                # keep draining stderr so the server never blocks on a full pipe
                self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
                self._drain.start()
                return line.split()[-1]
        raise RuntimeError("server did not start in time")

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=10)
        return code

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def self_signed_cert(directory: Path, name: str = "server", cn: str = "localhost") -> tuple[Path, Path]:
    """(cert, key) PEM files for `cn` with a SAN of localhost/127.0.0.1, made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
