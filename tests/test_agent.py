"""The edge agent end to end, with REAL processes: a subprocess aggregator, three subprocess agents of different
depths on the tiny model, two rounds, a byte-recording TCP proxy between them (what went over the wire).

One federation exercises, in order: SIGTERM while waiting (exit 0, state persisted, resume keeps the client id),
SIGKILL after the update is written (restart uploads the saved update without retraining), SIGKILL after the upload
was accepted but before it was recorded (restart re-sends, the server answers with the original receipt: no
duplicate), the global adapter changing exactly in the layers someone held, and a canary string from a client's
private data appearing nowhere the aggregator could see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from aggregator_helpers import ENROLL, REPO, ServerProcess, write_yaml_config

from edge_client.agent import STATE_FILE, read_state, rotate, write_state
from edge_client.core.pruning import make_plan

CANARY = "ZQX-canary-7731-private-verse"
CLIENTS = [(6, "top"), (4, "top"), (3, "top")]  # union = layers 0..5, so 6 and 7 are never held


class RecordingProxy:
    """127.0.0.1:0 -> target; keeps every byte in both directions."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.upstream = bytearray()  # agent -> aggregator
        self.downstream = bytearray()  # aggregator -> agent
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, self.upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.downstream), daemon=True).start()

    def _pump(self, src, dst, sink):
        try:
            while data := src.recv(65536):
                with self.lock:
                    sink.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.listener.close()


def _write_data(path: Path, seed: int, canary: bool = False) -> Path:
    books = ["Genesis", "Exodus", "Ruth", "Job", "Mark", "John"]
    with path.open("w") as out:
        for i in range(24):
            book = books[(i * 7 + seed) % len(books)]
            text = f"{CANARY} {i}" if canary and i % 3 == 0 else f"verse {seed}-{i}"
            out.write(json.dumps({"instruction": "Name the book.", "input": text, "output": book,
                                  "category": book}) + "\n")
    return path


class Agent:
    def __init__(self, tmp: Path, index: int, address: str, model_dir: Path, depth: int, strategy: str):
        self.index, self.state_dir = index, tmp / f"agent{index}"
        self.data = _write_data(tmp / f"data{index}.jsonl", index, canary=index == 0)
        self.cmd = [sys.executable, "-m", "prufed", "edge", "run", "--aggregator", address, "--token", ENROLL,
                    "--model", str(model_dir), "--depth", str(depth), "--strategy", strategy, "--state-dir",
                    str(self.state_dir), "--data", str(self.data), "--quant", "fp32", "--seed", str(index),
                    "--no-gradient-checkpointing", "--retry-base", "0.1", "--retry-cap", "1"]
        self.logs: list[Path] = []
        self.proc = None

    def start(self, fault: str | None = None):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PRUFED_AGENT_FAULT", None)
        if fault:
            env["PRUFED_AGENT_FAULT"] = fault
        log = self.state_dir.parent / f"agent{self.index}-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.logs[-1].read_text()

    def wait(self, timeout=240) -> int:
        return self.proc.wait(timeout=timeout)

    def state(self) -> dict:
        return read_state(self.state_dir) or {}


