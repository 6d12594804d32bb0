"""The round state machine over a real SQLite and PostgreSQL store with a fake clock: sampling, quorum, deadline/extend/fail,
exactly-once uploads, idempotent close after an abandoned claim."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from aggregator_helpers import fast_config, make_delta, make_store

from aggregator.federation import Federation
from aggregator.rounds import DONE, TASK, WAIT, sample_clients
from aggregator.uploads import UploadHeaderInfo
from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta
from prufed.common.errors import ConfigError
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import canonical_safetensors, safetensors_index


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_fed(db_url: str, tmp_path: Path, model_dir: Path, **overrides) -> Federation:
    fed = Federation(make_store(db_url, tmp_path), fast_config(**overrides), clock=Clock())
    fed.initialize(model_dir)
    return fed


def upload(fed: Federation, client: str, layers, round_id: int, seed: int, examples: int, tmp_path: Path,
           tensors: dict | None = None):
    """Send one update through the same checks as a stream (`tensors` default: a random delta from `seed`)."""
    path = tmp_path / f"{client}-{round_id}-{seed}.part"
    meta = AdapterMeta(DELTA_FORMAT, tuple(layers), "", round_id, examples)
    base = fed.global_state()
    path.write_bytes(canonical_safetensors(tensors or make_delta(base, layers, seed), meta.to_strings()))
    header = UploadHeaderInfo(round_id, path.stat().st_size, examples, tuple(layers), safetensors_index(path))
    fed.uploads.check_fields(header)
    fed.uploads.check(client, header)
    return fed.uploads.accept(client, header, path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_sampling_is_deterministic_and_respects_fraction_and_minimum():
    active = [f"c{i:02d}" for i in range(20)]
    assert sample_clients(active, 5, seed=3, round_id=2) == sample_clients(list(reversed(active)), 5, 3, 2)
    assert sample_clients(active, 5, 3, 2) != sample_clients(active, 5, 3, 3)
    config = fast_config(clients_fraction=0.3, min_clients=4)
    assert [config.sample_size(n) for n in (4, 10, 20, 100)] == [4, 4, 6, 30]
    assert config.quorum(7) == 7 and fast_config(quorum_fraction=0.5).quorum(7) == math.ceil(3.5)


def test_round_lifecycle_quorum_close_and_done(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, rounds=2, min_clients=2)
    a, _ = fed.clients.register([0, 1, 2, 3, 4, 5, 6, 7], {"name": "a"})
    assert fed.rounds.pull_task(a).kind == WAIT and fed.tick() == []  # one client: below min_clients
    b, token_b = fed.clients.register([1, 5], {"name": "b"})
    assert fed.clients.authenticate(token_b) == b and fed.clients.authenticate(token_b + "x") is None
    fed.tick()
    task = fed.rounds.pull_task(a)
    assert (task.kind, task.round, task.global_version) == (TASK, 1, 0)
    base = {k: v.clone() for k, v in fed.global_state(0).items()}
    upload(fed, a, range(8), 1, seed=1, examples=10, tmp_path=tmp_path)
    assert fed.rounds.pull_task(a).reason == "update for round 1 already accepted"
    assert fed.tick() == []  # quorum is both sampled clients
    upload(fed, b, [1, 5], 1, seed=2, examples=30, tmp_path=tmp_path)
    assert fed.tick() == [1]
    status = fed.status()
    assert status["global_version"] == 1 and status["rounds"][0]["state"] == "closed"
    assert status["rounds"][1]["state"] == "open"  # the next round opens right after the close
    assert status["last_metrics"]["updates"] == 2 and status["last_metrics"]["examples"] == 40
    new = fed.global_state(1)
    moved = {k for k in new if not torch.equal(new[k], base[k])}
    assert moved == set(new)  # client a held every layer, and random deltas move every tensor
    task2 = fed.rounds.pull_task(b)
    assert (task2.round, task2.global_version) == (2, 1)
    upload(fed, a, range(8), 2, seed=3, examples=1, tmp_path=tmp_path)
    upload(fed, b, [1, 5], 2, seed=4, examples=1, tmp_path=tmp_path)
    fed.tick()
    assert fed.rounds.pull_task(a).kind == DONE and fed.status()["done"]
    with pytest.raises(Refused) as stale:
        upload(fed, a, range(8), 2, seed=5, examples=1, tmp_path=tmp_path)
    assert stale.value.code == "stale_round" and "closed" in str(stale.value)


def test_deadline_extends_then_fails_then_closes_with_minimum(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, rounds=3, min_clients=2, deadline_s=100, max_extensions=1,
                   min_updates=1)
    a, _ = fed.clients.register([0, 1], {})
    b, _ = fed.clients.register([2, 3], {})
    fed.tick()
    fed.clock.now += 101
    fed.tick()  # no update at the deadline: extend once
    [row] = fed.status()["rounds"]
    assert row["state"] == "open" and row["extensions"] == 1
    fed.clock.now += 100
    fed.tick()  # still none after the extension: failed, with the reason recorded
    first = fed.status()["rounds"][0]
    assert first["state"] == "failed" and "0 of 1 required updates" in first["reason"]
    fed.tick()
    assert fed.rounds.pull_task(a).round == 2 and fed.globals.latest_version() == 0  # failed rounds produce no version
    upload(fed, a, [0, 1], 2, seed=1, examples=3, tmp_path=tmp_path)
    assert fed.tick() == []  # quorum (2) not met before the deadline
    fed.clock.now += 101
    assert fed.tick() == [2]  # min_updates met at the deadline: close with what arrived
    assert fed.status()["rounds"][1]["metrics"]["updates"] == 1


def test_uploads_exactly_once_per_client_and_round(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, min_clients=2)
    a, _ = fed.clients.register([0, 1], {})
    b, _ = fed.clients.register([2, 3], {})
    fed.tick()
    first = upload(fed, a, [0, 1], 1, seed=1, examples=3, tmp_path=tmp_path)
    again = upload(fed, a, [0, 1], 1, seed=1, examples=3, tmp_path=tmp_path)
    assert again.duplicate and (again.upload_id, again.sha256) == (first.upload_id, first.sha256)
    with pytest.raises(Refused) as conflict:
        upload(fed, a, [0, 1], 1, seed=2, examples=3, tmp_path=tmp_path)
    assert conflict.value.code == "upload_conflict"
    late, _ = fed.clients.register([4], {})
    with pytest.raises(Refused) as unsampled:
        upload(fed, late, [4], 1, seed=1, examples=3, tmp_path=tmp_path)
    assert unsampled.value.code == "not_sampled"
    with pytest.raises(Refused) as layers:
        upload(fed, b, [2], 1, seed=1, examples=3, tmp_path=tmp_path)
    assert layers.value.code == RefusalCode.BAD_KEPT_LAYERS
    assert fed.status()["rounds"][0]["uploads"] == 1


def test_abandoned_close_is_rerun_with_identical_result(db_url, new_db, tmp_path, tiny_model_dir):
    results = []
    for url, crash in ((db_url, False), (new_db("crashed"), True)):
        fed = make_fed(url, tmp_path / ("crashed" if crash else "clean"), tiny_model_dir, min_clients=2,
                       close_lease_s=5)
        a, _ = fed.clients.register([0, 1, 2], {})
        b, _ = fed.clients.register([2, 5, 7], {})
        fed.tick()
        upload(fed, a, [0, 1, 2], 1, seed=1, examples=4, tmp_path=tmp_path)
        upload(fed, b, [2, 5, 7], 1, seed=2, examples=9, tmp_path=tmp_path)
        if crash:  # a replica claimed the close and died: only the claim reached the DB
            with fed.store.write() as tx:
                assert fed.rounds.claim(tx, 1, fed.clock())
            assert fed.tick() == []  # lease still held
            other = Federation(fed.store, fed.config, clock=fed.clock, replica="replica-2")
            assert other.tick() == []
            fed.clock.now += 6
            assert other.tick() == [1] and other.tick() == []
        else:
            assert fed.tick() == [1]
        results.append(fed.status()["last_metrics"]["sha256"])
        assert fed.globals.latest_version() == 1
    assert results[0] == results[1]


def test_initialize_is_idempotent_and_checks_the_model(db_url, tmp_path, tiny_model_dir):
    from conftest import save_tiny_model

    fed = make_fed(db_url, tmp_path, tiny_model_dir)
    sha0 = fed.globals.version_row(0).sha256
    assert fed.initialize(tiny_model_dir) == 0 and fed.globals.version_row(0).sha256 == sha0
    other = save_tiny_model(tmp_path / "other", num_layers=4, seed=1)
    with pytest.raises(ConfigError, match="^--model"):
        fed.initialize(other)
    with pytest.raises(ConfigError, match="^lora_r"):
        Federation(fed.store, fast_config(lora_r=16)).initialize(tiny_model_dir)


def test_config_validation_names_the_field(tmp_path):
    from aggregator.config import load_config

    for field, value in (("rounds", 0), ("quorum_fraction", 1.5), ("weighting", "votes"), ("chunk_size", 8 << 20),
                         ("lora_targets", [])):
        with pytest.raises(ConfigError, match=f"^{field}"):
            fast_config(**{field: value})
    path = tmp_path / "agg.yaml"
    path.write_text("rounds: 5\nbogus: 1\n")
    with pytest.raises(ConfigError, match="^bogus"):
        load_config(path)
    path.write_text("rounds: 5\nlora_targets: q_proj,k_proj\n")
    config = load_config(path, {"rounds": 7, "seed": None})
    assert config.rounds == 7 and config.lora_targets == ("q_proj", "k_proj")
    with pytest.raises(ConfigError, match="^--config"):
        load_config(tmp_path / "missing.yaml")


def test_rounds_sample_only_clients_seen_within_the_liveness_window(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, min_clients=2, active_window_s=100)
    gone = [fed.clients.register([0, 1], {})[0] for _ in range(3)]  # register, then never come back
    fed.clock.now += 150
    assert fed.tick() == [] and fed.status()["rounds"] == []  # nobody live: no round
    live = [fed.clients.register([2, 3], {})[0] for _ in range(2)]
    fed.tick()
    [row] = fed.status()["rounds"]
    assert row["sampled"] == 2
    assert all(fed.rounds.pull_task(c).kind == TASK for c in live)
    assert all(fed.rounds.pull_task(c).reason == "not sampled for round 1" for c in gone)
