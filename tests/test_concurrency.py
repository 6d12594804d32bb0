"""On SQLite and PostgreSQL, 200 concurrent clients register, pull, download and upload small adapters on loopback:
zero errors, every update counted exactly once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from aggregator_helpers import ENROLL, fast_config, start_inprocess

from edge_client.transport import AggregatorClient

CLIENTS = 200

pytestmark = pytest.mark.slow


def test_200_concurrent_uploads(db_url, tmp_path, tiny_model_dir):
    # every client registers and uploads at once: lift the registration rate limit and the upload-stream cap
    config = fast_config(rounds=1, min_clients=CLIENTS, deadline_s=300, register_burst=CLIENTS,
                         max_concurrent_uploads=CLIENTS)
    server, address, store = start_inprocess(tmp_path, tiny_model_dir, config, db_url=db_url)
    layer_sets = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 4, 6], [1, 7]]
    try:
        clients = [AggregatorClient(address) for _ in range(CLIENTS)]
        with ThreadPoolExecutor(max_workers=50) as pool:
            list(pool.map(lambda ic: ic[1].register(ENROLL, layer_sets[ic[0] % 3]), enumerate(clients)))

        def one(index: int):
            client = clients[index]
            deadline = time.monotonic() + 60
            while (task := client.pull_task()).kind != "task":
                assert time.monotonic() < deadline, task.reason
                time.sleep(task.retry_after_s)
            tensors, _meta, _version = client.download_global()
            delta = {k: torch.full_like(v, 1e-3 * (index % 7)) for k, v in tensors.items()}
            return client.upload_update(delta, task.round, 1 + index % 5, layer_sets[index % 3])

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            receipts = list(pool.map(one, range(CLIENTS)))
        elapsed = time.perf_counter() - started
        assert len({r.upload_id for r in receipts}) == CLIENTS and not any(r.duplicate for r in receipts)
        deadline = time.monotonic() + 60
        while (status := server.federation.status())["global_version"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert status["last_metrics"]["updates"] == CLIENTS
        assert status["last_metrics"]["examples"] == sum(1 + i % 5 for i in range(CLIENTS))
        assert status["clients_per_depth"] == {2: 66, 4: 67, 8: 67}
        assert elapsed < 60, f"200 clients took {elapsed:.1f} s"
        for client in clients:
            client.close()
    finally:
        server.stop(grace=1)
        store.dispose()
