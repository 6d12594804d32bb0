"""scripts/bench_edge.py end to end on the tiny model: both paths run on the same examples and the JSON carries the
speedup and loss ratio per depth (the figures themselves are for the real model, in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_edge_compares_the_default_path_with_fp32(tmp_path, tiny_model_dir):
    data = tmp_path / "alpaca.jsonl"
    words = ["cat", "dog", "sun", "moon", "tree"]
    data.write_text("".join(json.dumps({"instruction": "Repeat the word.", "input": w, "output": " ".join([w] * (i % 7 + 1))})
                            + "\n" for i, w in enumerate(words * 12)))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_edge.py"), "--model", str(tiny_model_dir),
                           "--data", str(data), "--depths", "4", "--steps", "2", "--examples", "60", "--heldout", "6",
                           "--threads", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_edge.json").read_text())
    rows = {row["path"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "default"} and all(row["depth"] == 4 and row["steps"] == 2 for row in rows.values())
    assert rows["fp32"]["quant"] == "fp32" and rows["fp32"]["batching"] == "shuffled"
    assert rows["default"]["batching"] == "length-grouped" and rows["default"]["loss_positions"] == "trained"
    assert rows["fp32"]["heldout_tokens"] == rows["default"]["heldout_tokens"] > 0  # the same held-out examples
    (ratio,) = result["ratios"]
    assert ratio["speedup"] == rows["default"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    assert ratio["loss_ratio"] == rows["default"]["heldout_loss"] / rows["fp32"]["heldout_loss"]
    assert "speedup (target >= 2.0)" in done.stdout and "loss ratio (target <= 1.02)" in done.stdout
