"""The committed gRPC stubs match a fresh generation from proto/ (scripts/gen_protos.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_check_detects_a_stale_stub(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.remove(str(REPO / "scripts"))
    fake_root = tmp_path / "repo"
    (fake_root / "prufed" / "v1").mkdir(parents=True)
    monkeypatch.setattr(gen_protos, "ROOT", fake_root)
    stale = gen_protos.check()
    assert "prufed/v1/aggregator_pb2.py" in stale and "prufed/v1/aggregator_pb2_grpc.py" in stale


def test_wire_contract_shape():
    from prufed.v1 import aggregator_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Aggregator"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Register": (False, False), "PullTask": (False, False), "DownloadGlobal": (False, True),
                       "UploadUpdate": (True, False), "Status": (False, False)}
    assert [f.name for f in pb.UploadChunk.DESCRIPTOR.oneofs_by_name["part"].fields] == ["header", "data", "trailer"]
