"""Per-group globals and federated evaluation through the real server: gRPC on 127.0.0.1, SQLite, tiny LLaMA.

fedavg-group serves each depth group its own global (checked against the FedAvg formula written out here), status
and Prometheus carry the groups and the example-weighted federated-evaluation means, `mixed` at 0 / 1 serves what
fedavg-group / heteagg serve, and a server SIGKILLed in the middle of a per-group close and restarted serves the
same per-group globals as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from aggregator_helpers import ENROLL, ServerProcess, fast_config, make_delta, start_inprocess, write_yaml_config
from test_faults import wait_for

from edge_client.transport import AggregatorClient, TransientError
from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta
from prufed.common.wire import canonical_safetensors

DEEP, SHALLOW = list(range(8)), [0, 3, 7]
# (kept layers, examples, seed of the delta, federated eval (loss, examples) sent with the upload)
CLIENTS = [(DEEP, 11, 1, (2.0, 4)), (SHALLOW, 23, 2, (3.0, 1)), (SHALLOW, 5, 3, (4.0, 3))]


def update_file(directory, global0, layers, seed, examples, round_id=1):
    path = directory / f"update-{round_id}-{seed}.safetensors"
    meta = AdapterMeta(DELTA_FORMAT, tuple(layers), "", round_id, examples)
    path.write_bytes(canonical_safetensors(make_delta(global0, layers, seed, scale=0.5), meta.to_strings()))
    return path


def global0_of(tmp_path, model_dir) -> dict:
    from aggregator.federation import Federation
    from aggregator.state import Store

    store = Store(f"sqlite:///{tmp_path / 'global0.db'}")
    fed = Federation(store, fast_config())
    fed.initialize(model_dir)
    state = fed.global_state(0)
    store.dispose()
    return state


# The poisoning defences (weight-share cap, adaptive clipping) would bend these hand-computed means: off here,
# tests/test_poisoning.py covers them.
EXACT = {"adaptive_clip": None, "max_client_share": 1.0}


def run_round(address, files):
    """Register the three clients, upload their round-1 files with their evals; returns the clients."""
    clients = []
    for layers, _n, _seed, _eval in CLIENTS:
        client = AggregatorClient(address)
        client.register(ENROLL, layers)
        clients.append(client)
    wait_for(lambda: clients[0].pull_task().kind == "task")
    for client, (layers, n, _seed, scored), path in zip(clients, CLIENTS, files):
        with contextlib.suppress(TransientError):  # a server killed by the close may not send the last reply
            client.upload_update(path, 1, n, layers, eval=scored)
    return clients


def slices(clients) -> list[bytes]:
    """Each client's DownloadGlobal bytes of the latest version, as canonical safetensors."""
    out = []
    for client in clients:
        tensors, meta, _version = client.download_global()
        out.append(canonical_safetensors(tensors, meta.to_strings()))
    return out


