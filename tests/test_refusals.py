"""One enum of refusal codes, one status table, one error path that every RPC (DownloadGlobal included) takes."""

from __future__ import annotations

import grpc
import pytest
from aggregator_helpers import ENROLL, start_inprocess

from edge_client.transport import AggregatorClient
from prufed.common.refusals import REFUSAL_METADATA_KEY, STATUS_NAME, RefusalCode
from prufed.v1 import aggregator_pb2 as pb


def test_every_code_maps_to_one_specific_status():
    assert set(STATUS_NAME) == set(RefusalCode)
    for code, name in STATUS_NAME.items():
        assert grpc.StatusCode[name] not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), code
    assert len({c.value for c in RefusalCode}) == len(RefusalCode)


def refusals(server) -> dict[tuple[str, str], float]:
    return {(s.labels["method"], s.labels["code"]): s.value
            for s in server.metrics.refusals.collect()[0].samples if s.name.endswith("_total")}


def test_download_and_auth_refusals_take_the_error_path(tmp_path, tiny_model_dir):
    server, address, store = start_inprocess(tmp_path, tiny_model_dir)
    try:
        with AggregatorClient(address) as client:
            client.register(ENROLL, [0, 1])
            stream = client.stub.DownloadGlobal(pb.DownloadRequest(version=99), metadata=client._metadata(),
                                                timeout=10)
            with pytest.raises(grpc.RpcError) as missing:
                list(stream)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "global version 99 does not exist" in missing.value.details()
            assert (REFUSAL_METADATA_KEY, "no_version") in missing.value.trailing_metadata()
            with pytest.raises(grpc.RpcError) as anonymous:
                client.stub.PullTask(pb.PullTaskRequest(), timeout=10)
            assert (REFUSAL_METADATA_KEY, "unauthenticated") in anonymous.value.trailing_metadata()
            assert client.health() == "SERVING"
        counted = refusals(server)
        assert counted[("DownloadGlobal", "no_version")] == 1 and counted[("PullTask", "unauthenticated")] == 1
    finally:
        server.stop(grace=1)
        store.dispose()
