"""The adversarial corpus (issue 14): each attack against a real server on 127.0.0.1 is refused with a specific
status whose message names the field, the server keeps answering, and the federation state (rounds, uploads,
clients, global versions, blob files, partial files) is untouched. Details never carry server paths."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time

import grpc
import pytest
from aggregator_helpers import ENROLL, fast_config, header_for, make_delta, open_round_one, raw_upload, start_inprocess

from edge_client.transport import AggregatorClient
from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta, save_adapter
from prufed.v1 import aggregator_pb2 as pb

A_LAYERS, B_LAYERS = [0, 1, 2, 3], [0, 4, 7]
CONFIG = dict(rounds=2, min_clients=2, max_upload_mib=1.0, stream_idle_s=2.0, upload_deadline_s=5.0,
              max_uploads_per_client=2, max_concurrent_uploads=3, control_workers=4, register_burst=16)


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("adversarial")
    # c registers after round 1 opened: not sampled for it
    server, address, store, a, b, c = open_round_one(tmp, tiny_model_dir, fast_config(**CONFIG), A_LAYERS, B_LAYERS)
    global0 = server.federation.global_state(0)
    path = save_adapter(tmp / "valid-b.safetensors", make_delta(global0, B_LAYERS, seed=2),
                        AdapterMeta(DELTA_FORMAT, tuple(B_LAYERS), "", 1, 7))
    yield {"server": server, "store": store, "a": a, "b": b, "c": c, "address": address, "valid": path}
    for client in (a, b, c):
        client.close()
    server.stop(grace=1)
    store.dispose()


def snapshot(fed) -> tuple:
    server, store = fed["server"], fed["store"]
    status = server.federation.status()
    with store.read() as tx:
        clients = tx.count_clients()
    files = sorted(str(p.relative_to(store.blobs.root)) for p in store.blobs.root.rglob("*") if p.is_file())
    return (status["global_version"], [(r["round"], r["state"], r["uploads"]) for r in status["rounds"]], clients,
            files)


def assert_alive(fed) -> None:
    """The server still answers control calls (their latency under attack is measured in bench_adversarial.py)."""
    assert fed["a"].health() == "SERVING"
    assert fed["a"].pull_task().kind in ("task", "wait")


def refused(fed, call, code: grpc.StatusCode, pattern: str) -> None:
    """Run `call`, expecting refusal `code` with details matching `pattern`, and no change to the state."""
    import re

    before = snapshot(fed)
    with pytest.raises(grpc.RpcError) as err:
        call()
    details = err.value.details() or ""
    assert err.value.code() == code, (err.value.code(), details)
    assert re.search(pattern, details), details
    assert str(fed["store"].blobs.root) not in details and "/tmp" not in details
    assert_alive(fed)
    assert snapshot(fed) == before


def upload_with(fed, data: bytes | None = None, trailer: str | None = "auto", **header_overrides):
    path = fed["valid"]
    data = path.read_bytes() if data is None else data
    header = header_for(path, 1, 7, B_LAYERS, total_bytes=len(data))
    for field, value in header_overrides.items():
        setattr(header, field, value)
    sha = hashlib.sha256(data).hexdigest() if trailer == "auto" else trailer
    return lambda: raw_upload(fed["b"], header, data, sha)


def header_bomb(json_text: bytes, total: int) -> bytes:
    raw = struct.pack("<Q", len(json_text)) + json_text
    return raw + b"\x00" * (total - len(raw))


INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
UPLOAD_CASES = {
    # F1/F2: out-of-range fields are refused before any database or blob work
    "num_examples_2^63": (dict(num_examples=2**63), INVALID, r"num_examples must be in \[1, 1000000\]"),
    "num_examples_max_uint64": (dict(num_examples=2**64 - 1), INVALID, r"max_num_examples"),
    "round_beyond_int32": (dict(round=2**32 - 1), INVALID, r"round must be <= 2147483647"),
    "unknown_dtype_tag": ("dtype", INVALID, r"dtype 'X99'"),
    "too_many_dims": ("dims", INVALID, r"has 9 dims \(max 8\)"),
    # F4: a header far above what the declared tensor index needs is refused before it is stored or parsed
    "header_90MiB": ("huge_header", INVALID, r"header declares 94371840 bytes, more than the \d+ its tensor index"),
    "header_nested_5000": ("deep_header", INVALID, r"nested 5000 levels deep"),
    "header_longer_than_upload": ("long_header", INVALID, r"more than the upload's total_bytes"),
}


@pytest.mark.parametrize("case", UPLOAD_CASES)
def test_upload_corpus(fed, case):
    spec, code, pattern = UPLOAD_CASES[case]
    size = fed["valid"].stat().st_size
    if spec == "dtype" or spec == "dims":
        path = fed["valid"]
        header = header_for(path, 1, 7, B_LAYERS)
        if spec == "dtype":
            header.tensors[0].dtype = "X99"
        else:
            header.tensors[0].shape.extend([1] * 7)
        data = path.read_bytes()
        call = lambda: raw_upload(fed["b"], header, data, hashlib.sha256(data).hexdigest())  # noqa: E731
    elif spec == "huge_header":
        prefix = struct.pack("<Q", 90 * 1024 * 1024) + b"[[],[],[]]"
        call = upload_with(fed, prefix + b"\x00" * (size - len(prefix)))
    elif spec == "deep_header":
        call = upload_with(fed, header_bomb(b"[" * 5000 + b"]" * 5000, size))
    elif spec == "long_header":
        call = upload_with(fed, struct.pack("<Q", size) + b"{}")
    else:
        call = upload_with(fed, **spec)
    refused(fed, call, code, pattern)


def idle_stream(client: AggregatorClient, release: threading.Event, header: pb.UploadHeader | None = None):
    """An UploadUpdate that sends at most a header, then nothing until `release` (or its 30 s timeout)."""

    def stream():
        if header is not None:
            yield pb.UploadChunk(header=header)
        release.wait(30)

    return client.stub.UploadUpdate.future(stream(), metadata=client._metadata(), timeout=30)


def test_idle_and_slow_streams_are_cut_off(fed):
    header = header_for(fed["valid"], 1, 7, B_LAYERS)
    release = threading.Event()
    before = snapshot(fed)
    try:
        idle = idle_stream(fed["b"], release, header)
        with pytest.raises(grpc.RpcError):
            idle.result(timeout=10)
        assert idle.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_s (2 s)" in idle.details()

        data = fed["valid"].read_bytes()

        def slow():  # one byte every 0.5 s: never idle, but over the 5 s overall deadline
            yield pb.UploadChunk(header=header)
            for i in range(len(data)):
                yield pb.UploadChunk(data=data[i:i + 1])
                time.sleep(0.5)

        with pytest.raises(grpc.RpcError) as err:  # the server cuts it, long before the client's own 30 s timeout
            fed["b"].stub.UploadUpdate(slow(), metadata=fed["b"]._metadata(), timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "upload_deadline_s (5 s)" in err.value.details()
    finally:
        release.set()
    assert_alive(fed)
    assert snapshot(fed) == before  # partial files removed


def test_stream_caps_keep_control_rpcs_answering(fed):
    release = threading.Event()
    before = snapshot(fed)
    try:
        held = [idle_stream(fed["b"], release) for _ in range(2)]
        time.sleep(0.3)  # let both take their slots
        refused(fed, upload_with(fed), EXHAUSTED, r"already has 2 upload streams open \(max_uploads_per_client 2\)")
        held.append(idle_stream(fed["c"], release))
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as busy:
            raw_upload(fed["a"], header_for(fed["valid"], 1, 5, A_LAYERS), b"", None)
        assert busy.value.code() == grpc.StatusCode.UNAVAILABLE and "max_concurrent_uploads" in busy.value.details()
        for _ in range(5):  # uploads saturated: control calls still have threads
            assert_alive(fed)
            fed["c"].download_global()
    finally:
        release.set()
    for future in held:
        with pytest.raises(grpc.RpcError):
            future.result(timeout=10)
    assert snapshot(fed) == before


def register_call(fed, profile_json: str = "{}", name: str = ""):
    request = pb.RegisterRequest(hardware=pb.HardwareSummary(profile_json=profile_json), kept_layers=[0, 1], name=name)
    return lambda: fed["a"].stub.Register(request, metadata=[("authorization", f"Bearer {ENROLL}")], timeout=10)


REGISTER_CASES = {
    "profile_not_json": ('{"a": ', "", r"hardware.profile_json is not valid JSON"),
    "profile_is_a_list": ("[1, 2]", "", r"hardware.profile_json must be a JSON object, got a list"),
    "profile_nested_5000": ("[" * 5000 + "]" * 5000, "", r"hardware.profile_json .*nested 5000 levels deep"),
    "profile_nested_100k": ("[" * 100_000 + "]" * 100_000, "", r"profile_json has 200000 bytes, more than max_profile"),
    "profile_1MB": (json.dumps({"pad": "x" * (1 << 20)}), "", r"profile_json has \d+ bytes, more than max_profile_bytes"),
    "name_too_long": ("{}", "n" * 201, r"name has 201 characters, more than max_name_chars \(200\)"),
}


@pytest.mark.parametrize("case", REGISTER_CASES)
def test_register_corpus(fed, case):
    profile, name, pattern = REGISTER_CASES[case]
    refused(fed, register_call(fed, profile, name), INVALID, pattern)


def test_download_version_out_of_range(fed):
    def call():
        stream = fed["b"].stub.DownloadGlobal(pb.DownloadRequest(version=2**32 - 1), metadata=fed["b"]._metadata(),
                                              timeout=10)
        return list(stream)

    refused(fed, call, INVALID, r"version must be <= 2147483647")


def test_registration_rate_limit_and_client_cap(tmp_path, tiny_model_dir):
    server, address, store = start_inprocess(tmp_path, tiny_model_dir,
                                             fast_config(register_burst=3, register_per_min=0.001, max_clients=2))
    try:
        with AggregatorClient(address) as client:
            client.register(ENROLL, [0])
            client.register(ENROLL, [1])
            with pytest.raises(grpc.RpcError) as full:
                register_call({"a": client}, "{}")()
            assert full.value.code() == EXHAUSTED and "max_clients (2)" in full.value.details()
            with pytest.raises(grpc.RpcError) as limited:
                register_call({"a": client}, "{}")()
            assert limited.value.code() == EXHAUSTED and "too many Register calls" in limited.value.details()
            assert client.health() == "SERVING"
        with store.read() as tx:
            assert tx.count_clients() == 2
    finally:
        server.stop(grace=1)
        store.dispose()


def test_concurrent_different_uploads_leave_no_orphan_after_a_sweep(tmp_path, tiny_model_dir):
    """F2: ten different uploads at once from one client: one is recorded, the rest are refused (stream cap or
    conflict), and after a sweep every blob file on disk is referenced by a row."""
    from concurrent.futures import ThreadPoolExecutor

    server, address, store = start_inprocess(tmp_path, tiny_model_dir, fast_config(blob_sweep_grace_s=0.001))
    try:
        with AggregatorClient(address) as a, AggregatorClient(address) as b:
            a.register(ENROLL, A_LAYERS)
            b.register(ENROLL, B_LAYERS)
            deadline = time.monotonic() + 20
            while b.pull_task().kind != "task":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            global0 = server.federation.global_state(0)

            def send(seed: int):
                try:
                    return b.upload_update(make_delta(global0, B_LAYERS, seed=seed), 1, 7, B_LAYERS).upload_id
                except Exception as exc:  # FatalError / TransientError carry the status
                    return exc.code

            with ThreadPoolExecutor(10) as pool:
                outcomes = list(pool.map(send, range(10)))
        accepted = [o for o in outcomes if isinstance(o, str)]
        assert len(accepted) == 1, outcomes
        assert set(outcomes) - set(accepted) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
        time.sleep(0.01)
        server.federation.sweep_blobs()
        with store.read() as tx:
            referenced = tx.referenced_blobs()
        on_disk = {p.name for p in store.blobs.root.glob("??/*")}
        assert on_disk == referenced and list(store.blobs.tmp_dir.iterdir()) == []
    finally:
        server.stop(grace=1)
        store.dispose()
