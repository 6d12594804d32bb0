"""The aggregator server in-process on 127.0.0.1:0 (real gRPC, real SQLite), and the CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
import torch
from aggregator_helpers import (
    ENROLL,
    REPO,
    ServerProcess,
    fast_config,
    make_delta,
    self_signed_cert,
    start_inprocess,
    write_yaml_config,
)

from edge_client.transport import AggregatorClient, FatalError, TransientError
from prufed.common.adapter_keys import keys_for_layers, layers_of_keys
from prufed.common.errors import ConfigError


def wait_for(predicate, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def pull_until_task(client, timeout=20.0):
    return wait_for(lambda: (t := client.pull_task()).kind == "task" and t)


@pytest.fixture
def served(tmp_path, tiny_model_dir):
    server, address, store = start_inprocess(tmp_path, tiny_model_dir)
    yield server, address, store
    server.stop(grace=1)
    store.dispose()


def test_full_round_two_depths(served):
    server, address, _store = served
    deep_layers, shallow_layers = list(range(8)), [0, 3, 7]
    with AggregatorClient(address) as deep, AggregatorClient(address) as shallow:
        reg = deep.register(ENROLL, deep_layers, {"name": "laptop", "total_memory_bytes": 16 << 30})
        shallow.register(ENROLL, shallow_layers, {"name": "jetson"})
        assert reg.federation["num_layers"] == 8 and reg.federation["lora"]["r"] == 4
        assert reg.token.startswith(reg.client_id + ".")
        assert deep.health() == "SERVING"

        task = pull_until_task(deep)
        assert task.round == 1 and task.global_version == 0 and task.training["max_steps"] > 0
        global_state = server.federation.global_state(0)
        tensors, meta, version = shallow.download_global()
        assert version == 0 and layers_of_keys(tensors) == shallow_layers
        assert sorted(tensors) == keys_for_layers(global_state, shallow_layers)
        assert all(torch.equal(tensors[k], global_state[k]) for k in tensors)
        assert tuple(meta.kept_layers) == tuple(shallow_layers)

        receipts = [c.upload_update(make_delta(global_state, layers, seed), 1, n, layers)
                    for c, layers, seed, n in ((deep, deep_layers, 1, 10), (shallow, shallow_layers, 2, 30))]
        assert all(r.accepted and not r.duplicate and r.round == 1 for r in receipts)

        status = wait_for(lambda: (s := deep.status())["global_version"] == 1 and s)
        assert status["clients_per_depth"] == {3: 1, 8: 1}
        assert status["rounds"][0]["state"] == "closed" and status["rounds"][0]["uploads"] == 2
        assert status["last_metrics"]["examples"] == 40
        # the closing replica's host:pid stays on the server side
        assert "closed_by" not in status["last_metrics"] and server.federation.status()["last_metrics"]["closed_by"]
        new_global = server.federation.global_state(1)
        # layers held only by the deep client moved; nobody held a key outside the global's
        changed = {k for k in new_global if not torch.equal(new_global[k], global_state[k])}
        assert changed and layers_of_keys(changed) == deep_layers
        assert pull_until_task(deep).round == 2 and deep.pull_task().global_version == 1


def test_auth_missing_forged_and_bad_enrolment(served):
    _server, address, _store = served
    with AggregatorClient(address) as client:
        with pytest.raises(FatalError) as missing:
            client.pull_task()
        assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED and "missing" in missing.value.details
        with pytest.raises(FatalError) as bad_enrol:
            client.register("not-the-enrolment-token", [0, 1])
        assert bad_enrol.value.code == grpc.StatusCode.UNAUTHENTICATED and "enrolment" in bad_enrol.value.details
        reg = client.register(ENROLL, [0, 1])
        client.token = reg.client_id + ".forged-secret"
        for call in (client.pull_task, client.download_global, client.status):
            with pytest.raises(FatalError) as forged:
                call()
            assert forged.value.code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in forged.value.details
        client.token = ENROLL  # operators may read Status with the enrolment token
        assert client.status()["rounds_total"] == 2


def test_register_refuses_bad_layers(served):
    _server, address, _store = served
    with AggregatorClient(address) as client:
        for layers in ([], [3, 1], [0, 8]):
            with pytest.raises(FatalError) as err:
                client.register(ENROLL, layers)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "kept_layers" in err.value.details


def test_unreachable_server_is_transient():
    with AggregatorClient("127.0.0.1:1", timeout_s=2) as client:
        with pytest.raises(TransientError) as err:
            client.register(ENROLL, [0])
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_plaintext_non_loopback_refused(tmp_path, tiny_model_dir):
    from aggregator.server import create_server
    from aggregator.state import Store

    store = Store(f"sqlite:///{tmp_path / 'agg.db'}")
    with pytest.raises(ConfigError, match="--listen.*without TLS"):
        create_server("0.0.0.0:0", store, fast_config(), enroll_tokens=[ENROLL])
    with pytest.raises(ConfigError, match="--enroll-token"):
        create_server("127.0.0.1:0", store, fast_config())


def test_tls_and_mtls(tmp_path, tiny_model_dir):
    from aggregator.server import TLSConfig

    cert, key = self_signed_cert(tmp_path, "server")
    client_cert, client_key = self_signed_cert(tmp_path, "client", cn="edge-1")
    server, address, store = start_inprocess(tmp_path, tiny_model_dir, tls=TLSConfig(cert, key, client_cert))
    port = address.rsplit(":", 1)[1]
    try:
        with AggregatorClient(f"localhost:{port}", tls_ca=cert, client_cert=(client_cert, client_key)) as ok:
            assert ok.register(ENROLL, [0, 1]).client_id
        with AggregatorClient(f"localhost:{port}", tls_ca=cert, timeout_s=5) as no_client_cert, \
                pytest.raises(TransientError):
            no_client_cert.register(ENROLL, [0, 1])
        with AggregatorClient(f"localhost:{port}", timeout_s=5) as plaintext, pytest.raises(TransientError):
            plaintext.register(ENROLL, [0, 1])
    finally:
        server.stop(grace=1)
        store.dispose()


def test_mtls_binds_the_client_certificate_to_the_client_id(tmp_path, tiny_model_dir):
    from aggregator.server import TLSConfig

    cert, key = self_signed_cert(tmp_path, "server")
    first, other = self_signed_cert(tmp_path, "edge-1", cn="edge-1"), self_signed_cert(tmp_path, "edge-2", cn="edge-2")
    bundle = tmp_path / "client-ca.pem"
    bundle.write_bytes(first[0].read_bytes() + other[0].read_bytes())  # the server trusts both client certs
    server, address, store = start_inprocess(tmp_path, tiny_model_dir, tls=TLSConfig(cert, key, bundle))
    target = f"localhost:{address.rsplit(':', 1)[1]}"
    try:
        with AggregatorClient(target, tls_ca=cert, client_cert=first) as owner:
            reg = owner.register(ENROLL, [0, 1])
            assert owner.pull_task().kind == "wait"
        with AggregatorClient(target, tls_ca=cert, client_cert=other, token=reg.token) as thief:
            for call in (thief.pull_task, thief.download_global):
                with pytest.raises(FatalError) as stolen:
                    call()
                assert stolen.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert f"is not the one client {reg.client_id} registered with" in stolen.value.details
    finally:
        server.stop(grace=1)
        store.dispose()


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                           ("::", False), ("127.evil.invalid", False), ("127.0.0.1.invalid", False)])
def test_loopback_check_parses_and_resolves(host, loopback):
    from prufed.common.net import is_loopback_host

    assert is_loopback_host(host) is loopback


def test_cli_serve_port0_sigterm_and_status(tmp_path, tiny_model_dir):
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    proc = ServerProcess(db, tiny_model_dir, write_yaml_config(tmp_path / "agg.yaml"))
    try:
        host, port = proc.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with AggregatorClient(proc.address) as client:
            client.register(ENROLL, [0, 2, 4])
        assert proc.terminate() == 0
        logs = [json.loads(line) for line in proc.log if line.startswith("{")]
        assert any(entry["msg"] == "registered client" and entry["depth"] == 3 for entry in logs)
    finally:
        proc.kill()
    out = subprocess.run([sys.executable, "-m", "prufed", "aggregator", "status", "--db", db, "--json"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert status["clients_per_depth"] == {"3": 1} and status["global_version"] == 0
    missing = subprocess.run([sys.executable, "-m", "prufed", "aggregator", "status", "--db",
                              f"sqlite:///{tmp_path / 'nope.db'}"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and "--db" in missing.stderr


def test_cli_serve_flag_errors(tmp_path, tiny_model_dir, capsys):
    from prufed.cli import main

    base = ["aggregator", "serve", "--db", f"sqlite:///{tmp_path / 'a.db'}", "--model", str(tiny_model_dir)]
    cases = [(["--listen", "0.0.0.0:0", "--insecure"], "--enroll-token"),  # off loopback a token is mandatory
             (["--enroll-token", ENROLL, "--tls-cert", "x.crt"], "--tls-cert"),
             (["--enroll-token", "short"], "--enroll-token"), (["--tokens-file", str(tmp_path / "no")], "--tokens-file"),
             (["--enroll-token", ENROLL, "--rounds", "0"], "rounds"),
             (["--enroll-token", ENROLL, "--listen", "0.0.0.0:0"], "--listen"),
             (["--enroll-token", ENROLL, "--listen", "nohost"], "--listen"),
             (["--enroll-token", ENROLL, "--max-num-examples", str(2**31)], "max_num_examples"),
             (["--enroll-token", ENROLL, "--stream-idle-s", "0"], "stream_idle_s")]
    for extra, flag in cases:
        assert main(base + extra) == 2
        assert f"error: {flag}" in capsys.readouterr().err, extra
