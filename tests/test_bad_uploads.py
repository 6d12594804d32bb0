"""A corpus of bad uploads against a real server: each refused with one specific status and a message naming the
fault, while the global adapter and other clients' accepted uploads stay untouched."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest
import torch
from aggregator_helpers import header_for, make_delta, open_round_one, raw_upload

from edge_client.transport import AggregatorClient, FatalError
from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, save_adapter
from prufed.v1 import aggregator_pb2 as pb

# The tests share one server and run in file order (the last checks what all the others left behind), so under
# pytest-xdist they must stay on one worker: the Makefile runs with --dist loadfile.
A_LAYERS, B_LAYERS = [0, 1, 2, 3], [0, 4, 7]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    from aggregator_helpers import fast_config

    tmp = tmp_path_factory.mktemp("bad-uploads")
    server, address, store, a, b, late = open_round_one(tmp, tiny_model_dir, fast_config(max_upload_mib=1.0),
                                                        A_LAYERS, B_LAYERS)
    global0 = server.federation.global_state(0)
    accepted = a.upload_update(make_delta(global0, A_LAYERS, seed=1), 1, 5, A_LAYERS)
    yield {"server": server, "store": store, "a": a, "b": b, "late": late, "global0": global0, "tmp": tmp,
           "receipt_a": accepted}
    for client in (a, b, late):
        client.close()
    server.stop(grace=1)
    store.dispose()


def write_update(tmp: Path, name: str, tensors, kept=B_LAYERS, round_id=1, num_examples=7, fmt=DELTA_FORMAT) -> Path:
    return save_adapter(tmp / f"{name}.safetensors", tensors, AdapterMeta(fmt, tuple(kept), "", round_id, num_examples))


def tamper(global0, kind: str) -> dict:
    delta = make_delta(global0, B_LAYERS, seed=2)
    key = sorted(delta)[0]
    if kind == "extra_key":
        delta.update(make_delta(global0, [5], seed=3))
    elif kind == "missing_key":
        del delta[key]
    elif kind == "shape":
        delta[key] = torch.zeros(delta[key].shape[0] + 1, delta[key].shape[1])
    elif kind == "dtype":
        delta[key] = delta[key].to(torch.float16)
    elif kind == "nan":
        delta[key][0, 0] = float("nan")
    elif kind == "inf":
        delta[key][0, 0] = float("inf")
    return delta


CONTENT_CASES = [
    ("extra_key", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)key|layer"),
    ("missing_key", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)key|missing"),
    ("shape", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)shape"),
    ("dtype", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)dtype|float16|F16"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)nan|finite"),
    ("inf", grpc.StatusCode.INVALID_ARGUMENT, r"(?i)inf|finite"),
]


def assert_refused(exc_info, code: grpc.StatusCode, pattern: str) -> None:
    import re

    err = exc_info.value
    actual = err.code() if isinstance(err, grpc.RpcError) else err.code
    details = err.details() if isinstance(err, grpc.RpcError) else err.details
    assert actual == code, (actual, details)
    assert re.search(pattern, details), details


@pytest.mark.parametrize("kind,code,pattern", CONTENT_CASES, ids=[c[0] for c in CONTENT_CASES])
def test_bad_content(federation, kind, code, pattern):
    with pytest.raises(FatalError) as err:
        federation["b"].upload_update(tamper(federation["global0"], kind), 1, 7, B_LAYERS)
    assert_refused(err, code, pattern)


def valid_b_file(federation) -> Path:
    return write_update(federation["tmp"], "valid-b", make_delta(federation["global0"], B_LAYERS, seed=2))


STREAM_CASES = ["truncated", "no_trailer", "bad_checksum", "oversized", "overflow", "index_mismatch", "garbage",
                "wrong_layers", "meta_mismatch", "global_format", "zero_examples", "stale_round", "future_round",
                "no_header"]


@pytest.mark.parametrize("case", STREAM_CASES)
def test_bad_stream(federation, case):
    client, path = federation["b"], valid_b_file(federation)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    header = header_for(path, 1, 7, B_LAYERS)
    expect = {
        "truncated": (grpc.StatusCode.INVALID_ARGUMENT, r"truncated stream: received \d+ of"),
        "no_trailer": (grpc.StatusCode.INVALID_ARGUMENT, r"no trailer"),
        "bad_checksum": (grpc.StatusCode.DATA_LOSS, r"sha256 mismatch"),
        "oversized": (grpc.StatusCode.RESOURCE_EXHAUSTED, r"total_bytes \d+ exceeds the limit"),
        "overflow": (grpc.StatusCode.INVALID_ARGUMENT, r"exceeds the declared total_bytes"),
        "index_mismatch": (grpc.StatusCode.INVALID_ARGUMENT, r"declared tensor index does not match"),
        "garbage": (grpc.StatusCode.INVALID_ARGUMENT, r"not a readable adapter file"),
        "wrong_layers": (grpc.StatusCode.INVALID_ARGUMENT, r"kept_layers .* differ from the registered"),
        "meta_mismatch": (grpc.StatusCode.INVALID_ARGUMENT, r"file metadata .* differs from the upload header"),
        "global_format": (grpc.StatusCode.INVALID_ARGUMENT, r"format is 'prufed-adapter/1'"),
        "zero_examples": (grpc.StatusCode.INVALID_ARGUMENT, r"num_examples"),
        "stale_round": (grpc.StatusCode.FAILED_PRECONDITION, r"round 0 does not exist"),
        "future_round": (grpc.StatusCode.FAILED_PRECONDITION, r"round 9 does not exist \(current round is 1\)"),
        "no_header": (grpc.StatusCode.INVALID_ARGUMENT, r"first UploadChunk must carry the UploadHeader"),
    }[case]
    if case == "truncated":
        data_sent, trailer = data[: len(data) // 2], hashlib.sha256(data[: len(data) // 2]).hexdigest()
    elif case == "no_trailer":
        data_sent, trailer = data, None
    elif case == "bad_checksum":
        data_sent, trailer = data, "0" * 64
    else:
        data_sent, trailer = data, sha
    if case == "oversized":
        header.total_bytes = 10 * 1024 * 1024
    elif case == "overflow":
        data_sent = data + b"x" * 10
    elif case == "index_mismatch":
        header.tensors[0].shape[0] += 1
    elif case == "garbage":
        data_sent = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * (len(data) - 24)
        trailer = hashlib.sha256(data_sent).hexdigest()
    elif case == "wrong_layers":
        header.ClearField("kept_layers")
        header.kept_layers.extend(A_LAYERS)
    elif case in ("meta_mismatch", "global_format"):
        other = write_update(federation["tmp"], case, make_delta(federation["global0"], B_LAYERS, seed=2),
                             num_examples=8 if case == "meta_mismatch" else 7,
                             fmt=GLOBAL_FORMAT if case == "global_format" else DELTA_FORMAT)
        data_sent = other.read_bytes()
        trailer = hashlib.sha256(data_sent).hexdigest()
        header = header_for(other, 1, 7, B_LAYERS)
    elif case == "zero_examples":
        header.num_examples = 0
    elif case == "stale_round":
        header.round = 0
    elif case == "future_round":
        header.round = 9
    with pytest.raises(grpc.RpcError) as err:
        if case == "no_header":
            client.stub.UploadUpdate(iter([pb.UploadChunk(data=data)]), metadata=client._metadata(), timeout=30)
        else:
            raw_upload(client, header, data_sent, trailer)
    assert_refused(err, *expect)


def test_replay_unsampled_and_tokens(federation):
    a, late = federation["a"], federation["late"]
    first = federation["receipt_a"]
    again = a.upload_update(make_delta(federation["global0"], A_LAYERS, seed=1), 1, 5, A_LAYERS)
    assert again.duplicate and again.upload_id == first.upload_id and again.sha256 == first.sha256
    with pytest.raises(FatalError) as replay:
        a.upload_update(make_delta(federation["global0"], A_LAYERS, seed=99), 1, 5, A_LAYERS)
    assert_refused(replay, grpc.StatusCode.ALREADY_EXISTS, r"already uploaded different bytes for round 1")
    with pytest.raises(FatalError) as unsampled:
        late.upload_update(make_delta(federation["global0"], B_LAYERS, seed=4), 1, 7, B_LAYERS)
    assert_refused(unsampled, grpc.StatusCode.PERMISSION_DENIED, r"was not sampled for round 1")
    path = valid_b_file(federation)
    for token, pattern in ((None, "missing"), (federation["b"].token + "x", "not valid"), ("abc.def", "not valid")):
        with AggregatorClient(a.address, token=token) as anon:
            with pytest.raises(FatalError) as err:
                anon.upload_update(path, 1, 7, B_LAYERS)
            assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, pattern)


def test_oversized_chunk_is_refused_by_the_transport(federation):
    path = valid_b_file(federation)
    header = header_for(path, 1, 7, B_LAYERS, total_bytes=900_000)
    with pytest.raises(grpc.RpcError) as err:
        raw_upload(federation["b"], header, b"\x00" * (5 * 1024 * 1024), None, chunk=5 * 1024 * 1024)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_z_state_untouched_then_round_closes(federation):
    """Runs last (module order): after the whole corpus, only client A's upload exists, v0 is intact, no partial
    files remain; B's valid upload then closes the round with exactly A + B counted."""
    server, store, fed = federation["server"], federation["store"], federation["server"].federation
    status = fed.status()
    assert status["global_version"] == 0 and status["rounds"][0] == {**status["rounds"][0], "state": "open",
                                                                      "uploads": 1}
    assert all(torch.equal(fed.global_state(0)[k], v) for k, v in federation["global0"].items())
    assert list(store.blobs.tmp_dir.iterdir()) == []
    rejected = {s.labels["code"] for s in server.metrics.uploads.collect()[0].samples
                if s.labels.get("outcome") == "rejected" and s.value > 0}
    assert {"checksum", "truncated", "too_large", "stale_round", "upload_conflict", "not_sampled"} <= rejected
    federation["b"].upload_update(valid_b_file(federation), 1, 7, B_LAYERS)
    deadline = time.monotonic() + 20
    while fed.status()["global_version"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert fed.status()["last_metrics"]["examples"] == 5 + 7
