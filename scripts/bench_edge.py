"""Edge training benchmark: step time, tokens/s and peak memory of LoRA training at several depths, NF4 vs not.

Every (depth, quant) configuration runs `edge_client.train.train_local` in a FRESH subprocess, so the peak RSS
(ru_maxrss, whole process: load + train) belongs to that configuration alone; on a GPU the peak is
torch.cuda.max_memory_allocated over the training steps. Examples are KJV passages long enough that every
sequence is cut to exactly --seq-len tokens, so every step does the same work.

Reported per configuration:
  step_s          median seconds per optimizer step after --warmup steps
  tokens_per_s    batch · seq_len / step_s
  peak_mib        measured peak (RSS on CPU, max_memory_allocated on CUDA)
  pred/meas       edge_client.core.memory.estimate_memory(...).total_bytes / measured peak   (target 0.85..1.15)
  step ratio      step_s(d) / step_s(L) for the same quant mode       (target <= d/L + 0.15)

Usage: python scripts/bench_edge.py [--depths 30,20,15,10] [--quants nf4,fp32] [--steps 6] [--out runs/bench_edge]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prufed.cli.help import HelpFormatter

PLANNER_TOLERANCE = 0.15
STEP_SLACK = 0.15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="example: python scripts/bench_edge.py --depths 30,15 --quants nf4 --steps 4")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or local HF directory")
    parser.add_argument("--depths", default="30,20,15,10", help="comma-separated kept depths (the first full depth "
                        "present is the baseline; the model's full depth is added when missing)")
    parser.add_argument("--quants", default="nf4,fp32", help="comma-separated quant modes (nf4, int8, bf16, fp32)")
    parser.add_argument("--strategy", default="top", help="pruning strategy")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=1, help="examples per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_edge"), help="output directory")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one config -> JSON
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quant", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def bench_examples(count: int):
    """Passages of ~1,500 characters (>300 tokens): every example fills --seq-len after truncation."""
    from edge_client.corpus import passages
    from edge_client.data import InstructionExample

    return [InstructionExample("Continue the passage.", "", text) for text in passages("train", count, max_chars=1500)]


def worker(args) -> None:
    """Train one configuration in this process and write its measurements to args.worker."""
    import torch

    from edge_client.train import TrainConfig, train_local

    stamps: list[float] = []
    total = args.warmup + args.steps
    config = TrainConfig(model=args.model, depth=args.depth, strategy=args.strategy, quant=args.quant,
                         max_steps=total, seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r,
                         eval_fraction=0.0, checkpoint_every=0, warmup_steps=0, verbose=False)
    with tempfile.TemporaryDirectory() as out:
        stamps.append(time.perf_counter())
        result = train_local(config, out, examples=bench_examples(total * args.batch_size),
                             on_step=lambda step, loss: stamps.append(time.perf_counter()))
    # stamps[0] precedes loading; stamps[i] ends step i. Step i (1-based) lasts stamps[i] - stamps[i-1], i >= 2.
    step_times = [stamps[i] - stamps[i - 1] for i in range(args.warmup + 1, total + 1)]
    if args.warmup == 0:  # the first step's start is unknown: fall back to the training loop's own clock
        step_times.insert(0, result.metrics["train_seconds"] - sum(step_times))
    metrics = result.metrics
    cuda = metrics["cuda_max_allocated_bytes"]
    args.worker.write_text(json.dumps({
        "depth": metrics["depth"], "source_num_layers": metrics["source_num_layers"], "quant": metrics["quant"],
        "device": metrics["device"], "step_s": statistics.median(step_times), "step_times_s": step_times,
        "peak_rss_bytes": metrics["peak_rss_bytes"], "cuda_max_allocated_bytes": cuda,
        "peak_bytes": cuda if cuda else metrics["peak_rss_bytes"],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }))


def predicted_bytes(model_config: dict, depth: int, quant: str, args, accelerator: str) -> int:
    from edge_client.core.memory import TrainingSetup, estimate_memory

    setup = TrainingSetup(seq_len=args.seq_len, batch=args.batch_size, lora_r=args.lora_r, quant=quant,
                          gradient_checkpointing=True, accelerator=accelerator)
    return estimate_memory(model_config, depth, setup).total_bytes


def run_config(args, depth: int, quant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", str(result), "--depth", str(depth), "--quant", quant,
                   "--model", args.model, "--strategy", args.strategy, "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--lora-r", str(args.lora_r)]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"depth {depth} {quant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(result.read_text())
        row["wall_s"] = time.perf_counter() - started
        return row


def plot(rows: list[dict], path: Path, full_depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fractions = sorted({row["depth"] / full_depth for row in rows})
    left.plot(fractions, [f + STEP_SLACK for f in fractions], "k--", label="target d/L + 0.15")
    for quant in dict.fromkeys(row["quant"] for row in rows):
        mine = sorted((row for row in rows if row["quant"] == quant), key=lambda row: row["depth"])
        left.plot([r["depth"] / full_depth for r in mine], [r["step_ratio"] for r in mine], "o-", label=quant)
        right.plot([r["depth"] for r in mine], [r["peak_bytes"] / 2**20 for r in mine], "o-", label=f"{quant} measured")
        right.plot([r["depth"] for r in mine], [r["predicted_bytes"] / 2**20 for r in mine], "x:",
                   label=f"{quant} planner")
    left.set(xlabel="kept depth d / L", ylabel="step time / full-depth step time", title="step time")
    right.set(xlabel="kept depth d", ylabel="peak memory (MiB)", title="peak memory vs planner")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    import torch

    from edge_client.core.pruning import make_plan
    from edge_client.model import materialize_pruned, num_layers_of
    from prufed.common.models import read_model_config, resolve_model

    base = resolve_model(args.model)
    full = num_layers_of(base)
    model_config = read_model_config(base)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    if full not in depths:
        depths.insert(0, full)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    for depth in depths:  # convert/prune outside the timed subprocesses
        materialize_pruned(args.model, make_plan(args.strategy, full, depth, source_model=args.model))

    rows = []
    for quant in quants:
        for depth in sorted(depths, reverse=True):
            row = run_config(args, depth, quant)
            row["predicted_bytes"] = predicted_bytes(model_config, depth, quant, args, accelerator)
            row["pred_over_measured"] = row["predicted_bytes"] / row["peak_bytes"]
            row["tokens_per_s"] = args.batch_size * args.seq_len / row["step_s"]
            rows.append(row)
            print(f"  {quant} depth {depth}: {row['step_s']:.3f} s/step, peak {row['peak_bytes'] / 2**20:.0f} MiB "
                  f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    for row in rows:
        baseline = next(r for r in rows if r["quant"] == row["quant"] and r["depth"] == full)
        row["step_ratio"] = row["step_s"] / baseline["step_s"]
        row["step_target"] = row["depth"] / full + STEP_SLACK
        row["step_ok"] = row["step_ratio"] <= row["step_target"]
        row["planner_ok"] = abs(row["pred_over_measured"] - 1) <= PLANNER_TOLERANCE

    args.out.mkdir(parents=True, exist_ok=True)
    columns = ["quant", "depth", "step_s", "tokens_per_s", "peak_bytes", "predicted_bytes", "pred_over_measured",
               "planner_ok", "step_ratio", "step_target", "step_ok", "device"]
    with open(args.out / "bench_edge.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    meta = {"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "lora_r": args.lora_r, "strategy": args.strategy, "accelerator": accelerator,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    (args.out / "bench_edge.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out / "bench_edge.png", full)

    peak_name = "peak MiB (CUDA alloc)" if accelerator == "cuda" else "peak RSS MiB"
    header = (f"{'quant':<6}{'depth':>6}{'s/step':>9}{'tok/s':>9}{peak_name:>22}{'planner MiB':>13}"
              f"{'pred/meas':>11}{'step ratio':>12}{'target':>8}")
    print(f"bench_edge: {args.model}, seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, {accelerator}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['quant']:<6}{row['depth']:>6}{row['step_s']:>9.3f}{row['tokens_per_s']:>9.1f}"
              f"{row['peak_bytes'] / 2**20:>22.0f}{row['predicted_bytes'] / 2**20:>13.0f}"
              f"{row['pred_over_measured']:>10.2f}{'' if row['planner_ok'] else '!'}"
              f"{row['step_ratio']:>11.2f}{'' if row['step_ok'] else '!'}{row['step_target']:>9.2f}")
    print(f"('!' = outside target: planner within ±{PLANNER_TOLERANCE:.0%}, step ratio <= d/L + {STEP_SLACK}); "
          f"wrote {args.out}/bench_edge.csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
