"""Benchmark: the planner's depth per hardware profile, and measured training speed and memory per depth here.

  python scripts/bench_hardware_profiles.py                     # default model, depths 30,20,10
  python scripts/bench_hardware_profiles.py --smoke             # tiny random model, seconds

Part 1 (pure estimate): for every shipped hardware profile, `choose_depth` and the `estimate_memory` breakdown for
the default model and for LLaMA-2-7B (seq/batch as given, the profile's accelerator and default quant).
Part 2 (measured on THIS machine): one subprocess per depth loads the pruned model (--quant), attaches LoRA and
runs --steps optimizer steps of --batch x --seq-len tokens; it reports
  tokens/s = batch * seq_len * timed_steps / seconds   (the first step is warm-up and not timed)
  peak RSS = ru_maxrss of that subprocess (bytes), beside the planner's estimate for the same depth.
Each measured row's ratio columns compare against the full-depth row measured in the same run (the baseline).
Writes results.csv (measured), profiles.csv (planned), results.json and chart.png under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL

MEASURED_COLUMNS = ("depth", "quant", "tokens_per_s", "step_seconds", "peak_rss_mib", "estimate_mib",
                    "speed_vs_full", "rss_vs_full")
PLANNED_COLUMNS = ("profile", "model", "quant", "budget_mib", "chosen_depth", "total_mib", "breakdown")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="example: python scripts/bench_hardware_profiles.py --depths 30,15")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--depths", default="30,20,10", help="depths measured on this machine")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per depth (first one untimed)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--quant", default="fp32", help="weights: auto, nf4, int8, bf16 or fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in each subprocess (0 = default)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_hardware"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, depths 8,4, 2 steps")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--measure-one", type=int, default=None, help=argparse.SUPPRESS)  # subprocess entry
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from edge_client.model import check_quant_available
    from edge_client.planning import auto_quant_candidates, device_spec
    from prufed.common.errors import ConfigError

    if args.smoke:
        args.steps, args.seq_len = 2, 32
        args.depths = args.depths if args.depths != "30,20,10" else "8,4"
    try:
        args.depth_list = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise ConfigError("--depths", f"must be comma-separated integers, got {args.depths!r}") from None
    if not args.depth_list:
        raise ConfigError("--depths", "needs at least one depth")
    for flag in ("steps", "batch", "seq_len"):
        if getattr(args, flag) < (2 if flag == "steps" else 1):
            raise ConfigError("--" + flag.replace("_", "-"), f"too small: {getattr(args, flag)}")
    if args.quant == "auto":  # this machine's fastest precision (edge_client.planning's rule at full depth)
        args.quant = auto_quant_candidates(device_spec())[0]
    check_quant_available(args.quant)
    return args


def measure_one(args: argparse.Namespace) -> dict:
    """In the subprocess: train `args.steps` steps at depth `args.measure_one`; print one JSON line."""
    import resource

    import torch

    from edge_client.core.pruning import make_plan
    from edge_client.model import attach_lora, load_model_dir, materialize_pruned, num_layers_of

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    num_layers = num_layers_of(model_dir)
    plan = make_plan("top", num_layers, args.measure_one)
    pruned_dir = model_dir if args.measure_one == num_layers else materialize_pruned(str(model_dir), plan)
    model, _ = load_model_dir(pruned_dir, args.quant)
    model = attach_lora(model, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    model.train()
    timed = 0.0
    for step in range(args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=generator)
        tick = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # step 0 pays for lazy allocations
            timed += time.perf_counter() - tick
    steps = args.steps - 1
    return {"depth": args.measure_one, "quant": args.quant, "step_seconds": timed / steps,
            "tokens_per_s": args.batch * args.seq_len * steps / timed,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def llama2_7b_config() -> dict:
    """LLaMA-2-7B's config.json values, shipped (no weights) in edge_client/builtin_configs."""
    import edge_client

    return json.loads((Path(edge_client.__file__).parent / "builtin_configs" / "llama-2-7b.json").read_text())


def planner_rows(model_configs: dict[str, dict], setup) -> list[dict]:
    """Per profile and model: `edge_client.planning.plan_training` under `setup` on the profile (its accelerator,
    unified memory and default quant), the planner `prufed plan` uses."""
    from edge_client.core.memory import BudgetTooSmall
    from edge_client.hardware_profiles import load_profiles
    from edge_client.planning import device_spec, plan_training

    rows = []
    for name, profile in sorted(load_profiles().items()):
        spec = device_spec(name)
        for model_name, config in model_configs.items():
            try:
                planned = plan_training(config, spec, setup, quant="auto", depth="auto")
                depth, breakdown = planned.depth, planned.breakdown
            except BudgetTooSmall:
                depth, breakdown = 0, None  # not even one layer fits this budget
            rows.append({"profile": name, "model": model_name, "quant": profile.default_quant,
                         "budget_mib": round(profile.budget_bytes / 2**20),
                         "chosen_depth": depth, "total_mib": round(breakdown.total_bytes / 2**20) if breakdown else "",
                         "breakdown": json.dumps({k: round(v, 1) for k, v in breakdown.mib().items()})
                         if breakdown else ""})
    return rows