def _wait_for(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_three_depths_two_rounds_kill_resume_and_no_data_on_the_wire(tmp_path, tiny_model_dir):
    from sqlalchemy import select

    from aggregator.config import AggregatorConfig
    from aggregator.federation import Federation, read_status
    from aggregator.state import Store, uploads
    from prufed.common.adapter_keys import layer_of

    config = write_yaml_config(tmp_path / "agg.yaml", rounds=2, min_clients=3, max_steps=2, seq_len=256,
                               retry_after_s=0.2, deadline_s=300.0)
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    server = ServerProcess(db, tiny_model_dir, config)
    proxy = RecordingProxy(server.address)
    agents = [Agent(tmp_path, i, proxy.address, tiny_model_dir, d, s) for i, (d, s) in enumerate(CLIENTS)]
    try:
        # SIGTERM while waiting for the round to open: exit 0, registered state persisted, token file private.
        a = agents[0].start()
        _wait_for(lambda: (a.state_dir / STATE_FILE).exists(), what="agent 0 registration")
        client_id = a.state()["client_id"]
        time.sleep(0.5)
        a.proc.send_signal(signal.SIGTERM)
        assert a.wait(60) == 0, a.log()
        assert a.state()["phase"] == "registered"
        assert stat.S_IMODE((a.state_dir / STATE_FILE).stat().st_mode) == 0o600
        assert "stopped; state persisted" in a.log()

        a.start()
        agents[1].start(fault="after_train:1")  # dies with its update written, not sent
        agents[2].start(fault="after_upload:1")  # dies after the server accepted its upload, before recording it
        assert agents[1].wait() == -signal.SIGKILL, agents[1].log()
        assert agents[1].state()["phase"] == "trained"
        assert agents[2].wait() == -signal.SIGKILL, agents[2].log()
        assert agents[2].state()["phase"] == "trained"  # the accepted upload was never recorded locally
        agents[1].start()
        agents[2].start()
        for agent in agents:
            assert agent.wait() == 0, agent.log()
    finally:
        for agent in agents:
            if agent.proc and agent.proc.poll() is None:
                agent.proc.kill()
        server.terminate()
        proxy.close()

    assert agents[0].state()["client_id"] == client_id  # resumed, not re-registered
    assert "resuming client" in agents[0].log()
    # the restarted agent 1 uploaded its saved update without training again
    assert "phase trained" in agents[1].log() and "round 1: uploaded" in agents[1].log()
    assert "round 1: training" not in agents[1].log()
    # agent 2's re-sent upload was recognised as the one already accepted
    history = {h["round"]: h for h in agents[2].state()["history"]}
    assert history[1]["receipt"]["duplicate"] is True and history[2]["receipt"]["duplicate"] is False

    store = Store(db)
    status = read_status(store)
    assert status["done"] and status["rounds_closed"] == 2
    assert status["clients_per_depth"] == {3: 1, 4: 1, 6: 1}
    with store.read() as tx:
        rows = tx.conn.execute(select(uploads.c.client_id, uploads.c.round)).fetchall()
    assert len(rows) == 6 and len(set(rows)) == 6  # exactly one accepted upload per client and round

    # the global changed exactly in the layers someone held and is bit-identical elsewhere
    kept = [make_plan(s, 8, d).kept_layers for d, s in CLIENTS]
    assert len({tuple(k) for k in kept}) == 3
    held = set().union(*kept)
    assert held != set(range(8))
    federation = Federation(store, AggregatorConfig())
    before, after = federation.global_state(0), federation.global_state(2)
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if layer_of(key) in held:
            if "lora_B" in key:  # B starts at zero, so every held B must have moved
                assert changed, key
        else:
            assert not changed, key
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k)

    # local data never left the device: not on the wire, not in the database, not in a blob
    assert CANARY in agents[0].data.read_text()
    sent = bytes(proxy.upstream)
    update_bytes = sum(h["upload_bytes"] for agent in agents for h in agent.state()["history"])
    assert len(sent) > update_bytes > 0  # the capture saw the uploads
    needle = CANARY.encode()
    assert needle not in sent and needle not in bytes(proxy.downstream)
    stored = [tmp_path / "agg.db", *(p for p in (tmp_path / "agg.db.blobs").rglob("*") if p.is_file())]
    assert len(stored) > 2
    for path in stored:
        assert needle not in path.read_bytes(), path
    store.dispose()


def test_state_file_is_atomic_and_private(tmp_path):
    write_state(tmp_path, {"client_id": "c", "token": "secret", "phase": "registered"})
    write_state(tmp_path, {"client_id": "c", "token": "secret", "phase": "uploaded"})
    assert read_state(tmp_path)["phase"] == "uploaded"
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind
    assert read_state(tmp_path / "missing") is None


def test_corrupt_state_names_the_flag(tmp_path):
    from prufed.common.errors import ConfigError

    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="--state-dir"):
        read_state(tmp_path)


def test_rotation_gives_each_round_fresh_examples():
    data = list(range(10))
    assert rotate(data, 1, 4) == data
    assert rotate(data, 2, 4)[:4] == [4, 5, 6, 7]
    assert rotate(data, 3, 4)[:2] == [8, 9] and sorted(rotate(data, 3, 4)) == data


def test_cli_validates_flags(tmp_path):
    base = ["edge", "run", "--state-dir", str(tmp_path / "s")]
    cases = [(["--aggregator", "nohostport"], "--aggregator"),
             (["--aggregator", "127.0.0.1:1", "--depth", "zero"], "--depth"),
             (["--aggregator", "127.0.0.1:1", "--depth", "0"], "--depth"),
             (["--aggregator", "127.0.0.1:1", "--data", str(tmp_path / "none.jsonl")], "--data"),
             (["--aggregator", "127.0.0.1:1", "--budget-gib", "-1"], "--budget-gib"),
             (["--aggregator", "127.0.0.1:1", "--retry-attempts", "0"], "--retry-attempts")]
    for extra, flag in cases:
        proc = subprocess.run([sys.executable, "-m", "prufed", *base, *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and flag in proc.stderr, (extra, proc.stderr)


def test_unreachable_aggregator_gives_up_after_backoff(tmp_path, tiny_model_dir):
    """No server at all: Register is retried on the backoff schedule, then the agent fails naming the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "prufed", "edge", "run", "--aggregator", f"127.0.0.1:{port}", "--token", ENROLL,
         "--model", str(tiny_model_dir), "--depth", "4", "--state-dir", str(tmp_path / "s"), "--retry-base", "0.05",
         "--retry-cap", "0.2", "--retry-attempts", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Register: UNAVAILABLE" in proc.stderr
    assert proc.stderr.count("retrying in") == 2
    assert not (tmp_path / "s" / STATE_FILE).exists()
    assert time.monotonic() - started < 60
