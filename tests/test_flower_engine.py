"""`prufed simulate --engine flower` against `--engine prufed`: same federation, same global adapters each round.

One Flower run (Ray backend) is shared by the assertions: equality with the PruFed engine's globals within 1e-6
over 2 rounds and 3 depths, the same report fields, and no listening socket of the run on a non-loopback address
(`ss -ltnp`, sampled while the run is going).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time

import psutil
import pytest
from aggregator_helpers import REPO


def _data(path):
    books = ["Genesis", "Exodus", "Ruth", "Job", "Mark", "John"]
    with path.open("w") as out:
        for i in range(60):
            book = books[(i * 5) % len(books)]
            out.write(json.dumps({"instruction": "Name the book.", "input": f"verse {i}", "output": book,
                                  "category": book}) + "\n")
    return path


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("*", "0.0.0.0", "::"):
        return False
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(local address, pid, process name) of every TCP listener owned by one of `pids` (`ss -ltnpH`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((fields[3], int(pid), name))
    return found


def _run(cmd, *, watch: bool = False):
    """Run `cmd`; with `watch`, sample the listeners of its process tree every 0.3 s until it exits."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + 900
    while watch and proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = {proc.pid} | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        seen.update(_listeners(tree))
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return proc.returncode, stdout, stderr, seen


@pytest.mark.slow
def test_flower_engine_matches_prufed_engine_on_loopback(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = _data(tmp_path / "data.jsonl")
    common = [sys.executable, "-m", "prufed", "simulate", "--smoke", "--model", str(tiny_model_dir), "--depths",
              "8,6,4", "--rounds", "2", "--data", str(data), "--seed", "3", "--json"]
    rc, _, err, seen = _run([*common, "--engine", "flower", "--out", str(tmp_path / "flower")], watch=True)
    assert rc == 0, err[-3000:]
    rc, _, err, _ = _run([*common, "--engine", "prufed", "--out", str(tmp_path / "prufed")])
    assert rc == 0, err[-3000:]

    # Ray really listened (GCS, raylet, workers), and only on loopback
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen
    assert [s for s in seen if not _loopback(s[0])] == [], seen

    for round_id in (0, 1, 2):
        flower = load_file(tmp_path / "flower" / "globals" / f"round-{round_id}.safetensors")
        prufed = load_file(tmp_path / "prufed" / "globals" / f"round-{round_id}.safetensors")
        assert flower.keys() == prufed.keys() and len(flower) == 8 * 4  # 8 layers × q,v × A,B
        worst = max(float((flower[k] - prufed[k]).abs().max()) for k in flower)
        assert worst <= 1e-6, f"round {round_id}: max |flower − prufed| = {worst}"
    first = load_file(tmp_path / "flower" / "globals" / "round-0.safetensors")
    last = load_file(tmp_path / "flower" / "globals" / "round-2.safetensors")
    changed = {int(k.split(".layers.")[1].split(".")[0]) for k in first if not first[k].equal(last[k])}
    assert changed == set(range(8))  # the deep client trained every layer, so the comparison is not vacuous

    reports = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("flower", "prufed")}
    assert reports["flower"]["config"]["engine"] == "flower"
    assert reports["flower"]["clients"] == reports["prufed"]["clients"]
    for row_f, row_p in zip(reports["flower"]["rounds"], reports["prufed"]["rounds"], strict=True):
        assert row_f["clients_per_depth"] == row_p["clients_per_depth"] == {"8": 1, "6": 1, "4": 1}
        assert row_f["train_loss"] == pytest.approx(row_p["train_loss"], abs=1e-6)
        for depth in ("8", "6", "4"):
            assert row_f["heldout_loss"][depth] == pytest.approx(row_p["heldout_loss"][depth], abs=1e-5)
        assert row_f["examples"] == row_p["examples"] and row_f["updates"] == 3
        assert row_f["bytes_up"] > 0 and row_f["seconds"] > 0 and row_f["slowest_train_s"] > 0
    rounds = reports["flower"]["rounds"]
    assert rounds[1]["bytes_down"] < rounds[0]["bytes_down"]  # round 2 sends each node its kept layers only
    assert "| 2 | 8:1 6:1 4:1 |" in (tmp_path / "flower" / "report.md").read_text()
