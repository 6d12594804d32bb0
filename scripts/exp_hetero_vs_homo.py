"""Experiment 2: heterogeneous HeteAgg (PruFed) against homogeneous FedAvg within each depth group.

  python scripts/exp_hetero_vs_homo.py --alpaca ../shared/data/alpaca_5000.json --depths 30,20,10 --seeds 3
  python scripts/exp_hetero_vs_homo.py --smoke            # tiny random model + demo data, seconds

Clients fall into depth groups (--depths, --clients-per-depth each), pruned with --strategy. The train pool is split
non-IID once (Dirichlet(--alpha) over example categories, --partition-seed), so every run sees identical client
data. Each seed s fixes the initial global adapter (`initial_global_adapter(..., seed=s)`), LoRA dropout and
batch order, identical across runs:
  heteagg-<space>  one full-depth global adapter; every client trains its kept slice for --local-steps, uploads
                   delta = local - global (ORIGINAL layer keys); HeteAggregator(mode="heteagg", space) merges all.
  fedavg           a separate global per depth group, merged with HeteAggregator(mode="fedavg") over that group only.
  local-only       (--local-only) each client trains alone for rounds x local-steps; the depth's mean is reported.
After every round, each depth's global slice is loaded into that depth's pruned model and scored on held-out data
(masked loss, perplexity exp(loss)). Aggregation is the server's own code (aggregator.core.heteagg).
Writes results.csv, results.json, table.md and curves.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL

COLUMNS = ("run", "depth", "round", "seed", "loss", "perplexity", "tokens", "exact_match", "clients", "seconds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="example: python scripts/exp_hetero_vs_homo.py --smoke --local-only")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--depths", default="30,20,10", help="comma-separated layers kept, one group per depth")
    parser.add_argument("--strategy", default=None,
                        help="pruning strategy (default: best_overall of --pruning-results, else 'top')")
    parser.add_argument("--pruning-results", type=Path, default=Path("runs/exp_pruning/results.json"),
                        help="experiment 1's results.json, read for the default --strategy")
    parser.add_argument("--clients-per-depth", type=int, default=2, help="clients in each depth group")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds")
    parser.add_argument("--local-steps", type=int, default=4, help="AdamW steps per client per round")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-4, help="client AdamW learning rate")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, targets q_proj,v_proj)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    parser.add_argument("--partition-seed", type=int, default=0, help="seed of the (shared) data partition")
    parser.add_argument("--examples-per-client", type=int, default=64, help="mean train examples per client")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--spaces", default="factors,product", help="HeteAgg spaces to run (factors, product)")
    parser.add_argument("--local-only", action="store_true", help="also run the non-federated baseline per depth")
    parser.add_argument("--task", choices=common.TASKS, default="alpaca", help="task whose data is used")
    parser.add_argument("--heldout", type=int, default=32, help="held-out examples scored per evaluation")
    parser.add_argument("--gen", type=int, default=0, help="GSM8K questions for exact match at the end (task gsm8k)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per GSM8K question")
    parser.add_argument("--max-len", type=int, default=192, help="tokens per example, truncated")
    parser.add_argument("--alpaca", default=None, help="Alpaca JSON; default: demo data")
    parser.add_argument("--gsm8k", default=None, help="GSM8K train jsonl; default: demo data")
    parser.add_argument("--gsm8k-test", default=None, help="GSM8K test jsonl (default: --gsm8k with train->test)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_hetero"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, demo data, 1 seed, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    args = parser.parse_args(argv)
    from edge_client.core.pruning import STRATEGIES
    from prufed.common.errors import ConfigError

    if args.smoke:
        args.seeds, args.rounds, args.local_steps, args.batch_size, args.heldout = 1, 2, 2, 2, 4
        args.examples_per_client, args.max_len, args.alpaca, args.gsm8k = 8, 512, None, None
        args.depths = args.depths if args.depths != "30,20,10" else "8,6,4"
    if args.strategy is None:
        try:
            args.strategy = json.loads(args.pruning_results.read_text())["best_overall"]
        except (OSError, ValueError, KeyError):
            args.strategy = "top"
    if args.strategy not in STRATEGIES:
        raise ConfigError("--strategy", f"unknown {args.strategy!r}; choose from {', '.join(STRATEGIES)}")
    try:
        args.depth_list = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise ConfigError("--depths", f"must be comma-separated integers, got {args.depths!r}") from None
    if not args.depth_list or len(set(args.depth_list)) != len(args.depth_list):
        raise ConfigError("--depths", f"must be distinct depths, got {args.depths!r}")
    args.space_list = [s for s in args.spaces.split(",") if s]
    if not args.space_list or any(s not in ("factors", "product") for s in args.space_list):
        raise ConfigError("--spaces", f"must be a comma-separated subset of factors,product, got {args.spaces!r}")
    for flag in ("clients_per_depth", "rounds", "local_steps", "batch_size", "lora_r", "seeds", "heldout",
                 "examples_per_client"):
        if getattr(args, flag) < 1:
            raise ConfigError("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    if not args.alpha > 0 or not args.lr > 0:
        raise ConfigError("--alpha/--lr", "must be > 0")
    if args.gen < 0 or args.max_len < 8:
        raise ConfigError("--gen/--max-len", "must be >= 0 and >= 8")
    if args.gsm8k and not args.gsm8k_test:
        args.gsm8k_test = args.gsm8k.replace("train", "test")
    for flag in ("alpaca", "gsm8k", "gsm8k_test"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ConfigError("--" + flag.replace("_", "-"), f"no such file: {path}")
    return args


class DepthModels:
    """One PEFT-wrapped pruned model per depth, reused by every client of that depth (adapter reloaded each time)."""

    def __init__(self, base, plans: dict, lora_r: int):
        from edge_client.model import attach_lora

        self.plans = plans
        self.models = {d: attach_lora(common.pruned_copy(base, plan.kept_layers), r=lora_r, alpha=2 * lora_r)
                       for d, plan in plans.items()}

    def load(self, depth: int, state: dict):
        from prufed.common.peft_bridge import load_adapter_state

        model = self.models[depth]
        load_adapter_state(model, state, self.plans[depth].kept_layers)
        return model

    def local_state(self, depth: int) -> dict:
        from prufed.common.peft_bridge import adapter_state

        return adapter_state(self.models[depth], self.plans[depth].kept_layers)


def client_delta(local: dict, global_state: dict) -> dict:
    """delta = local - global on the client's (kept-layer) keys: what a client uploads."""
    return {key: value - global_state[key] for key, value in local.items()}