def test_fedavg_group_serves_each_group_its_global_and_federated_eval(tmp_path, tiny_model_dir, capsys):
    from prufed.cli import main

    global0 = global0_of(tmp_path, tiny_model_dir)
    files = [update_file(tmp_path, global0, layers, seed, n) for layers, n, seed, _ in CLIENTS]
    server, address, store = start_inprocess(tmp_path, tiny_model_dir, fast_config(rounds=1, mode="fedavg-group", **EXACT,
                                                                                   min_clients=3))
    try:
        clients = run_round(address, files)
        status = wait_for(lambda: (s := clients[0].status())["done"] and s)
        for client, (layers, _n, _seed, _eval) in zip(clients, CLIENTS):
            tensors, meta, version = client.download_global()
            assert version == 1 and list(meta.kept_layers) == layers
            members = [(make_delta(global0, kl, seed, 0.5), n) for kl, n, seed, _ in CLIENTS if kl == layers]
            total = sum(n for _, n in members)
            for key, value in tensors.items():  # FedAvg within the group: g0 + Σ n·Δ / Σ n, nothing from the other
                mean = sum(d[key].double() * n for d, n in members) / total
                torch.testing.assert_close(value, (global0[key].double() + mean).float(), rtol=0, atol=1e-6)
        assert status["mode"] == "fedavg-group"
        groups = {tuple(g["kept_layers"]): g for g in status["groups"]}
        assert set(groups) == {tuple(DEEP), tuple(SHALLOW)}
        assert (groups[tuple(SHALLOW)]["clients"], groups[tuple(SHALLOW)]["examples"]) == (2, 28)
        assert (groups[tuple(DEEP)]["depth"], groups[tuple(DEEP)]["clients"]) == (8, 1)
        # federated evaluation: example-weighted means per depth, on status (gRPC and DB) and Prometheus
        want = {"8": (2.0, 4, 1), "3": ((3.0 * 1 + 4.0 * 3) / 4, 4, 2)}
        for source in (status["rounds"][0]["eval"], store_status(store)["rounds"][0]["eval"],
                       status["last_metrics"]["eval"]):
            assert {d: (e["loss"], e["examples"], e["clients"]) for d, e in source.items()} == want  # exact in binary
        registry = server.metrics.registry
        assert registry.get_sample_value("prufed_federated_eval_loss", {"depth": "3"}) == pytest.approx(3.75)
        assert registry.get_sample_value("prufed_federated_eval_examples", {"depth": "8"}) == 4
        # `prufed aggregator status` straight from the database: JSON and the table
        db = ["aggregator", "status", "--db", f"sqlite:///{tmp_path / 'agg.db'}"]
        assert main([*db, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["groups"] == status["groups"] and printed["rounds"][0]["eval"] == status["rounds"][0]["eval"]
        assert main(db) == 0
        table = capsys.readouterr().out
        assert "fed-eval d3" in table and "3.7500 (4)" in table and "0,3,7" in table and "fedavg-group" in table
    finally:
        server.stop(grace=1)
        store.dispose()


def store_status(store):
    from aggregator.federation import read_status

    return read_status(store)


def test_bad_federated_eval_is_refused_naming_the_field(tmp_path, tiny_model_dir):
    from edge_client.transport import FatalError

    global0 = global0_of(tmp_path, tiny_model_dir)
    server, address, store = start_inprocess(tmp_path, tiny_model_dir, fast_config(rounds=1, min_clients=1))
    try:
        with AggregatorClient(address) as client:
            client.register(ENROLL, SHALLOW)
            wait_for(lambda: client.pull_task().kind == "task")
            path = update_file(tmp_path, global0, SHALLOW, 1, 5)
            for bad, field in (((float("nan"), 3), "eval.loss"), ((1.0, 0), "eval.examples")):
                with pytest.raises(FatalError, match=field) as info:
                    client.upload_update(path, 1, 5, SHALLOW, eval=bad)
                assert info.value.code.name == "INVALID_ARGUMENT"
            assert client.status()["rounds"][0]["uploads"] == 0  # a refused upload changes nothing
    finally:
        server.stop(grace=1)
        store.dispose()


def _serve(tmp_path, model_dir, files, name, **config):
    directory = tmp_path / name
    directory.mkdir()
    server, address, store = start_inprocess(directory, model_dir, fast_config(rounds=1, min_clients=3, **EXACT,
                                                                                  **config))
    try:
        clients = run_round(address, files)
        wait_for(lambda: clients[0].status()["done"])
        return slices(clients)
    finally:
        server.stop(grace=1)
        store.dispose()


def test_mixed_limits_through_the_server(tmp_path, tiny_model_dir):
    """mixed --mix 0 serves fedavg-group's slices and --mix 1 serves heteagg's, bit for bit."""
    global0 = global0_of(tmp_path, tiny_model_dir)
    files = [update_file(tmp_path, global0, layers, seed, n) for layers, n, seed, _ in CLIENTS]
    group = _serve(tmp_path, tiny_model_dir, files, "fedavg-group", mode="fedavg-group")
    assert _serve(tmp_path, tiny_model_dir, files, "mixed0", mode="mixed", mix=0.0) == group
    hete = _serve(tmp_path, tiny_model_dir, files, "heteagg", mode="heteagg")
    assert _serve(tmp_path, tiny_model_dir, files, "mixed1", mode="mixed", mix=1.0) == hete
    assert hete[1] != group[1]  # the limits differ, so the two checks above can fail


@pytest.mark.slow
def test_per_group_globals_survive_a_kill_mid_close_and_restart(tmp_path, tiny_model_dir):
    """A real `prufed aggregator serve` SIGKILLed in the middle of a per-group close (group blobs written, version
    not), then restarted on the same SQLite file, serves the per-group globals of an uninterrupted run; a second
    plain kill + restart changes nothing."""
    global0 = global0_of(tmp_path, tiny_model_dir)
    files = [update_file(tmp_path, global0, layers, seed, n) for layers, n, seed, _ in CLIENTS]
    expected = _serve(tmp_path, tiny_model_dir, files, "reference", mode="additive", mix="auto")
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    config = write_yaml_config(tmp_path / "agg.yaml", rounds=1, min_clients=3, close_lease_s=1.0, mode="additive",
                               mix="auto", **EXACT)
    procs = [ServerProcess(db, tiny_model_dir, config, fault="mid_close")]
    try:
        clients = run_round(procs[0].address, files)
        assert procs[0].wait_exit() == -9
        procs.append(ServerProcess(db, tiny_model_dir, config))
        clients = [AggregatorClient(procs[1].address, token=c.token) for c in clients]
        status = wait_for(lambda: (s := clients[0].status())["done"] and s)
        assert slices(clients) == expected
        assert len(status["groups"]) == 2 and status["rounds"][0]["eval"]["3"]["clients"] == 2
        procs[1].kill()
        procs.append(ServerProcess(db, tiny_model_dir, config))
        clients = [AggregatorClient(procs[2].address, token=c.token) for c in clients]
        assert slices(clients) == expected
        assert clients[0].status()["groups"] == status["groups"]
        assert procs[2].terminate() == 0
    finally:
        for proc in procs:
            proc.kill()


def test_mode_and_mix_are_checked(tmp_path, tiny_model_dir):
    from aggregator.federation import Federation
    from aggregator.state import Store
    from prufed.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--mix"):
        fast_config(mode="mixed", mix=1.5)
    with pytest.raises(ConfigError, match="--mix"):
        fast_config(mode="heteagg", mix=0.5)
    with pytest.raises(ConfigError, match="--mode"):
        fast_config(mode="fedavg-groups")
    assert fast_config(mode="additive").mix == "auto" and fast_config(mode="additive", mix="2").mix == 2.0
    store = Store(f"sqlite:///{tmp_path / 'agg.db'}")
    Federation(store, fast_config(mode="mixed")).initialize(tiny_model_dir)
    Federation(store, fast_config(mode="additive", mix=0.5)).initialize(tiny_model_dir)  # per-group -> per-group
    with pytest.raises(ConfigError, match="--mode"):
        Federation(store, fast_config(mode="heteagg")).initialize(tiny_model_dir)
    store.dispose()


def test_cli_modes_are_one_list(capsys, monkeypatch):
    """aggregate, aggregator serve and simulate take --mode/--mix from one definition (aggregator/core/modes.py)."""
    from aggregator.core.modes import MODES
    from prufed.cli import build_parser

    monkeypatch.setenv("COLUMNS", "250")  # keep the mode list on one help line
    parser = build_parser()
    for argv in (["aggregate", "--global", "g", "--update", "u", "--out", "o"], ["aggregator", "serve", "--db", "x"],
                 ["simulate"]):
        for mode in MODES:
            args = parser.parse_args([*argv, "--mode", mode, "--mix", "auto"])
            assert (args.mode, args.mix) == (mode, "auto")
        with pytest.raises(SystemExit):
            parser.parse_args([argv[0], *argv[1:2 if argv[0] == "aggregator" else 0], "--help"])
        assert "|".join(MODES) in capsys.readouterr().out
