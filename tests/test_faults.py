"""Kill/restart: real server processes SIGKILLed (PRUFED_FAULT hook) mid-upload, after acceptance and mid-close,
restarted on the same database (SQLite and PostgreSQL); clients vanishing mid-upload; two replicas racing to close one round."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch
from aggregator_helpers import (
    ENROLL,
    ServerProcess,
    fast_config,
    make_delta,
    make_store,
    start_inprocess,
    store_args,
    write_yaml_config,
)
from sqlalchemy import select

from edge_client.transport import AggregatorClient, TransientError
from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta
from prufed.common.wire import canonical_safetensors
from prufed.v1 import aggregator_pb2 as pb

A_LAYERS, B_LAYERS = list(range(8)), [0, 3, 7]
A_EXAMPLES, B_EXAMPLES = 11, 23
CONFIG = dict(rounds=1, close_lease_s=1.0, chunk_size=4096)

pytestmark = pytest.mark.slow


def update_file(directory, global0, layers, seed, examples):
    """The agent keeps its update on disk and re-sends the same file after a failure."""
    path = directory / f"update-{seed}.safetensors"
    meta = AdapterMeta(DELTA_FORMAT, tuple(layers), "", 1, examples)
    path.write_bytes(canonical_safetensors(make_delta(global0, layers, seed, scale=0.5), meta.to_strings()))
    return path


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def db_rows(store, table):
    with store.read() as tx:
        return tx.conn.execute(select(table)).fetchall()


def reference_global(tmp_path, model_dir, files) -> str:
    """sha256 of global v1 from an uninterrupted in-process run with the same two updates."""
    server, address, store = start_inprocess(tmp_path / "reference", model_dir, fast_config(**CONFIG))
    try:
        with AggregatorClient(address) as a, AggregatorClient(address) as b:
            a.register(ENROLL, A_LAYERS)
            b.register(ENROLL, B_LAYERS)
            wait_for(lambda: a.pull_task().kind == "task")
            a.upload_update(files["a"], 1, A_EXAMPLES, A_LAYERS)
            b.upload_update(files["b"], 1, B_EXAMPLES, B_LAYERS)
            return wait_for(lambda: a.status()["last_metrics"].get("sha256"))
    finally:
        server.stop(grace=1)
        store.dispose()


@pytest.fixture
def procs():
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.kill()


def test_kill_at_every_point_then_restart(db_url, tmp_path, tiny_model_dir, procs):
    from aggregator.state import global_versions, rounds, uploads

    (tmp_path / "reference").mkdir()
    global0 = _global0(tmp_path, tiny_model_dir)
    files = {"a": update_file(tmp_path, global0, A_LAYERS, 1, A_EXAMPLES),
             "b": update_file(tmp_path, global0, B_LAYERS, 2, B_EXAMPLES)}
    expected_sha = reference_global(tmp_path, tiny_model_dir, files)  # on SQLite: both back ends must match it
    config = write_yaml_config(tmp_path / "agg.yaml", **CONFIG)
    store = make_store(db_url, tmp_path)

    def start(fault=None):
        procs.append(ServerProcess(db_url, tiny_model_dir, config, fault=fault,
                                   extra_args=store_args(db_url, tmp_path)))
        return procs[-1]

    # 1. killed mid-upload: the stream is lost, nothing recorded
    server = start("mid_upload")
    a, b = AggregatorClient(server.address), AggregatorClient(server.address)
    a.register(ENROLL, A_LAYERS)
    b.register(ENROLL, B_LAYERS)
    wait_for(lambda: a.pull_task().kind == "task")
    with pytest.raises(TransientError):
        a.upload_update(files["a"], 1, A_EXAMPLES, A_LAYERS)
    assert server.wait_exit() == -9
    assert db_rows(store, uploads) == [] and list(store.blobs.tmp_dir.glob("*.part"))

    # 2. killed after the upload committed but before the reply: the update survives
    server = start("after_accept")
    assert list(store.blobs.tmp_dir.glob("*.part")) == []  # the dead process's partial stream was swept
    a, b = AggregatorClient(server.address, token=a.token), AggregatorClient(server.address, token=b.token)
    with pytest.raises(TransientError):
        a.upload_update(files["a"], 1, A_EXAMPLES, A_LAYERS)
    assert server.wait_exit() == -9
    [accepted] = db_rows(store, uploads)
    assert accepted.num_examples == A_EXAMPLES

    # 3. the agent retries (duplicate, not double-counted), one client vanishes mid-upload, B completes the
    #    quorum and the server is killed in the middle of the close
    server = start("mid_close")
    a, b = AggregatorClient(server.address, token=a.token), AggregatorClient(server.address, token=b.token)
    retry = a.upload_update(files["a"], 1, A_EXAMPLES, A_LAYERS)
    assert retry.duplicate and retry.upload_id == accepted.id
    _vanish_mid_upload(b, files["b"])
    assert server.proc.poll() is None and [r.id for r in db_rows(store, uploads)] == [accepted.id]
    with contextlib.suppress(TransientError):  # the close may kill the server before this reply leaves
        b.upload_update(files["b"], 1, B_EXAMPLES, B_LAYERS)
    assert server.wait_exit() == -9
    assert [r.state for r in db_rows(store, rounds)] == ["closing"]
    assert [r.version for r in db_rows(store, global_versions)] == [0]

    # 4. a clean restart re-runs the abandoned close once its lease expires: the same global as without faults
    server = start()
    with AggregatorClient(server.address, token=a.token) as a:
        status = wait_for(lambda: (s := a.status())["global_version"] == 1 and s)
        assert wait_for(lambda: a.pull_task().kind == "done")
    metrics = status["last_metrics"]
    assert metrics["sha256"] == expected_sha
    assert metrics["updates"] == 2 and metrics["examples"] == A_EXAMPLES + B_EXAMPLES
    assert len(db_rows(store, uploads)) == 2 and [r.version for r in db_rows(store, global_versions)] == [0, 1]
    assert server.terminate() == 0
    store.dispose()


def _global0(tmp_path, model_dir) -> dict:
    from aggregator.federation import Federation
    from aggregator.state import Store

    store = Store(f"sqlite:///{tmp_path / 'global0.db'}")
    fed = Federation(store, fast_config(**CONFIG))
    fed.initialize(model_dir)
    state = fed.global_state(0)
    store.dispose()
    return state


def _vanish_mid_upload(client: AggregatorClient, path) -> None:
    """Send the header and one chunk, then cancel the call as a dying device would."""
    from prufed.common.wire import safetensors_index

    data = path.read_bytes()
    sent, release = threading.Event(), threading.Event()

    def stream():
        yield pb.UploadChunk(header=pb.UploadHeader(
            round=1, total_bytes=len(data), num_examples=B_EXAMPLES, kept_layers=B_LAYERS,
            tensors=[pb.TensorInfo(name=n, shape=list(s), dtype=d) for n, s, d in safetensors_index(path)]))
        yield pb.UploadChunk(data=data[:1024])
        sent.set()
        release.wait(10)

    future = client.stub.UploadUpdate.future(stream(), metadata=client._metadata(), timeout=30)
    assert sent.wait(10)
    time.sleep(0.3)
    future.cancel()
    release.set()


def test_two_replicas_race_to_close(db_url, tmp_path, tiny_model_dir, procs):
    from aggregator.state import global_versions, rounds

    config = write_yaml_config(tmp_path / "agg.yaml", rounds=2, min_clients=4, close_lease_s=30.0)
    store = make_store(db_url, tmp_path)  # first: replicas then start on an existing schema as well as a fresh one
    for _ in range(2):
        procs.append(ServerProcess(db_url, tiny_model_dir, config, extra_args=store_args(db_url, tmp_path)))
    clients = []
    layer_sets = [A_LAYERS, B_LAYERS, [1, 2], [4, 5, 6]]
    for i, layers in enumerate(layer_sets):  # alternate replicas: any replica serves any client
        client = AggregatorClient(procs[i % 2].address)
        client.register(ENROLL, layers)
        clients.append(client)
    for round_id in (1, 2):
        for i, (client, layers) in enumerate(zip(clients, layer_sets)):
            task = wait_for(lambda c=client, r=round_id: (t := c.pull_task()).kind == "task" and t.round == r and t)
            tensors, _meta, version = client.download_global()
            assert version == task.global_version == round_id - 1
            delta = {k: torch.full_like(v, 0.01 * (i + 1)) for k, v in tensors.items()}
            client.upload_update(delta, round_id, 10 + i, layers)
    wait_for(lambda: clients[0].status()["done"])
    closed = db_rows(store, rounds)
    assert [r.state for r in closed] == ["closed", "closed"]
    assert [r.version for r in db_rows(store, global_versions)] == [0, 1, 2]
    for proc in procs:
        assert proc.terminate() == 0
    closes = [json.loads(line) for proc in procs for line in proc.log
              if line.startswith("{") and '"closed round"' in line]
    assert sorted(entry["round"] for entry in closes) == [1, 2]  # each round closed exactly once across replicas
    assert all(json.loads(r.metrics)["updates"] == 4 for r in closed)
    store.dispose()