def run_federated(name: str, models: DepthModels, clients: list[tuple[int, list]], global_init: dict, config,
                  args, evaluate, seed: int, groups: dict[int, list[int]] | None) -> list[dict]:
    """Rounds of local training + aggregation. groups=None: one global over all clients (HeteAgg); else one global
    per depth group aggregated over that group's clients only (homogeneous FedAvg)."""
    from aggregator.core.heteagg import HeteAggregator

    pad_id = evaluate.pad_id
    scopes = {None: list(range(len(clients)))} if groups is None else dict(groups)
    globals_ = {scope: {k: v.clone() for k, v in global_init.items()} for scope in scopes}
    rows = [evaluate(name, globals_[None if groups is None else d], d, 0, seed) for d in models.plans]
    for rnd in range(1, args.rounds + 1):
        tick = time.time()
        for scope, members in scopes.items():
            aggregator = HeteAggregator(globals_[scope], config)
            for index in members:
                depth, client_rows = clients[index]
                model = models.load(depth, globals_[scope])
                torch_seed(seed * 10_000 + rnd * 100 + index)
                common.finetune(model, client_rows, steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                                seed=seed * 10_000 + rnd * 100 + index, pad_id=pad_id)
                aggregator.add(client_delta(models.local_state(depth), globals_[scope]), len(client_rows),
                               name=f"client{index}")
            globals_[scope] = aggregator.finish().state
        seconds = round(time.time() - tick, 1)
        for depth in models.plans:
            row = evaluate(name, globals_[None if groups is None else depth], depth, rnd, seed)
            rows.append(row | {"seconds": seconds})
        common.log(f"seed {seed} {name} round {rnd}: " + ", ".join(
            f"d={r['depth']} {r['loss']:.3f}" for r in rows[-len(models.plans):]) + f" ({seconds}s)")
    return rows


def run_local_only(models: DepthModels, clients: list[tuple[int, list]], global_init: dict, args, evaluate,
                   seed: int) -> list[dict]:
    """Each client alone: rounds x local-steps from the same initial adapter; mean over the depth's clients."""
    per_depth: dict[int, list[dict]] = {}
    for index, (depth, client_rows) in enumerate(clients):
        model = models.load(depth, global_init)
        torch_seed(seed * 10_000 + index)
        common.finetune(model, client_rows, steps=args.rounds * args.local_steps, batch_size=args.batch_size,
                        lr=args.lr, seed=seed * 10_000 + index, pad_id=evaluate.pad_id)
        per_depth.setdefault(depth, []).append(evaluate.score(model))
    rows = []
    for depth, scores in per_depth.items():
        loss = sum(s["loss"] for s in scores) / len(scores)
        ems = [s["exact_match"] for s in scores if s["exact_match"] != ""]
        rows.append({"run": "local-only", "depth": depth, "round": args.rounds, "seed": seed, "loss": loss,
                     "perplexity": math.exp(loss), "tokens": scores[0]["tokens"],
                     "exact_match": sum(ems) / len(ems) if ems else "", "clients": len(scores), "seconds": ""})
    return rows


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