def render_chart(path: Path, measured: list[dict], planned: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    depths = [r["depth"] for r in measured]
    left.plot(depths, [r["tokens_per_s"] for r in measured], marker="o", label="tokens/s (measured)")
    left.set_xlabel("layers kept")
    left.set_ylabel("training tokens/s")
    twin = left.twinx()
    twin.plot(depths, [r["peak_rss_mib"] for r in measured], marker="s", color="C1", label="peak RSS MiB")
    if all(r["estimate_mib"] != "" for r in measured):
        twin.plot(depths, [r["estimate_mib"] for r in measured], ls="--", color="C2", label="planner estimate MiB")
    twin.set_ylabel("MiB")
    left.set_title("this machine")
    twin.legend(fontsize=7, loc="lower right")
    models = sorted({r["model"] for r in planned})
    profiles = sorted({r["profile"] for r in planned})
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        values = [next((r["chosen_depth"] for r in planned if r["profile"] == p and r["model"] == model), 0)
                  for p in profiles]
        right.barh([i + j * width for i in range(len(profiles))], values, width, label=model)
    right.set_yticks([i + width * (len(models) - 1) / 2 for i in range(len(profiles))], profiles, fontsize=7)
    right.set_xlabel("planned depth (layers)")
    right.set_title("planner per hardware profile")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        if args.measure_one is not None:
            print(json.dumps(measure_one(args)))
            return 0
        return run(args)

    return common.run_cli(body)


def run(args: argparse.Namespace) -> int:
    from edge_client.core.memory import TrainingSetup, estimate_memory
    from prufed.common.errors import ConfigError, PrufedError
    from prufed.common.models import read_model_config

    started = time.time()
    model_dir = common.model_dir_for(args)
    config = read_model_config(model_dir)
    num_layers = int(config["num_hidden_layers"])
    if any(not 1 <= d <= num_layers for d in args.depth_list):
        raise ConfigError("--depths", f"must lie in [1, {num_layers}], got {args.depth_list}")
    setup = TrainingSetup(seq_len=args.seq_len, batch=args.batch, quant=args.quant, gradient_checkpointing=False)
    model_name = "tiny-random" if args.smoke else (args.model or "smollm2-135m")
    planned = planner_rows({model_name: config, "llama-2-7b": llama2_7b_config()}, setup)

    measured = []
    advance, close = common.progress(len(args.depth_list), "depths")
    try:
        for depth in sorted(args.depth_list, reverse=True):
            command = [sys.executable, __file__, "--measure-one", str(depth), "--model-dir", str(model_dir),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                       "--quant", args.quant, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise PrufedError(f"measuring depth {depth} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            try:
                estimate = round(estimate_memory(config, depth, setup).total_bytes / 2**20)
            except PrufedError:
                estimate = ""
            measured.append(row | {"peak_rss_mib": round(row.pop("peak_rss_bytes") / 2**20), "estimate_mib": estimate})
            advance()
    finally:
        close()
    full = measured[0]  # the deepest depth measured is the baseline
    for row in measured:
        row["speed_vs_full"] = round(row["tokens_per_s"] / full["tokens_per_s"], 3)
        row["rss_vs_full"] = round(row["peak_rss_mib"] / full["peak_rss_mib"], 3)
        row["tokens_per_s"], row["step_seconds"] = round(row["tokens_per_s"], 1), round(row["step_seconds"], 3)

    common.write_csv(args.out / "results.csv", measured, MEASURED_COLUMNS)
    common.write_csv(args.out / "profiles.csv", planned, PLANNED_COLUMNS)
    render_chart(args.out / "chart.png", measured, planned)
    text = "\n".join([
        f"# Planner per profile (seq {args.seq_len}, batch {args.batch}, quant {args.quant})", "",
        common.markdown_table(PLANNED_COLUMNS[:-1], [[r[c] for c in PLANNED_COLUMNS[:-1]] for r in planned]), "",
        f"# Measured here (baseline: depth {full['depth']}, same run)", "",
        common.markdown_table(MEASURED_COLUMNS, [[r[c] for c in MEASURED_COLUMNS] for r in measured]), ""])
    (args.out / "table.md").write_text(text, encoding="utf-8")
    out = {"measured": measured, "planned": planned, "wall_seconds": round(time.time() - started, 1),
           "versions": common.versions(), "setup": {"seq_len": args.seq_len, "batch": args.batch, "quant": args.quant}}
    (args.out / "results.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(json.dumps(out) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
