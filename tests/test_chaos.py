"""`prufed simulate --replicas N --chaos K`: aggregator replicas SIGKILLed at random moments and restarted, and the
federation still ends on the byte-identical global adapter of an undisturbed run with the same seed, on SQLite
(1 replica) and on PostgreSQL (2 replicas, blobs in the database)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from aggregator_helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # three federations side by side on 2 shared cores

CHAOS = 2


def _data(path):
    books = ["Genesis", "Exodus", "Ruth", "Job", "Mark", "John"]
    with path.open("w") as out:
        for i in range(40):
            book = books[(i * 5) % len(books)]
            out.write(json.dumps({"instruction": "Name the book.", "input": f"verse {i}", "output": book,
                                  "category": book}) + "\n")
    return path


def test_chaos_ends_on_the_same_global_as_an_undisturbed_run(tmp_path, tiny_model_dir, postgres_cluster):
    data = _data(tmp_path / "data.jsonl")
    common = ["--smoke", "--model", str(tiny_model_dir), "--depths", "8,4", "--clients", "2", "--rounds", "2",
              "--local-steps", "1", "--eval-examples", "0", "--data", str(data), "--seed", "3", "--json"]
    runs = {"reference": [],
            "sqlite-chaos": ["--chaos", str(CHAOS)],
            "postgresql-chaos": ["--db", postgres_cluster.create_database("chaos"), "--replicas", "2",
                                 "--blob-store", "db", "--chaos", str(CHAOS)]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "prufed", "simulate", *common, *extra, "--out",
                                     str(tmp_path / name)], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, extra in runs.items()}  # side by side: each is mostly waiting on process start-ups
    reports = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{err[-3000:]}"
        reports[name] = json.loads(out)
    reference = reports["reference"]
    assert reference["replica_kills"] == [] and len(reference["replica_requests"]) == 1
    final = tmp_path / "reference" / "final_global.safetensors"
    assert reference["final_global_path"] == str(final)
    assert hashlib.sha256(final.read_bytes()).hexdigest() == reference["final_global_sha256"]
    for name in ("sqlite-chaos", "postgresql-chaos"):
        report = reports[name]
        assert len(report["replica_kills"]) == CHAOS, name
        assert report["final_global_sha256"] == reference["final_global_sha256"], name
        assert [r["restarts"] for r in report["replica_requests"]] != [0] * len(report["replica_requests"])
        # counts are scraped while a replica runs, so a SIGKILL loses what it served since the last scrape: a lower
        # bound, never the exact 4 uploads of the run
        assert sum(r["requests"].get("UploadUpdate", 0) for r in report["replica_requests"]) >= 1, name
    replicas = reports["postgresql-chaos"]["replica_requests"]
    # both replicas ran; a replica killed before its first scrape reports no requests, so no per-replica minimum
    assert len(replicas) == 2 and sum(r["total"] for r in replicas) > 0
