"""Hypothesis fuzzing of the safetensors header parser and of the UploadUpdate stream on a real server: whatever
the input, the parser raises only `SafetensorsHeaderError`, and the server answers with a specific status (never
UNKNOWN or INTERNAL), keeps answering, and keeps its state."""

from __future__ import annotations

import json
import struct
import time

import grpc
import pytest
from aggregator_helpers import ENROLL, fast_config, start_inprocess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.transport import AggregatorClient
from prufed.common.wire import SafetensorsHeaderError, json_depth, safetensors_index
from prufed.v1 import aggregator_pb2 as pb

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=30)


def true_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    return 0


@given(json_values)
def test_json_depth_counts_nesting_without_parsing(value):
    assert json_depth(json.dumps(value).encode()) == true_depth(value)


def parse(tmp_path, raw: bytes):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        return safetensors_index(path, 1 << 16)
    except SafetensorsHeaderError:
        return None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_header_parser_random_bytes(tmp_path, raw):
    parse(tmp_path, raw)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values, st.integers(0, 2**64 - 1) | st.none(), st.integers(0, 3000))
def test_header_parser_structured(tmp_path, value, declared, nest):
    text = ("[" * nest + json.dumps(value) + "]" * nest).encode()
    length = len(text) if declared is None else declared
    parse(tmp_path, struct.pack("<Q", length) + text)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("fuzz")
    server, address, store = start_inprocess(tmp, tiny_model_dir, fast_config(max_upload_mib=1.0, stream_idle_s=2.0))
    a, b = AggregatorClient(address), AggregatorClient(address)
    a.register(ENROLL, [0, 1])
    b.register(ENROLL, [2, 3])
    deadline = time.monotonic() + 20
    while a.pull_task().kind != "task":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield server, store, a
    a.close()
    b.close()
    server.stop(grace=1)
    store.dispose()


big = st.integers(0, 2**64 - 1)
small = st.integers(0, 8)
tensor_infos = st.builds(pb.TensorInfo, name=st.text(max_size=20), shape=st.lists(big | small, max_size=10),
                         dtype=st.sampled_from(["F32", "F16", "X", ""]))
headers = st.builds(pb.UploadHeader, round=st.integers(0, 2**32 - 1) | small, total_bytes=big | st.integers(0, 4096),
                    num_examples=big | small, kept_layers=st.lists(st.integers(0, 2**32 - 1) | small, max_size=4),
                    tensors=st.lists(tensor_infos, max_size=3))
chunks = st.one_of(
    st.builds(lambda h: pb.UploadChunk(header=h), headers),
    st.builds(lambda d: pb.UploadChunk(data=d), st.binary(max_size=64)
              | st.builds(lambda n, rest: struct.pack("<Q", n) + rest, big | st.integers(0, 300), st.binary(max_size=40))),
    st.builds(lambda s: pb.UploadChunk(trailer=pb.UploadTrailer(sha256=s)), st.text(max_size=70)),
    st.just(pb.UploadChunk()),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(chunks, max_size=6))
def test_upload_stream_fuzz(served, messages):
    server, store, client = served
    before = server.federation.status()
    try:
        client.stub.UploadUpdate(iter(messages), metadata=client._metadata(), timeout=20)
    except grpc.RpcError as err:
        assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), err.details()
        assert err.details()
    else:
        pytest.fail("a fuzzed stream was accepted")
    assert client.health() == "SERVING"
    assert server.federation.status() == before
    assert list(store.blobs.tmp_dir.iterdir()) == []
