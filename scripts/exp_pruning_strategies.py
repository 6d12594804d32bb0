"""Experiment 1: which layer-pruning strategy is best, per task, before and after a fixed LoRA budget.

  python scripts/exp_pruning_strategies.py --alpaca ../shared/data/alpaca_5000.json \\
      --gsm8k ../shared/data/gsm8k_train.jsonl --depths 20,15 --seeds 3
  python scripts/exp_pruning_strategies.py --smoke          # tiny random model + demo data, seconds

For every strategy x depth (layers kept of the model's L) x task: the held-out masked loss (nats per answer token)
and perplexity exp(loss) BEFORE fine-tuning, then for each seed a fresh LoRA (r, alpha) trained for exactly
--steps AdamW steps of --batch-size examples (the seed picks the LoRA init, dropout and batch order) and evaluated
AFTER. GSM8K also gets exact match of the number after '####' in a greedy completion on --gen test questions
(after fine-tuning, and for the unpruned reference; only the latter with --gen-reference-only). Without
--alpaca/--gsm8k both tasks use the built-in demo data. Writes results.csv, results.json, table.md and chart.png
under --out. "Best" = lowest mean after-loss; the overall ranking is the average over (task, depth) of each
strategy's rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL

COLUMNS = ("strategy", "depth", "task", "phase", "seed", "loss", "perplexity", "tokens", "exact_match", "steps",
           "train_loss_last", "seconds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="example: python scripts/exp_pruning_strategies.py --smoke")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--strategies", default="all", help="comma-separated strategies, or 'all'")
    parser.add_argument("--depths", default="20,15", help="comma-separated numbers of layers to keep")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per cell (0..N-1)")
    parser.add_argument("--steps", type=int, default=16, help="LoRA optimizer steps per fine-tune (the fixed budget)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the LoRA factors")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, targets q_proj,v_proj)")
    parser.add_argument("--max-len", type=int, default=192, help="tokens per example (prompt + answer), truncated")
    parser.add_argument("--heldout", type=int, default=32, help="held-out examples scored per task")
    parser.add_argument("--gen", type=int, default=8, help="GSM8K questions answered by greedy generation (0 = skip)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per GSM8K question")
    parser.add_argument("--gen-reference-only", action="store_true",
                        help="GSM8K exact match for the unpruned model only (generation is slow on a CPU)")
    parser.add_argument("--alpaca", default=None, help="Alpaca JSON (instruction/input/output); default: demo data")
    parser.add_argument("--gsm8k", default=None, help="GSM8K train jsonl; default: demo data")
    parser.add_argument("--gsm8k-test", default=None, help="GSM8K test jsonl (default: --gsm8k with train->test)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_pruning"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, demo data, 1 seed, 2 steps")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    args = parser.parse_args(argv)
    from edge_client.core.pruning import STRATEGIES
    from prufed.common.errors import ConfigError

    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.heldout, args.gen, args.max_new_tokens = 1, 2, 2, 4, 2, 8
        args.max_len, args.alpaca, args.gsm8k = 512, None, None
        args.depths = args.depths if args.depths != "20,15" else "6,4"
    args.strategy_list = list(STRATEGIES) if args.strategies == "all" else [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategy_list if s not in STRATEGIES]
    if unknown or not args.strategy_list:
        raise ConfigError("--strategies", f"unknown {unknown}; choose from {', '.join(STRATEGIES)} or 'all'")
    try:
        args.depth_list = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise ConfigError("--depths", f"must be comma-separated integers, got {args.depths!r}") from None
    for flag in ("seeds", "steps", "batch_size", "lora_r", "heldout"):
        if getattr(args, flag) < 1:
            raise ConfigError("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    if args.max_len < 8:
        raise ConfigError("--max-len", f"must be >= 8, got {args.max_len}")
    if args.gen < 0 or args.max_new_tokens < 1 or not args.lr > 0:
        raise ConfigError("--gen/--max-new-tokens/--lr", "must be >= 0, >= 1 and > 0")
    if args.gsm8k and not args.gsm8k_test:
        args.gsm8k_test = args.gsm8k.replace("train", "test")
    for flag in ("alpaca", "gsm8k", "gsm8k_test"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ConfigError("--" + flag.replace("_", "-"), f"no such file: {path}")
    return args


def summarize(rows: list[dict], strategies: list[str], depths: list[int], tasks: list[str]) -> dict:
    """Mean ± std per cell, best strategy per (task, depth) and per task, and the rank-average over all."""
    cells: dict = {}
    for row in rows:
        key = (row["strategy"], int(row["depth"]), row["task"], row["phase"])
        cells.setdefault(key, []).append(row)
    stats = {}
    for key, group in cells.items():
        stats[key] = {m: common.mean_std(float(r[m]) for r in group if r[m] != "")
                      for m in ("loss", "perplexity", "exact_match")}
    ranks: dict[str, list[int]] = {s: [] for s in strategies}
    best_per_cell = {}
    for task in tasks:
        for depth in depths:
            order = sorted(strategies, key=lambda s: stats[(s, depth, task, "after")]["loss"][0])
            best_per_cell[f"{task}@{depth}"] = order[0]
            for rank, strategy in enumerate(order, start=1):
                ranks[strategy].append(rank)
    best_per_task = {}
    for task in tasks:
        task_rank = {s: sum(sorted(strategies, key=lambda x: stats[(x, d, task, "after")]["loss"][0]).index(s)
                            for d in depths) for s in strategies}
        best_per_task[task] = min(strategies, key=lambda s: (task_rank[s], s))
    rank_average = {s: sum(r) / len(r) for s, r in ranks.items()}
    overall = sorted(strategies, key=lambda s: (rank_average[s], s))
    return {"stats": stats, "best_per_cell": best_per_cell, "best_per_task": best_per_task,
            "rank_average": rank_average, "best_overall": overall[0], "ranking": overall}


def render_table(summary: dict, strategies: list[str], depths: list[int], tasks: list[str],
                 reference: dict, args: argparse.Namespace) -> str:
    stats = summary["stats"]
    parts = [f"# Pruning strategies ({args.seeds} seeds, {args.steps} LoRA steps x batch {args.batch_size})", ""]
    for task in tasks:
        header = ["strategy"] + [f"d={d} before" for d in depths] + [f"d={d} after" for d in depths]
        em_columns = task == "gsm8k" and args.gen and not args.gen_reference_only
        if em_columns:
            header += [f"d={d} EM after" for d in depths]
        body = []
        for s in strategies:
            row = [s] + [common.fmt(*stats[(s, d, task, "before")]["loss"][:2]) for d in depths]
            row += [common.fmt(*stats[(s, d, task, "after")]["loss"][:2]) for d in depths]
            if em_columns:
                row += [common.fmt(*stats[(s, d, task, "after")]["exact_match"][:2], digits=2) for d in depths]
            body.append(row)
        ref = reference[task]
        parts += [f"## {task}: held-out masked loss (nats/token), mean ± std",
                  f"Unpruned reference (before fine-tuning): loss {ref['loss']:.3f}, ppl {ref['perplexity']:.1f}"
                  + (f", EM {ref['exact_match']:.2f}" if ref.get("exact_match", "") != "" else ""), "",
                  common.markdown_table(header, body), ""]
    parts += ["## Best strategy (lowest mean after-loss)", "",
              common.markdown_table(["task@depth", "best"], sorted(summary["best_per_cell"].items())), "",
              common.markdown_table(["task", "best (rank sum over depths)"], sorted(summary["best_per_task"].items())),
              "", "Rank average over every (task, depth), 1 = best:", "",
              common.markdown_table(["strategy", "mean rank"],
                                    [(s, f"{summary['rank_average'][s]:.2f}") for s in summary["ranking"]]), ""]
    return "\n".join(parts)


def render_chart(path: Path, summary: dict, strategies: list[str], depths: list[int], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary["stats"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    width = 0.8 / len(depths)
    for ax, task in zip(axes[0], tasks):
        for j, depth in enumerate(depths):
            xs = [i + (j - (len(depths) - 1) / 2) * width for i in range(len(strategies))]
            after = [stats[(s, depth, task, "after")]["loss"] for s in strategies]
            before = [stats[(s, depth, task, "before")]["loss"][0] for s in strategies]
            ax.bar(xs, [a[0] for a in after], width, yerr=[a[1] for a in after], capsize=2, label=f"{depth} layers, after")
            ax.scatter(xs, before, marker="_", s=80, color="k", zorder=3, label="before" if j == 0 else None)
        ax.set_xticks(range(len(strategies)), strategies, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_client.core.pruning import SCORED_STRATEGIES, make_plan
    from edge_client.layer_scores import calibration_passages, compute_layer_scores
    from edge_client.model import attach_lora, load_base_model
    from prufed.common.errors import ConfigError

    started = time.time()
    model_dir = common.model_dir_for(args)
    base, tokenizer = load_base_model(model_dir)
    pad_id = tokenizer.pad_token_id
    num_layers = len(base.model.layers)
    bad = [d for d in args.depth_list if not 1 <= d <= num_layers]
    if bad:
        raise ConfigError("--depths", f"must lie in [1, {num_layers}], got {bad}")
    scores = None
    if any(s in SCORED_STRATEGIES for s in args.strategy_list):
        common.log("scoring layers on calibration text ...")
        scores = compute_layer_scores(base, tokenizer, calibration_passages(),
                                      block_sizes={num_layers - d for d in args.depth_list if d < num_layers})
    tasks = {}
    for name in common.TASKS:
        data = common.load_task(name, alpaca=args.alpaca, gsm8k_train=args.gsm8k, gsm8k_test=args.gsm8k_test,
                                heldout=args.heldout, generate=args.gen)
        pool = data.train[: max(args.steps * args.batch_size * 8, 64)]
        tasks[name] = (data, common.tokenize(pool, tokenizer, args.max_len),
                       common.tokenize(data.heldout, tokenizer, args.max_len))
    task_names = list(tasks)

    rows: list[dict] = []
    reference = {}
    for name, (data, _, held_rows) in tasks.items():
        result = common.evaluate_rows(base, held_rows, pad_id)
        em = common.exact_match(base, tokenizer, data.generate, args.max_new_tokens) if name == "gsm8k" and args.gen else ""
        reference[name] = {**result.to_json_dict(), "exact_match": em}
        rows.append({"strategy": "unpruned", "depth": num_layers, "task": name, "phase": "before", "seed": "",
                     **result.to_json_dict(), "exact_match": em, "steps": 0, "train_loss_last": "", "seconds": ""})

    cells = len(args.depth_list) * len(args.strategy_list) * len(tasks) * (1 + args.seeds)
    advance, close = common.progress(cells, "strategies")
    try:
        for depth in args.depth_list:
            for strategy in args.strategy_list:
                plan = make_plan(strategy, num_layers, depth, scores=scores, source_model=str(model_dir))
                pruned = common.pruned_copy(base, plan.kept_layers)
                for name, (data, train_rows, held_rows) in tasks.items():
                    tick = time.time()
                    result = common.evaluate_rows(pruned, held_rows, pad_id)
                    rows.append({"strategy": strategy, "depth": depth, "task": name, "phase": "before", "seed": "",
                                 **result.to_json_dict(), "exact_match": "", "steps": 0, "train_loss_last": "",
                                 "seconds": round(time.time() - tick, 2)})
                    advance()
                    for seed in range(args.seeds):
                        tick = time.time()
                        torch.manual_seed(seed)
                        model = attach_lora(copy.deepcopy(pruned), r=args.lora_r, alpha=2 * args.lora_r)
                        losses = common.finetune(model, train_rows, steps=args.steps, batch_size=args.batch_size,
                                                 lr=args.lr, seed=seed, pad_id=pad_id)
                        result = common.evaluate_rows(model, held_rows, pad_id)
                        em = (common.exact_match(model, tokenizer, data.generate, args.max_new_tokens)
                              if name == "gsm8k" and args.gen and not args.gen_reference_only else "")
                        rows.append({"strategy": strategy, "depth": depth, "task": name, "phase": "after",
                                     "seed": seed, **result.to_json_dict(), "exact_match": em, "steps": args.steps,
                                     "train_loss_last": round(losses[-1], 4), "seconds": round(time.time() - tick, 2)})
                        common.log(f"{strategy} d={depth} {name} seed={seed}: loss {result.loss:.3f} em {em} "
                                   f"({time.time() - tick:.0f}s)")
                        advance()
                        del model
                # Partial results survive an interrupted run.
                common.write_csv(args.out / "results.csv", rows, COLUMNS)
    finally:
        close()

    summary = summarize([r for r in rows if r["strategy"] != "unpruned"], args.strategy_list, args.depth_list,
                        task_names)
    ems = [float(r["exact_match"]) for r in rows if r["exact_match"] != "" and float(r["exact_match"]) == float(r["exact_match"])]
    em_note = ("GSM8K exact match is ~0 for every model" if ems and max(ems) < 0.05 else
               "GSM8K exact match is not ~0 for every model" if ems else "GSM8K exact match not measured")
    table = render_table(summary, args.strategy_list, args.depth_list, task_names, reference, args)
    table += f"\n{em_note}" + (f" (max {max(ems):.3f} over {len(ems)} evaluations).\n" if ems else ".\n")
    elapsed = time.time() - started
    table += f"\nWall time: {elapsed / 60:.1f} min; versions: {common.versions()}\n"
    common.write_csv(args.out / "results.csv", rows, COLUMNS)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    render_chart(args.out / "chart.png", summary, args.strategy_list, args.depth_list, task_names)
    out = {"config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out),
                                                                             "model_dir": str(model_dir)},
           "reference": reference, "best_per_cell": summary["best_per_cell"], "best_per_task": summary["best_per_task"],
           "rank_average": summary["rank_average"], "best_overall": summary["best_overall"], "em_note": em_note,
           "wall_seconds": round(elapsed, 1), "versions": common.versions()}
    (args.out / "results.json").write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    print(json.dumps(out, default=str) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
