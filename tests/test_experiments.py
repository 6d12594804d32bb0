"""Each experiment / benchmark script's --smoke mode runs end to end (subprocess) and writes parseable outputs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_pruning_strategies_smoke(tmp_path):
    from edge_client.core.pruning import STRATEGIES

    out = tmp_path / "exp1"
    run_script("exp_pruning_strategies.py", out, "--threads", "1")
    rows = read_csv(out / "results.csv")
    assert {"strategy", "depth", "task", "phase", "seed", "loss", "perplexity", "exact_match"} <= set(rows[0])
    pruned = [r for r in rows if r["strategy"] != "unpruned"]
    # Every strategy x depth x task has one before row and one after row (1 seed in smoke mode).
    cells = {(r["strategy"], r["depth"], r["task"], r["phase"]) for r in pruned}
    assert cells == {(s, d, t, p) for s in STRATEGIES for d in ("6", "4") for t in ("alpaca", "gsm8k")
                     for p in ("before", "after")}
    assert len(pruned) == len(cells)
    for row in rows:
        loss = float(row["loss"])
        assert math.isfinite(loss) and loss > 0
        assert float(row["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-6)
    summary = json.loads((out / "results.json").read_text())
    assert summary["best_overall"] in STRATEGIES
    assert set(summary["best_per_task"]) == {"alpaca", "gsm8k"}
    assert sorted(summary["rank_average"]) == sorted(STRATEGIES)
    table = (out / "table.md").read_text()
    assert "## alpaca" in table and "## gsm8k" in table and summary["best_overall"] in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_hetero_vs_homo_smoke(tmp_path):
    out = tmp_path / "exp2"
    run_script("exp_hetero_vs_homo.py", out, "--local-only", "--threads", "1", "--strategy", "top")
    rows = read_csv(out / "results.csv")
    runs = {"heteagg-factors", "heteagg-product", "fedavg"}
    assert {r["run"] for r in rows} == runs | {"local-only"}
    for run in runs:  # rounds 0..2 for each of the 3 depth groups
        assert {(r["depth"], r["round"]) for r in rows if r["run"] == run} == {
            (d, k) for d in ("8", "6", "4") for k in ("0", "1", "2")}
    for row in rows:
        assert math.isfinite(float(row["loss"])) and float(row["loss"]) > 0
    # Every run starts from the same initial global adapter, so round-0 losses agree across runs.
    initial = {(r["depth"], r["run"]): float(r["loss"]) for r in rows if r["round"] == "0"}
    for depth in ("8", "6", "4"):
        values = [initial[(depth, run)] for run in runs]
        assert max(values) - min(values) < 1e-9
    summary = json.loads((out / "results.json").read_text())
    assert summary["config"]["strategy"] == "top"
    assert "heteagg-factors-fedavg@4" in summary["stats"]["paired_differences"]
    assert "| depth |" in (out / "table.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_smoke_flags_are_validated(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "exp_pruning_strategies.py"), "--strategies",
                           "nope", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--strategies" in done.stderr
