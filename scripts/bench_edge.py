"""Edge training benchmark: the default CPU training path against the fp32 path it replaced, at several depths.

Both paths run `edge_client.train.train_local` on the SAME Alpaca examples (same split, seed and data order
stream), each (depth, path) in a FRESH subprocess with --threads torch threads:
  fp32 path   (before issue 15) --quant fp32, shuffled batches padded to their longest row, logits at every position
  default     what `prufed train` does now: --quant auto (bf16 base weights + fp32 LoRA/AdamW where this CPU has
              native bf16, see edge_client.planning), length-grouped batches, vocabulary projection only at trained
              positions
Reported per row:
  trained tok/s     non-padding tokens of the optimizer steps / training seconds (metrics.json tokens_per_s)
  tok/CPU-s         the same tokens / the process CPU seconds of those steps (all threads): on a shared machine
                    the work done, less sensitive than wall time to what else runs
  held-out loss     masked NLL (nats per response token) on the held-out examples after --steps steps
Per depth: speedup = default tok/s / fp32 tok/s (target >= 2.0; also given in CPU time) and loss ratio = default loss / fp32 loss
(target <= 1.02). Writes bench_edge.json (rows, ratios, settings) under --out and prints the table.

Usage: python scripts/bench_edge.py [--data ../shared/data/alpaca_5000.json] [--depths 30,20,10] [--steps 50]
       [--threads 2] [--out runs/bench_edge]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prufed.cli.help import HelpFormatter

SPEEDUP_TARGET = 2.0
LOSS_RATIO_TARGET = 1.02
PATHS = {  # name -> TrainConfig fields
    "fp32": {"quant": "fp32", "length_grouped": False, "trained_positions_loss": False},
    "default": {"quant": "auto", "length_grouped": True, "trained_positions_loss": True},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                     epilog="example: python scripts/bench_edge.py --depths 30,20,10 --steps 50 "
                                     "--threads 2")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or local HF directory")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/alpaca_5000.json"),
                        help="Alpaca JSON/JSONL file (relative to the working directory)")
    parser.add_argument("--examples", type=int, default=800,
                        help="records of --data used (the first N; 10%% held out by the seeded split)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out examples scored after training")
    parser.add_argument("--depths", default="30,20,10", help="comma-separated kept depths")
    parser.add_argument("--strategy", default="top", help="pruning strategy")
    parser.add_argument("--seq-len", type=int, default=256, help="max tokens per example")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_edge"), help="output directory")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one run -> JSON
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, choices=tuple(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("examples", "heldout", "steps", "seq_len", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    return args


def worker(args) -> None:
    """Train one (depth, path) in this process and write its measurements to args.worker."""
    import torch

    from edge_client.train import TrainConfig, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(model=args.model, depth=args.depth, strategy=args.strategy, data=str(args.data),
                         max_examples=args.examples, eval_fraction=0.1, max_eval_examples=args.heldout,
                         max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         checkpoint_every=0, verbose=False, **PATHS[args.path])
    with tempfile.TemporaryDirectory() as out:
        metrics = train_local(config, out).metrics
    if metrics["eval_after"] is None:
        raise SystemExit(f"no held-out example of {args.data} fits --seq-len {args.seq_len}; raise --examples")
    args.worker.write_text(json.dumps({
        "depth": metrics["depth"], "path": args.path, "quant": metrics["quant"],
        "precision": metrics["precision"], "batching": metrics["batching"],
        "loss_positions": metrics["loss_positions"], "device": metrics["device"],
        "steps": metrics["steps"], "train_tokens": metrics["train_tokens"],
        "train_seconds": metrics["train_seconds"], "tokens_per_s": metrics["tokens_per_s"],
        "train_cpu_seconds": metrics["train_cpu_seconds"],
        "tokens_per_cpu_s": metrics["train_tokens"] / max(metrics["train_cpu_seconds"], 1e-9),
        "step_s": metrics["step_time_s"], "heldout_loss": metrics["eval_after"]["loss"],
        "heldout_loss_before": metrics["eval_before"]["loss"], "heldout_tokens": metrics["eval_after"]["tokens"],
        "peak_rss_bytes": metrics["peak_rss_bytes"], "torch_threads": torch.get_num_threads(),
    }))


def run_one(args, depth: int, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", str(result), "--depth", str(depth), "--path", path,
                   "--model", args.model, "--data", str(args.data), "--examples", str(args.examples),
                   "--heldout", str(args.heldout), "--strategy", args.strategy, "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
                   "--threads", str(args.threads)]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"depth {depth} {path} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(result.read_text())
        row["wall_s"] = time.perf_counter() - started
        return row


def compare(rows: list[dict]) -> list[dict]:
    """Per depth: speedup (default / fp32 trained tok/s) and loss ratio (default / fp32 held-out loss)."""
    out = []
    for depth in sorted({row["depth"] for row in rows}, reverse=True):
        base = next(r for r in rows if r["depth"] == depth and r["path"] == "fp32")
        new = next(r for r in rows if r["depth"] == depth and r["path"] == "default")
        speedup = new["tokens_per_s"] / base["tokens_per_s"]
        loss_ratio = new["heldout_loss"] / base["heldout_loss"]
        out.append({"depth": depth, "speedup": speedup, "speedup_ok": speedup >= SPEEDUP_TARGET,
                    "speedup_cpu_time": new["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
                    "loss_ratio": loss_ratio, "loss_ok": loss_ratio <= LOSS_RATIO_TARGET})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    from edge_client.core.pruning import make_plan
    from edge_client.model import materialize_pruned, num_layers_of
    from prufed.common.models import resolve_model

    full = num_layers_of(resolve_model(args.model))
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    for depth in depths:  # convert/prune outside the timed subprocesses
        materialize_pruned(args.model, make_plan(args.strategy, full, depth, source_model=args.model))
    rows = []
    for depth in depths:
        for path in PATHS:
            row = run_one(args, depth, path)
            rows.append(row)
            print(f"  depth {depth} {path}: {row['tokens_per_s']:.1f} trained tok/s, held-out loss "
                  f"{row['heldout_loss']:.4f} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    ratios = compare(rows)

    settings = {"model": args.model, "data": str(args.data), "examples": args.examples, "heldout": args.heldout,
                "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "lr": args.lr,
                "strategy": args.strategy, "threads": args.threads, "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(), "paths": PATHS,
                "targets": {"speedup": SPEEDUP_TARGET, "loss_ratio": LOSS_RATIO_TARGET}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_edge.json").write_text(json.dumps({"settings": settings, "rows": rows, "ratios": ratios},
                                                         indent=2) + "\n")
    print(f"bench_edge: {args.model}, {args.data.name} ({args.examples} records), seq-len {args.seq_len}, batch "
          f"{args.batch_size}, {args.steps} steps, {args.threads} threads; load average after "
          f"{settings['load_average'][0]:.1f}")
    header = (f"{'depth':>5} {'path':<8}{'quant':<6}{'s/step':>8}{'trained tok/s':>15}{'tok/CPU-s':>11}"
              f"{'held-out loss':>15}{'peak RSS MiB':>14}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['depth']:>5} {row['path']:<8}{row['quant']:<6}{row['step_s']:>8.2f}{row['tokens_per_s']:>15.1f}"
              f"{row['tokens_per_cpu_s']:>11.1f}{row['heldout_loss']:>15.4f}{row['peak_rss_bytes'] / 2**20:>14.0f}")
    print(f"\n{'depth':>5}{'speedup (target >= ' + format(SPEEDUP_TARGET, '.1f') + ')':>28}{'in CPU time':>13}"
          f"{'loss ratio (target <= ' + format(LOSS_RATIO_TARGET, '.2f') + ')':>30}")
    for item in ratios:
        print(f"{item['depth']:>5}{item['speedup']:>27.2f}{'' if item['speedup_ok'] else '!'}"
              f"{item['speedup_cpu_time']:>12.2f}{item['loss_ratio']:>30.4f}{'' if item['loss_ok'] else '!'}")
    print(f"('!' = target missed); wrote {args.out / 'bench_edge.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
