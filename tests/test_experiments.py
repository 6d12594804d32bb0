"""Each experiment / benchmark script's --smoke mode runs end to end (subprocess) and writes parseable outputs."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # a loaded 2-core machine
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def grid_files(data: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(data.glob("*.json"))}


CELL_FIELDS = {"experiment", "run", "strategy", "depths", "depth", "seed", "budget", "heldout_examples", "loss_unit",
               "wall_seconds", "git_commit", "device", "precision", "config"}


@pytest.mark.slow
def test_pruning_strategies_smoke(tmp_path):
    out, data = tmp_path / "exp1", tmp_path / "data"
    grid = ["--threads", "1", "--strategies", "top,contribution", "--data-dir", str(data)]
    run_script("exp_pruning_strategies.py", out, *grid)
    cells = {name: json.loads((data / name).read_text()) for name in grid_files(data)}
    # 2 references + 2 strategies x 2 depths x 2 tasks x 1 seed, one file each
    assert len(cells) == 10
    finetune = [c for c in cells.values() if c["run"] == "finetune"]
    assert {(c["strategy"], c["depths"][0], c["task"]) for c in finetune} == {
        (s, d, t) for s in ("top", "contribution") for d in (6, 4) for t in ("alpaca", "gsm8k")}
    for cell in cells.values():
        assert set(cell) >= CELL_FIELDS
        row = cell["depth"][0]
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and math.isfinite(row["before_loss"])
        assert cell["heldout_examples"] >= 1 and cell["git_commit"]
    for cell in finetune:
        assert cell["budget"] == {"optimizer_steps_per_client": 2, "examples_per_step": 2}
        assert cell["depth"][0]["loss"] != cell["depth"][0]["before_loss"]  # training moved the model
    # Same held-out examples in every cell of a task: a strategy's "before" is the pruned model, the reference's
    # loss is the unpruned one, and both count the same number of scored examples.
    for task in ("alpaca", "gsm8k"):
        assert len({c["heldout_examples"] for c in cells.values() if c["task"] == task}) == 1
    before = grid_files(data)
    done = run_script("exp_pruning_strategies.py", out, *grid)
    assert "0 to run now" in done.stderr and grid_files(data) == before  # finished cells are skipped, untouched


@pytest.mark.slow
@pytest.mark.timeout(1200)  # several subprocesses; minutes only when other suites load the 2 cores
def test_hetero_vs_homo_smoke_and_report(tmp_path):
    out, data = tmp_path / "exp2", tmp_path / "data"
    runs = "fedavg-group,heteagg-lr2,mixed-auto,homogeneous,local"  # additive: same per-group path as mixed
    run_script("exp_hetero_vs_homo.py", out, "--threads", "1", "--runs", runs, "--regimes", "top:8,4", "--data-dir",
               str(data), "--state-dir", str(tmp_path / "state"))
    cells = [json.loads(p.read_text()) for p in sorted(data.glob("*.json"))]
    # 4 runs over the 8/4 regime + homogeneous at each depth (8 = the full tiny model: strategy "none")
    assert sorted((c["run"], c["strategy"], tuple(c["depths"])) for c in cells) == sorted(
        [(r, "top", (8, 4)) for r in ("fedavg-group", "heteagg-lr2", "mixed-auto", "local")]
        + [("homogeneous", "none", (8,)), ("homogeneous", "top", (4,))])
    initial = {}
    for cell in cells:
        assert set(cell) >= CELL_FIELDS and cell["seed"] == {"training": 0, "partition": 0}
        assert cell["budget"]["optimizer_steps_per_client"] == 4 and cell["budget"]["examples_per_step"] == 2
        for row in cell["depth"]:
            assert math.isfinite(row["loss"]) and row["loss"] > 0
            for point in row["curve"]:
                if point["round"] == 0:
                    initial.setdefault(row["depth"], set()).add(point["loss"])
        if cell["run"] != "homogeneous":  # equal shares: each depth group holds 2 of the 4 clients
            assert [r["clients"] for r in cell["depth"]] == [2, 2]
        else:
            assert [r["clients"] for r in cell["depth"]] == [4]
    # Every run starts from the same initial global: round-0 losses agree across runs at each depth.
    assert all(len(values) == 1 for values in initial.values())
    mixed = next(c for c in cells if c["run"] == "mixed-auto")
    assert all(0 <= lam <= 1 for rnd in mixed["mix_per_round"] for g in rnd.values() for lam in g["lambda"].values())

    doc = tmp_path / "results.md"
    doc.write_text("# r\n<!-- BEGIN grid-status -->\n<!-- END grid-status -->\n<!-- BEGIN exp2-top-8-4 -->\nSTALE-BLOCK\n"
                   "<!-- END exp2-top-8-4 -->\n<!-- BEGIN exp2-findings -->\n<!-- END exp2-findings -->\n")
    report = [sys.executable, str(ROOT / "scripts" / "results_report.py"), "--data-dir", str(data), "--doc", str(doc),
              "--img-dir", str(tmp_path / "img"), "--no-plan"]
    done = subprocess.run(report, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert "STALE-BLOCK" not in text and "Cells finished: **6**" in text
    assert "| mixed-auto − fedavg-group |" in text and "| fedavg-group − homogeneous |" in text
    assert (tmp_path / "img" / "exp_hetero_top_8-4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check = subprocess.run(report + ["--check"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four subprocesses; minutes only when other suites load the 2 cores
def test_grid_resumes_an_interrupted_cell(tmp_path):
    """Kill a cell after its first round (SIGKILL: no clean-up runs), rerun: it resumes from the round checkpoint
    and ends with exactly the numbers of an uninterrupted run; the finished cell is then skipped."""
    args = ["--smoke", "--threads", "1", "--runs", "mixed-auto", "--regimes", "top:8,4", "--out", str(tmp_path / "out")]
    script = str(ROOT / "scripts" / "exp_hetero_vs_homo.py")
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, script, *args, "--data-dir", str(clean), "--state-dir", str(tmp_path / "s0")],
                   check=True, capture_output=True, timeout=900, cwd=ROOT)

    data, state = tmp_path / "data", tmp_path / "state"
    grid = [sys.executable, script, *args, "--data-dir", str(data), "--state-dir", str(state)]
    process = subprocess.Popen(grid, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 900
    while not list(state.glob("*.pt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(state.glob("*.pt")) and not list(data.glob("*.json")), "the kill came too late to interrupt"

    done = subprocess.run(grid, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "after round 1" in done.stderr
    (name,) = grid_files(data)
    resumed, reference = json.loads((data / name).read_text()), json.loads((clean / name).read_text())
    assert resumed["resumed_after_round"] == 1 and reference["resumed_after_round"] is None
    def losses(cell):
        return [[(point["round"], point["loss"]) for point in row["curve"]] for row in cell["depth"]]

    assert losses(resumed) == losses(reference) and len(losses(resumed)[0]) == 2  # rounds 0 and 2, bit for bit
    assert resumed["mix_per_round"] == reference["mix_per_round"]
    assert not list(state.glob("*.pt"))  # the checkpoint goes once the cell is written
    before = grid_files(data)
    again = subprocess.run(grid, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0 and "0 to run now" in again.stderr and grid_files(data) == before


@pytest.mark.slow
def test_bench_hardware_profiles_smoke(tmp_path):
    from edge_client.hardware_profiles import load_profiles

    out = tmp_path / "bench"
    run_script("bench_hardware_profiles.py", out, "--threads", "1")
    measured = read_csv(out / "results.csv")
    assert [r["depth"] for r in measured] == ["8", "4"]
    for row in measured:
        assert float(row["tokens_per_s"]) > 0 and float(row["peak_rss_mib"]) > 0
    assert float(measured[0]["speed_vs_full"]) == 1.0
    planned = read_csv(out / "profiles.csv")
    assert {r["profile"] for r in planned} == set(load_profiles())
    assert {r["model"] for r in planned} == {"tiny-random", "llama-2-7b"}
    for row in planned:
        assert 0 <= int(row["chosen_depth"]) <= (8 if row["model"] == "tiny-random" else 32)
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script, extra, flag", [
    ("exp_pruning_strategies.py", ["--strategies", "nope"], "--strategies"),
    ("exp_hetero_vs_homo.py", ["--runs", "heteagg-lrx"], "--runs"),
    ("exp_hetero_vs_homo.py", ["--runs", "mixed-2"], "--runs"),
    ("exp_hetero_vs_homo.py", ["--regimes", "top:30,30"], "--regimes"),
    ("exp_hetero_vs_homo.py", ["--eval-rounds", "99"], "--eval-rounds"),
])
def test_grid_flags_are_validated(tmp_path, script, extra, flag):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *extra, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and flag in done.stderr
