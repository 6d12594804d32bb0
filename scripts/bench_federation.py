"""Federation overhead per round: (round wall time − slowest client's local training time) / round wall time.

Runs a short `prufed simulate` (real aggregator + agent processes on loopback) or reads an existing report.json
(--report), and compares each round's wall time (open -> close, from the aggregator's database) against the
slowest client's training time measured in the same run (train_local wall time: model load, training, writing the
update). Everything else — process wake-ups, polling (retry_after), download, upload, validation, aggregation —
is federation overhead. Target: <= 5 %.

    .venv/bin/python scripts/bench_federation.py                 # smollm2-135m, 3 clients, 2 rounds
    .venv/bin/python scripts/bench_federation.py --report runs/simulate/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.05


def overhead_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["rounds"]:
        seconds, slowest = r["seconds"], r["slowest_train_s"]
        rows.append({"round": r["round"], "round_s": seconds, "slowest_train_s": slowest,
                     "slowest_steps_s": r.get("slowest_step_s"), "ratio_round_to_train": seconds / slowest,
                     "overhead": (seconds - slowest) / seconds, "bytes_up": r["bytes_up"],
                     "bytes_down": r["bytes_down"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default=None, help="analyse this report.json instead of running a simulation")
    parser.add_argument("--model", default="smollm2-135m", help="base model for the run")
    parser.add_argument("--depths", default="30,20,10", help="client depths")
    parser.add_argument("--rounds", type=int, default=2, help="rounds")
    parser.add_argument("--local-steps", type=int, default=6, help="local steps per round")
    parser.add_argument("--sim-out", default="runs/bench_federation_sim", help="simulation output directory")
    parser.add_argument("--out", default="runs/bench_federation.json", help="JSON result file")
    args = parser.parse_args()

    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        from prufed.simulation.run import SimulationConfig, simulate

        depths = tuple(int(d) for d in args.depths.split(","))
        report = simulate(SimulationConfig(out=Path(args.sim_out), clients=len(depths), rounds=args.rounds,
                                           depths=depths, local_steps=args.local_steps, model=args.model))
    rows = overhead_rows(report)
    mean = sum(r["overhead"] for r in rows) / len(rows)
    print(f"{'round':>5} {'round s':>9} {'slowest train s':>16} {'round/train':>12} {'overhead':>9} "
          f"{'KiB up':>8} {'KiB down':>9}")
    for r in rows:
        print(f"{r['round']:>5} {r['round_s']:>9.2f} {r['slowest_train_s']:>16.2f} {r['ratio_round_to_train']:>12.3f} "
              f"{r['overhead']:>9.1%} {r['bytes_up'] / 1024:>8.0f} {r['bytes_down'] / 1024:>9.0f}")
    print(f"mean overhead {mean:.1%} (target <= {TARGET:.0%}): {'PASS' if mean <= TARGET else 'ABOVE TARGET'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rows, "mean_overhead": mean, "target": TARGET,
                               "config": report.get("config"), "clients": report.get("clients")}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