class Evaluator:
    """Scores a depth's model with a given global adapter on the held-out rows (+ GSM8K EM in the last round)."""

    def __init__(self, models: DepthModels, held_rows, generate, tokenizer, args, clients_at: dict[int, int]):
        self.models, self.held_rows, self.generate, self.tokenizer, self.args = models, held_rows, generate, tokenizer, args
        self.pad_id = tokenizer.pad_token_id
        self.clients_at = clients_at  # depth -> number of clients of that depth (a column of the results)

    def score(self, model, final: bool = True) -> dict:
        result = common.evaluate_rows(model, self.held_rows, self.pad_id)
        em = (common.exact_match(model, self.tokenizer, self.generate, self.args.max_new_tokens)
              if final and self.generate else "")
        return {**result.to_json_dict(), "exact_match": em}

    def __call__(self, run: str, state: dict, depth: int, rnd: int, seed: int) -> dict:
        model = self.models.load(depth, state)
        scored = self.score(model, final=rnd == self.args.rounds)
        return {"run": run, "depth": depth, "round": rnd, "seed": seed, **scored,
                "clients": self.clients_at[depth], "seconds": ""}


def render(rows: list[dict], args, depths: list[int], runs: list[str]) -> tuple[str, dict]:
    final = [r for r in rows if int(r["round"]) == args.rounds]
    stats = {(run, d): {m: common.mean_std(float(r[m]) for r in final if r["run"] == run and int(r["depth"]) == d
                                           and r[m] != "") for m in ("loss", "perplexity", "exact_match")}
             for run in runs for d in depths}
    init = {d: common.mean_std(float(r["loss"]) for r in rows if int(r["round"]) == 0 and int(r["depth"]) == d
                               and r["run"] == runs[0]) for d in depths}
    header = ["depth", "initial loss"] + [f"{run} loss" for run in runs] + [f"{run} ppl" for run in runs]
    body = [[d, common.fmt(*init[d][:2])] + [common.fmt(*stats[(run, d)]["loss"][:2]) for run in runs]
            + [common.fmt(*stats[(run, d)]["perplexity"][:2], digits=2) for run in runs] for d in depths]
    text = [f"# HeteAgg vs homogeneous FedAvg ({args.seeds} seeds, {args.rounds} rounds x {args.local_steps} local "
            f"steps, strategy {args.strategy}, {args.clients_per_depth} clients per depth)", "",
            "Held-out masked loss (nats/token) and perplexity of each depth's global model after the last round, "
            "mean ± std over seeds.", "", common.markdown_table(header, body), ""]
    if args.gen:
        text += ["GSM8K exact match after the last round:", "",
                 common.markdown_table(["depth"] + runs, [[d] + [common.fmt(*stats[(run, d)]["exact_match"][:2], 2)
                                                                 for run in runs] for d in depths]), ""]
    deltas = {}
    if "fedavg" in runs:
        for run in runs:
            if run.startswith("heteagg"):
                for d in depths:
                    per_seed = {}
                    for r in final:
                        if int(r["depth"]) == d and r["run"] in (run, "fedavg"):
                            per_seed.setdefault(r["seed"], {})[r["run"]] = float(r["loss"])
                    diffs = [v[run] - v["fedavg"] for v in per_seed.values() if len(v) == 2]
                    deltas[f"{run}-fedavg@{d}"] = common.mean_std(diffs)
        text += ["Paired difference (HeteAgg loss - FedAvg loss, same seed; negative = HeteAgg better):", "",
                 common.markdown_table(["comparison", "mean ± std"],
                                       [(k, common.fmt(*v[:2])) for k, v in deltas.items()]), ""]
    return "\n".join(text), {f"{run}@{d}": {m: list(v) for m, v in s.items()} for (run, d), s in stats.items()} | {
        "paired_differences": {k: list(v) for k, v in deltas.items()}}


