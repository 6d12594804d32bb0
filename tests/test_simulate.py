"""`prufed simulate --smoke` on the tiny model: real aggregator + 3 real agents, report files with the expected fields."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from aggregator_helpers import REPO

from prufed.simulation.run import FederationRun, SimulationConfig, build_report, table_rows


def _data(path):
    books = ["Genesis", "Exodus", "Ruth", "Job", "Mark", "John"]
    with path.open("w") as out:
        for i in range(60):
            book = books[(i * 5) % len(books)]
            out.write(json.dumps({"instruction": "Name the book.", "input": f"verse {i}", "output": book,
                                  "category": book}) + "\n")
    return path


@pytest.mark.slow
def test_smoke_simulation_writes_report(tmp_path, tiny_model_dir):
    out = tmp_path / "sim"
    proc = subprocess.run(
        [sys.executable, "-m", "prufed", "simulate", "--smoke", "--model", str(tiny_model_dir), "--depths", "8,6,4",
         "--data", str(_data(tmp_path / "data.jsonl")), "--out", str(out), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert json.loads(proc.stdout)["rounds"] == report["rounds"]
    assert [c["depth"] for c in report["clients"]] == [8, 6, 4]
    assert sum(c["num_examples"] for c in report["clients"]) == report["num_train_examples"]
    assert all(c["num_examples"] >= 1 for c in report["clients"])
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert row["clients_per_depth"] == {"8": 1, "6": 1, "4": 1}
        assert set(row["heldout_loss"]) == {"8", "6", "4"}
        assert all(0 < v < 20 for v in row["heldout_loss"].values())
        assert row["train_loss"] > 0 and row["seconds"] > 0 and row["slowest_train_s"] > 0
        # every byte of the updates: 2 LoRA targets × 2 factors per kept layer, deeper clients send more
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    # the aggregator's own counters agree with the agents' payload bytes
    assert report["aggregator_totals"]["bytes_up"] == report["agent_totals"]["bytes_up"]
    assert report["aggregator_totals"]["bytes_down"] == report["agent_totals"]["bytes_down"]
    assert set(report["heldout_loss_round0"]) == {"8", "6", "4"}
    # federated evaluation: each agent scored the round's global on its own held-out examples before training
    evaluating = {str(c["depth"]) for c in report["clients"] if c["num_examples"] >= 2}  # 1 example: nothing to hold out
    assert evaluating
    for row in report["rounds"]:
        assert set(row["federated_eval"]) == evaluating and set(row["federated_eval_examples"]) == evaluating
        assert all(0 < v < 20 for v in row["federated_eval"].values())
        assert all(n >= 1 for n in row["federated_eval_examples"].values())
    assert report["mode"] == "heteagg" and report["groups"] == []
    # private shards were written, and agents exited (no leftover processes hold the DB)
    assert all((out / "clients" / str(i) / "data.jsonl").is_file() for i in range(3))
    md = (out / "report.md").read_text()
    assert "| round |" in md and "held-out d8" in md and "fed-eval d8" in md and "\n| 2 | 8:1 6:1 4:1 |" in md
    assert (out / "loss_per_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Running again into the same --out (`make demo` twice) starts a new federation instead of resuming the
    # finished agents' state against a fresh aggregator; a stale SQLite journal from a killed run is not replayed.
    # This run keeps one global per depth group (--mode mixed), which the report lists.
    (out / "agg.db-wal").write_bytes(b"stale journal of a killed run")
    again = subprocess.run(
        [sys.executable, "-m", "prufed", "simulate", "--smoke", "--model", str(tiny_model_dir), "--depths", "8,6,4",
         "--rounds", "1", "--data", str(tmp_path / "data.jsonl"), "--out", str(out), "--json", "--mode", "mixed",
         "--mix", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    assert (report["mode"], report["mix"]) == ("mixed", 0.5)
    assert sorted(g["depth"] for g in report["groups"]) == [4, 6, 8] and len({g["sha256"] for g in report["groups"]}) == 3
    assert sorted(len(g["group"]) for g in report["rounds"][0]["groups"]) == [4, 6, 8]
    assert set(report["rounds"][0]["federated_eval"]) == evaluating
    assert "## Depth groups" in (out / "report.md").read_text()


def test_table_and_report_from_rows(tmp_path):
    """The report maths without processes: baseline columns, overhead and totals."""
    config = SimulationConfig(out=tmp_path, clients=2, depths=(4, 2))
    row = {"round": 1, "clients_per_depth": {4: 1, 2: 1}, "train_loss": 2.0, "heldout_loss": {4: 1.5, 2: 1.8},
           "federated_eval": {4: 2.25},
           "bytes_up": 2048, "bytes_down": 4096, "seconds": 10.0, "slowest_train_s": 9.5, "overhead": 0.05}
    hetero = FederationRun("heteagg", rows=[row], eval_round0={4: 2.0, 2: 2.1}, clients=[], wall_s=12.0)
    base = FederationRun("fedavg-4", rows=[dict(row, heldout_loss={4: 1.6})], eval_round0={4: 2.0})
    report = build_report(config, hetero, {4: base}, 20.0, 10, 2)
    assert report["rounds"][0]["baseline_heldout_loss"] == {4: 1.6}
    assert report["mean_overhead"] == pytest.approx(0.05)
    assert report["agent_totals"] == {"bytes_up": 2048, "bytes_down": 4096}
    header, lines = table_rows(json.loads(json.dumps(report)))
    assert header[:7] == ["round", "clients/depth", "train loss", "held-out d4", "held-out d2", "fed-eval d4",
                          "fed-eval d2"]
    assert "FedAvg-only d4" in header
    assert lines[1][header.index("FedAvg-only d4")] == "1.6000"
    assert lines[1][header.index("fed-eval d4")] == "2.2500" and lines[1][header.index("fed-eval d2")] == "–"
    assert lines[1][-1] == "5.0%" and lines[1][header.index("KiB up")] == "2"


@pytest.mark.parametrize("extra, flag", [(["--depths", "9"], "--depths"), (["--depths", "a,b"], "--depths"),
                                         (["--profiles", "no-such-device"], "--profile"),
                                         (["--clients", "0"], "--clients"), (["--alpha", "0"], "--alpha")])
def test_flags_are_validated(tmp_path, tiny_model_dir, extra, flag):
    proc = subprocess.run([sys.executable, "-m", "prufed", "simulate", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr


@pytest.mark.slow
def test_children_die_with_a_killed_simulation(tmp_path, tiny_model_dir):
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "prufed", "simulate", "--smoke", "--model", str(tiny_model_dir), "--depths", "8,4",
         "--data", str(_data(tmp_path / "data.jsonl")), "--out", str(tmp_path / "sim"), "--json"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while len(parent.children()) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        children = parent.children()
        assert len(children) == 4, "expected the aggregator and 3 agents to be running"
    finally:
        proc.kill()  # SIGKILL: no chance for the simulation's own clean-up
        proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned: {[p.cmdline()[3:5] for p in alive]}"
