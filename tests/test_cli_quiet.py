"""A quiet command line: a real `prufed train` run prints no third-party progress bars or warnings on stderr,
only our own lines; `--verbose` lets them through (so the check can fail)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from aggregator_helpers import REPO

#: Every line `prufed train` itself writes to a non-terminal stderr: the mode line and a line per ~10% of steps.
OURS = (re.compile(r"^quant: \S+ \(.*\) on \w+; depth \d+/\d+ \(\S+\), kept layers \[[\d, ]+\]$"),
        re.compile(r"^step \d+/\d+ loss \d+\.\d+ \d+ tok/s$"))


def train(tmp_path, model_dir, *extra: str) -> subprocess.CompletedProcess:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Reverse.", "input": w, "output": w[::-1]}) + "\n"
                            for w in ("abc", "dog", "tree", "moon", "fish", "rain")))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    out = tmp_path / f"run{len(extra)}"
    return subprocess.run([sys.executable, "-m", "prufed", "train", "--model", str(model_dir), "--depth", "3",
                           "--data", str(data), "--max-steps", "2", "--quant", "nf4", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_stderr_holds_only_our_lines(tmp_path, tiny_model_dir):
    # nf4 goes through peft's k-bit preparation, the path that raised transformers' checkpointing FutureWarnings
    run = train(tmp_path, tiny_model_dir)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    stray = [line for line in lines if not any(pattern.match(line) for pattern in OURS)]
    assert lines and not stray
    assert "prufed train" in run.stdout  # the result table is still printed


def test_verbose_lets_third_party_output_through(tmp_path, tiny_model_dir):
    run = train(tmp_path, tiny_model_dir, "--verbose")
    assert run.returncode == 0, run.stderr
    assert "Loading weights" in run.stderr and "FutureWarning" in run.stderr