def render_curves(path: Path, rows: list[dict], depths: list[int], runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.6), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for run in runs:
            if run == "local-only":
                continue
            rounds = sorted({int(r["round"]) for r in rows if r["run"] == run})
            means = [common.mean_std(float(r["loss"]) for r in rows if r["run"] == run and int(r["depth"]) == depth
                                     and int(r["round"]) == k) for k in rounds]
            ax.errorbar(rounds, [m[0] for m in means], yerr=[m[1] for m in means], marker="o", capsize=2, label=run)
        local = [float(r["loss"]) for r in rows if r["run"] == "local-only" and int(r["depth"]) == depth]
        if local:
            ax.axhline(sum(local) / len(local), ls="--", color="grey", label="local-only (end)")
        ax.set_title(f"{depth} layers")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    import torch

    from aggregator.core.heteagg import AggregationConfig
    from aggregator.core.init_adapter import initial_global_adapter
    from edge_client.core.partition import dirichlet_split
    from edge_client.core.pruning import SCORED_STRATEGIES, make_plan
    from edge_client.layer_scores import calibration_passages, compute_layer_scores
    from edge_client.model import DEFAULT_LORA_TARGETS, load_base_model
    from prufed.common.errors import ConfigError
    from prufed.common.models import read_model_config

    started = time.time()
    model_dir = common.model_dir_for(args)
    base, tokenizer = load_base_model(model_dir)
    num_layers = len(base.model.layers)
    if any(not 1 <= d <= num_layers for d in args.depth_list):
        raise ConfigError("--depths", f"must lie in [1, {num_layers}], got {args.depth_list}")
    scores = None
    if args.strategy in SCORED_STRATEGIES:
        scores = compute_layer_scores(base, tokenizer, calibration_passages(),
                                      block_sizes={num_layers - d for d in args.depth_list if d < num_layers})
    plans = {d: make_plan(args.strategy, num_layers, d, scores=scores, source_model=str(model_dir))
             for d in args.depth_list}

    data = common.load_task(args.task, alpaca=args.alpaca, gsm8k_train=args.gsm8k, gsm8k_test=args.gsm8k_test,
                            heldout=args.heldout, generate=args.gen,
                            demo_count=max(400, len(args.depth_list) * args.clients_per_depth * args.examples_per_client))
    num_clients = len(args.depth_list) * args.clients_per_depth
    pool = data.train[: num_clients * args.examples_per_client]
    parts = dirichlet_split(common.category_labels(pool), num_clients, args.alpha, args.partition_seed)
    clients = [(args.depth_list[i // args.clients_per_depth], common.tokenize([pool[j] for j in part], tokenizer,
                                                                              args.max_len))
               for i, part in enumerate(parts)]
    groups = {d: [i for i, (depth, _) in enumerate(clients) if depth == d] for d in args.depth_list}
    held_rows = common.tokenize(data.heldout, tokenizer, args.max_len)
    config_dict = read_model_config(model_dir)

    runs = [f"heteagg-{space}" for space in args.space_list] + ["fedavg"] + (["local-only"] if args.local_only else [])
    rows: list[dict] = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        models = DepthModels(base, plans, args.lora_r)
        evaluate = Evaluator(models, held_rows, data.generate if args.task == "gsm8k" else [], tokenizer, args,
                             {d: len(idx) for d, idx in groups.items()})
        global_init = initial_global_adapter(config_dict, r=args.lora_r, alpha=2 * args.lora_r,
                                             targets=DEFAULT_LORA_TARGETS, seed=seed)
        for space in args.space_list:
            config = AggregationConfig(weighting="examples", mode="heteagg", space=space)
            rows += run_federated(f"heteagg-{space}", models, clients, global_init, config, args, evaluate, seed, None)
        config = AggregationConfig(weighting="examples", mode="fedavg", space="factors")
        rows += run_federated("fedavg", models, clients, global_init, config, args, evaluate, seed, groups)
        if args.local_only:
            rows += run_local_only(models, clients, global_init, args, evaluate, seed)
        common.write_csv(args.out / "results.csv", rows, COLUMNS)

    table, stats = render(rows, args, args.depth_list, runs)
    elapsed = time.time() - started
    sizes = {f"client{i}": {"depth": d, "examples": len(r)} for i, (d, r) in enumerate(clients)}
    table += (f"\nClients (depth, examples): {[(d, len(r)) for d, r in clients]}; kept layers: "
              f"{ {d: list(p.kept_layers) for d, p in plans.items()} }\n"
              f"\nWall time: {elapsed / 60:.1f} min; versions: {common.versions()}\n")
    common.write_csv(args.out / "results.csv", rows, COLUMNS)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    render_curves(args.out / "curves.png", rows, args.depth_list, runs)
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "clients": sizes, "stats": stats, "wall_seconds": round(elapsed, 1), "versions": common.versions()}
    (args.out / "results.json").write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    print(json.dumps(out, default=str) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
