"""Client-side failover: one channel over two aggregator replicas on one database (SQLite and PostgreSQL); the
replica receiving an upload dies mid-stream, gRPC's retry policy replays the upload on the other replica, and the
update is counted once."""

from __future__ import annotations

import time

import pytest
import torch
from aggregator_helpers import ENROLL, ServerProcess, make_store, store_args, write_yaml_config
from sqlalchemy import select

from edge_client.transport import AggregatorClient, channel_target, parse_addresses
from prufed.common.errors import ConfigError

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_upload_cut_off_by_a_dying_replica_is_replayed_on_the_other(db_url, tmp_path, tiny_model_dir):
    from aggregator.state import uploads

    config = write_yaml_config(tmp_path / "agg.yaml", rounds=1, min_clients=2, chunk_size=4096)
    store = make_store(db_url, tmp_path)
    doomed = ServerProcess(db_url, tiny_model_dir, config, fault="mid_upload",
                           extra_args=store_args(db_url, tmp_path))
    survivor = ServerProcess(db_url, tiny_model_dir, config, extra_args=store_args(db_url, tmp_path))
    addresses = f"{doomed.address},{survivor.address}"
    try:
        # pick_first: every call goes to the first listed replica while it lives, so the doomed one gets the upload
        a = AggregatorClient(addresses, lb_policy="pick_first", chunk_size=4096)
        b = AggregatorClient(addresses, lb_policy="pick_first", chunk_size=4096)
        a.register(ENROLL, [0, 1, 2, 3])
        b.register(ENROLL, [4, 5])
        task = wait_for(lambda: (t := a.pull_task()).kind == "task" and t)
        tensors, _meta, _version = a.download_global()
        delta = {k: torch.full_like(v, 0.01) for k, v in tensors.items()}
        receipt = a.upload_update(delta, task.round, 7, [0, 1, 2, 3])  # one call: no retry loop of ours
        assert doomed.wait_exit() == -9, "the first replica was meant to die mid-upload"
        assert receipt.accepted and not receipt.duplicate
        again = a.upload_update(delta, task.round, 7, [0, 1, 2, 3])
        assert again.duplicate and again.upload_id == receipt.upload_id
        tensors_b, _meta, _version = b.download_global()
        b.upload_update({k: torch.full_like(v, -0.02) for k, v in tensors_b.items()}, task.round, 3, [4, 5])
        status = wait_for(lambda: (s := b.status())["global_version"] == 1 and s)
        assert status["last_metrics"]["updates"] == 2 and status["last_metrics"]["examples"] == 10
        with store.read() as tx:
            rows = tx.conn.execute(select(uploads)).fetchall()
        assert sorted(r.num_examples for r in rows) == [3, 7]
        assert any("fault injection" in line for line in doomed.log)
        a.close()
        b.close()
    finally:
        doomed.kill()
        survivor.kill()
        store.dispose()


def test_address_lists_are_parsed_and_checked():
    assert parse_addresses("127.0.0.1:5001, 127.0.0.1:5002") == [("127.0.0.1", 5001), ("127.0.0.1", 5002)]
    assert channel_target("agg.example.org:443") == ("agg.example.org:443", None)
    assert channel_target("127.0.0.1:1,[::1]:2")[0] == "ipv4:127.0.0.1:1"  # one family per target
    assert channel_target("localhost:7001,127.0.0.2:7002") == ("ipv4:127.0.0.1:7001,127.0.0.2:7002", "localhost")
    for bad in ("127.0.0.1", "127.0.0.1:1,", "a:0", "a:b:c"):
        with pytest.raises(ConfigError, match="^--aggregator"):
            parse_addresses(bad)
    with pytest.raises(ConfigError, match="^--lb-policy"):
        AggregatorClient("127.0.0.1:1", lb_policy="random")
