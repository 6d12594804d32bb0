"""Benchmark: HeteAgg streaming aggregation vs memcpy and vs a naive stack-then-average, on LLaMA-7B adapter shapes.

  python scripts/bench_aggregation.py            # N = 10, 100, 1000 clients, LLaMA-7B shapes (a few minutes)
  python scripts/bench_aggregation.py --quick    # N = 10, 30 on a 1024-wide model (seconds)

Shapes: 32 layers, d = 4096, LoRA r = 8 on q_proj and v_proj: a full adapter is 32·2·2·(8·4096)·4 B = 16.8 MB.
Client k has depth (32, 24, 16)[k mod 3] with plan ("top", "odd-alternate")[(k div 3) mod 2] from `make_plan`.
Updates are generated lazily as views of a small pool of random full-depth deltas, so N updates are never held
in memory (except by the naive method, which materialises them as Flower's `aggregate` does).

Methods, each in a fresh subprocess so its peak RSS is its own:
  memcpy    `dst.copy_(x)` of every update tensor into a preallocated destination: the same bytes, moved once
  heteagg   `HeteAggregator.add` for every update, then `finish` (float64 accumulators, see aggregator/core/heteagg.py)
  naive     Flower-style: materialise all updates (clone), weighted copies w·Δ, then per key sum / Σw (float32);
            run only for N ≤ --naive-max
Reported: seconds (best of --repeats), GB/s = update bytes / seconds, ratio to memcpy (GB/s ÷ memcpy GB/s),
speed-up over naive (naive s ÷ heteagg s), peak RSS, and extra memory in adapters = (peak RSS − RSS after the
global and the pool exist) ÷ one full float32 adapter. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("memcpy", "heteagg", "naive")
DEPTHS = (32, 24, 16)
PLANS = ("top", "odd-alternate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python scripts/bench_aggregation.py --sizes 10,100 --repeats 3")
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated client counts N")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the base model")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size d (q_proj and v_proj are d×d)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--pool", type=int, default=4, help="distinct random full-depth deltas reused by the updates")
    parser.add_argument("--naive-max", type=int, default=100, help="largest N for the naive method (it holds all N)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per (method, N); the best time is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="N = 10, 30 on a 1024-wide model: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_aggregation.json", help="JSON output file")
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)  # subprocess entry
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.hidden, args.layers = "10,30", 1024, 32
    try:
        args.size_list = [int(n) for n in args.sizes.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    for name in ("layers", "hidden", "rank", "pool", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not args.size_list or min(args.size_list) < 1:
        parser.error("--sizes must list client counts >= 1")
    if args.layers < max(DEPTHS):
        parser.error(f"--layers must be >= {max(DEPTHS)} for the mixed depths {DEPTHS}")
    return args


def model_config(args) -> dict:
    return {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 4 * args.hidden}


def client_layers(k: int, num_layers: int) -> tuple[int, ...]:
    from edge_client.core.pruning import make_plan

    depth = DEPTHS[k % len(DEPTHS)]
    return make_plan(PLANS[(k // len(DEPTHS)) % len(PLANS)], num_layers, depth).kept_layers


def setup(args):
    """(global adapter, update factory k -> (update, num_examples)); updates are views of a random pool."""
    import torch

    from aggregator.core.init_adapter import initial_global_adapter
    from prufed.common.adapter_keys import keys_for_layers

    global_state = initial_global_adapter(model_config(args), r=args.rank, alpha=2 * args.rank,
                                          targets=("q_proj", "v_proj"), seed=0)
    gen = torch.Generator().manual_seed(1)
    pool = [{k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in global_state.items()} for _ in range(args.pool)]
    plans = {k: keys_for_layers(global_state, client_layers(k, args.layers)) for k in range(len(DEPTHS) * len(PLANS))}

    def update(k: int):
        source = pool[k % len(pool)]
        return {key: source[key] for key in plans[k % len(plans)]}, 100 + (k * 37) % 900

    return global_state, update


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(args) -> dict:
    """Run one method once in this (fresh) process; returns seconds, bytes and memory."""
    import torch

    torch.set_num_threads(args.threads)
    global_state, update = setup(args)
    adapter_bytes = sum(v.numel() * v.element_size() for v in global_state.values())
    total = sum(sum(v.numel() * v.element_size() for v in update(k)[0].values()) for k in range(args.n))
    before = rss_bytes()
    started = time.perf_counter()
    if args.worker == "memcpy":
        destination = {k: torch.empty_like(v) for k, v in global_state.items()}
        for k in range(args.n):
            for key, value in update(k)[0].items():
                destination[key].copy_(value)
    elif args.worker == "heteagg":
        from aggregator.core.heteagg import AggregationConfig, HeteAggregator

        aggregator = HeteAggregator(global_state, AggregationConfig())
        for k in range(args.n):
            aggregator.add(*update(k))
        aggregator.finish()
    else:
        materialised = [({key: v.clone() for key, v in u.items()}, n) for u, n in map(update, range(args.n))]
        started = time.perf_counter()  # Flower's aggregate receives deserialised updates: time only the maths
        weighted = [({key: v * n for key, v in u.items()}, n) for u, n in materialised]
        result = {}
        for key, value in global_state.items():
            holders = [(u[key], n) for u, n in weighted if key in u]
            if holders:
                result[key] = value + torch.stack([v for v, _ in holders]).sum(0) / sum(n for _, n in holders)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"method": args.worker, "n": args.n, "seconds": seconds, "update_bytes": total,
            "adapter_bytes": adapter_bytes, "peak_rss": peak, "extra_adapters": max(0, peak - before) / adapter_bytes}


def measure(args, method: str, n: int) -> dict:
    """Best of --repeats fresh subprocesses (memory: the largest peak seen)."""
    runs = []
    for _ in range(args.repeats):
        command = [sys.executable, __file__, "--worker", method, "--n", str(n), "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--rank", str(args.rank), "--pool", str(args.pool),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} N={n} failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return best | {"peak_rss": max(r["peak_rss"] for r in runs), "extra_adapters": max(r["extra_adapters"] for r in runs),
                   "all_seconds": [r["seconds"] for r in runs], "gbps": best["update_bytes"] / best["seconds"] / 1e9}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for n in args.size_list:
        methods = [m for m in METHODS if m != "naive" or n <= args.naive_max]
        results = {m: measure(args, m, n) for m in methods}
        for method, row in results.items():
            row["vs_memcpy"] = row["gbps"] / results["memcpy"]["gbps"]
            row["speedup_vs_naive"] = results["naive"]["seconds"] / row["seconds"] if "naive" in results else None
            rows.append(row)
            print(f"  N={n:<5} {method:8s} {row['seconds']:8.3f} s  {row['gbps']:6.2f} GB/s", file=sys.stderr)

    header = f"{'N':>5} {'method':8} {'seconds':>9} {'GB/s':>7} {'x memcpy':>9} {'x naive':>8} {'peak RSS MB':>12} " \
             f"{'extra adapters':>15}"
    print(header)
    print("-" * len(header))
    for row in rows:
        speedup = f"{row['speedup_vs_naive']:8.2f}" if row["speedup_vs_naive"] is not None else f"{'-':>8}"
        print(f"{row['n']:>5} {row['method']:8} {row['seconds']:9.3f} {row['gbps']:7.2f} {row['vs_memcpy']:9.2f} "
              f"{speedup} {row['peak_rss'] / 1e6:12.0f} {row['extra_adapters']:15.2f}")
    import torch

    environment = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                   "cpus": os.cpu_count(), "load_average": os.getloadavg(), "layers": args.layers,
                   "hidden": args.hidden, "rank": args.rank, "pool": args.pool, "repeats": args.repeats,
                   "adapter_bytes": rows[0]["adapter_bytes"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
