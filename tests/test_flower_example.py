"""examples/flower: `flwr run` on the local simulation federation (a managed local SuperLink, Ray backend).

The SuperLink `flwr run` starts is a detached daemon: the test gives it its own FLWR_HOME and free ports, and ends
that process (and its children) by pid afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from aggregator_helpers import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shards(root: Path, clients: int) -> Path:
    for client in range(clients):
        (root / str(client)).mkdir(parents=True)
        with (root / str(client) / "data.jsonl").open("w") as out:
            for i in range(10):
                out.write(json.dumps({"instruction": "Name the number.", "input": f"{client}-{i}",
                                      "output": str(i)}) + "\n")
    return root


def _stop_superlink(port: int) -> None:
    """Terminate the local SuperLink this test's `flwr run` started (found by its unique port) and its children."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and str(port) in cmdline:
            family = [proc, *proc.children(recursive=True)]
            for member in family:
                member.terminate()
            _, alive = psutil.wait_procs(family, timeout=15)
            for member in alive:
                member.kill()


@pytest.mark.slow
def test_flwr_run_example_completes(tmp_path, tiny_model_dir):
    import torch

    from aggregator.core.init_adapter import initial_global_adapter
    from prufed.common.adapter_format import load_adapter
    from prufed.common.models import read_model_config

    out = tmp_path / "out"
    http_port, control_port = _free_port(), _free_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
               FLWR_LOCAL_CONTROL_API_PORT=str(control_port), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    run_config = (f"model='{tiny_model_dir}' num-server-rounds=2 depths='8,6,4' local-steps=2 seq-len=256 "
                  f"quant='fp32' min-nodes=3 data-dir='{_shards(tmp_path / 'data', 3)}' output-dir='{out}'")
    try:
        proc = subprocess.run(["flwr", "run", "examples/flower", "local", "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=3"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop_superlink(http_port)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert record["failed"] == [] and record["refused"] == [], record
        assert sorted(len(c["kept_layers"]) for c in record["clients"]) == [4, 6, 8]
    # round 2 sends each node only its kept layers
    assert sum(history[1]["bytes_down"].values()) < sum(history[0]["bytes_down"].values())

    state, meta = load_adapter(out / "global.safetensors")
    assert meta.kept_layers == tuple(range(8)) and meta.round == 2
    initial = initial_global_adapter(read_model_config(tiny_model_dir), 8, 16, ("q_proj", "v_proj"), 0)
    assert state.keys() == initial.keys()
    changed = {k.split(".layers.")[1].split(".")[0] for k in state if not torch.equal(state[k], initial[k])}
    assert changed == {str(i) for i in range(8)}
