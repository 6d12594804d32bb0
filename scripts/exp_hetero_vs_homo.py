"""Experiment 2 as a resumable grid: does aggregation across pruned depths beat each depth's own baselines?

  python scripts/exp_hetero_vs_homo.py --alpaca ../shared/data/alpaca_5000.json --seeds 3
  python scripts/exp_hetero_vs_homo.py --smoke            # tiny random model + demo data, seconds

A regime is a strategy and a depth set (--regimes "contribution:30,20,10;top:30,20,10"); each depth is a group of
--clients-per-depth clients. Every cell = (run, regime, seed) writes one JSON file under --data-dir when it
finishes, and a rerun skips it; an interrupted cell resumes from its last finished round (--state-dir).
Runs (--runs):
  heteagg-lr<X>     one global over every client, HeteAgg in factor space with server learning rate X
  fedavg-group      one global per depth group, FedAvg over that group's clients only
  mixed-<X|auto>    per-group globals, aggregator/core/mixed.py with --mix X (or auto)
  additive-<X|auto> per-group globals, aggregator/core/additive.py with --mix X (or auto)
  homogeneous       the paper's baseline: every client at depth d over the same data split, FedAvg, one cell per
                    depth (depth 30 of a 30-layer model is shared by every regime: no pruning)
  local             each client alone for rounds x local-steps steps; the depth's mean loss is reported
Data: the first clients x --examples-per-client examples of the Alpaca train pool are shuffled with the partition
seed, cut into equal shares per depth group, and split non-IID (Dirichlet(--alpha) over the instruction's first
word) among the group's clients. Seed s is both the training seed (initial global adapter, dropout, batch order)
and the partition seed. Each depth's global is scored on the same --heldout Alpaca examples (nats per answer token)
after the rounds in --eval-rounds. Tables and plots: scripts/results_report.py.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL

EXPERIMENT = "hetero"
DEFAULT_RUNS = ("fedavg-group,heteagg-lr1,mixed-auto,additive-auto,homogeneous,heteagg-lr2,heteagg-lr4,mixed-0.5,"
                "additive-1,local")


@dataclass(frozen=True)
class Run:
    """One run kind: `mode` is heteagg, fedavg-group, mixed, additive, homogeneous or local."""

    name: str
    mode: str
    server_lr: float = 1.0
    mix: float | str | None = None


def parse_run(name: str) -> Run:
    from aggregator.core.modes import MIX_UPPER, parse_mix
    from prufed.common.errors import ConfigError

    if name in ("fedavg-group", "homogeneous", "local"):
        return Run(name, name)
    try:
        if name.startswith("heteagg-lr"):
            lr = float(name.removeprefix("heteagg-lr"))
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError
            return Run(name, "heteagg", server_lr=lr)
        for mode, upper in MIX_UPPER.items():
            if name.startswith(mode + "-"):
                return Run(name, mode, mix=parse_mix(name.removeprefix(mode + "-"), upper=upper))
    except (ValueError, ConfigError):
        pass
    raise ConfigError("--runs", f"unknown run {name!r}; use heteagg-lr<X>, fedavg-group, mixed-<X|auto>, "
                      "additive-<X|auto>, homogeneous or local")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="example: python scripts/exp_hetero_vs_homo.py --smoke")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--regimes", default="contribution:30,20,10;contribution:30,26,22;top:30,20,10",
                        help="';'-separated strategy:depths, run in this order (most informative first)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated runs, in this order (see above)")
    parser.add_argument("--clients-per-depth", type=int, default=2, help="clients in each depth group")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds")
    parser.add_argument("--local-steps", type=int, default=10, help="AdamW steps per client per round")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="client AdamW learning rate")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, targets q_proj,v_proj)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    parser.add_argument("--examples-per-client", type=int, default=96, help="train examples per client (mean)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (training and partition seed)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out Alpaca examples scored")
    parser.add_argument("--eval-rounds", default="0,5,10", help="rounds after which each depth is scored")
    parser.add_argument("--max-len", type=int, default=192, help="tokens per example (prompt + answer), truncated")
    parser.add_argument("--alpaca", default=None, help="Alpaca JSON; default: demo data")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_hetero"), help="scratch directory (smoke model)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, demo data, 1 seed, 2 rounds")
    common.add_grid_flags(parser)
    args = parser.parse_args(argv)
    from edge_client.core.pruning import STRATEGIES
    from prufed.common.errors import ConfigError

    if args.smoke:
        args.seeds, args.rounds, args.local_steps, args.batch_size, args.heldout = 1, 2, 2, 2, 4
        args.examples_per_client, args.max_len, args.alpaca, args.eval_rounds = 12, 512, None, "0,2"
        if args.regimes == parser.get_default("regimes"):
            args.regimes = "top:8,6,4"
    args.regime_list = []
    for part in (p for p in args.regimes.split(";") if p.strip()):
        strategy, _, depths = part.partition(":")
        try:
            depth_list = [int(d) for d in depths.split(",") if d.strip()]
        except ValueError:
            depth_list = []
        if strategy.strip() not in STRATEGIES or not depth_list or len(set(depth_list)) != len(depth_list):
            raise ConfigError("--regimes", f"each regime is strategy:d1,d2,... with distinct depths and a strategy "
                              f"from {', '.join(STRATEGIES)}; got {part!r}")
        args.regime_list.append((strategy.strip(), depth_list))
    args.run_list = [parse_run(r.strip()) for r in args.runs.split(",") if r.strip()]
    for flag in ("clients_per_depth", "rounds", "local_steps", "batch_size", "lora_r", "examples_per_client",
                 "seeds", "heldout"):
        if getattr(args, flag) < 1:
            raise ConfigError("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(args, flag)}")
    if not args.alpha > 0 or not args.lr > 0:
        raise ConfigError("--alpha/--lr", "must be > 0")
    try:
        args.eval_set = sorted({int(r) for r in args.eval_rounds.split(",") if r.strip()} | {args.rounds})
    except ValueError:
        raise ConfigError("--eval-rounds", f"must be comma-separated integers, got {args.eval_rounds!r}") from None
    if any(not 0 <= r <= args.rounds for r in args.eval_set):
        raise ConfigError("--eval-rounds", f"must lie in [0, --rounds={args.rounds}]")
    if args.alpaca and not Path(args.alpaca).is_file():
        raise ConfigError("--alpaca", f"no such file: {args.alpaca}")
    return args


# ---------------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    run: Run
    strategy: str  # "none" for an unpruned homogeneous cell
    depths: tuple[int, ...]
    seed: int

    def name(self, budget: str) -> str:
        return common.cell_name(EXPERIMENT, self.run.name, self.strategy, self.depths, f"s{self.seed}p{self.seed}",
                                budget)


def plan_cells(args, num_layers: int) -> list[Cell]:
    """Every cell in run order: seeds outermost within a regime, regimes in the given order; shared cells once."""
    cells: list[Cell] = []
    for strategy, depths in args.regime_list:
        for seed in range(args.seeds):
            for run in args.run_list:
                if run.mode == "homogeneous":
                    for d in depths:
                        cells.append(Cell(run, "none" if d == num_layers else strategy, (d,), seed))
                else:
                    cells.append(Cell(run, strategy, tuple(depths), seed))
    return list(dict.fromkeys(cells))


def budget_tag(args) -> str:
    return f"r{args.rounds}x{args.local_steps}b{args.batch_size}"


def cell_config(args, cell: Cell, model_dir: Path) -> dict:
    """Everything that determines a cell's numbers (a finished cell with another config is an error, not a skip)."""
    return {"model": str(args.model) if not args.smoke else "tiny-random", "rounds": args.rounds,
            "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr, "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r, "dirichlet_alpha": args.alpha, "clients_per_depth": args.clients_per_depth,
            "examples_per_client": args.examples_per_client, "heldout": args.heldout, "max_len": args.max_len,
            "eval_rounds": args.eval_set, "trainer": common.TRAINER,
            "groups": len(args.regime_list[0][1]) if cell.run.mode == "homogeneous"
            else len(cell.depths), "alpaca": Path(args.alpaca).name if args.alpaca else "demo"}


# ---------------------------------------------------------------------------------------------------- data


def equal_share_split(labels: list[str], groups: int, per_group: int, alpha: float, seed: int) -> list[list[int]]:
    """groups x per_group client index lists: the pool is shuffled (seed), cut into `groups` equal shares, and each
    share split non-IID over its clients (Dirichlet(alpha) over `labels`)."""
    from edge_client.core.partition import dirichlet_split

    order = list(range(len(labels)))
    random.Random(f"partition:{seed}").shuffle(order)
    share = len(order) // groups
    parts = []
    for g in range(groups):
        chunk = order[g * share:(g + 1) * share]
        for part in dirichlet_split([labels[i] for i in chunk], per_group, alpha, seed * 1000 + g):
            parts.append(sorted(chunk[i] for i in part))
    return parts


class DepthModels:
    """The PEFT-wrapped pruned models of one cell, one per depth, reused by every client of that depth (the adapter is
    reloaded each time); built once per kept-layer list and shared between cells through `cache`."""

    def __init__(self, base, kept: dict[int, tuple[int, ...]], lora_r: int, cache: dict):
        from edge_client.model import attach_lora

        self.kept = kept
        for layers in kept.values():
            if layers not in cache:
                cache[layers] = attach_lora(common.pruned_copy(base, layers), r=lora_r, alpha=2 * lora_r)
        self.models = {d: cache[layers] for d, layers in kept.items()}

    def load(self, depth: int, state: dict):
        from prufed.common.peft_bridge import load_adapter_state

        model = self.models[depth]
        load_adapter_state(model, state, self.kept[depth])
        return model

    def local_state(self, depth: int) -> dict:
        from prufed.common.peft_bridge import adapter_state

        return adapter_state(self.models[depth], self.kept[depth])


def client_seed(seed: int, rnd: int, index: int) -> int:
    return seed * 10_000 + rnd * 100 + index


# ---------------------------------------------------------------------------------------------------- runs


def run_cell(cell: Cell, ctx: dict, args, checkpoint: Path, config: dict) -> tuple[list[dict], dict]:
    """(per-depth rows, extra fields) of one federated or local cell, resuming from `checkpoint` when present."""
    import torch

    from aggregator.core.heteagg import AggregationConfig, HeteAggregator
    from aggregator.core.modes import group_aggregator

    models: DepthModels = ctx["models"]
    pad_id = ctx["pad_id"]
    if cell.run.mode == "homogeneous":
        clients = [(cell.depths[0], rows) for _, rows in ctx["clients"]]
    else:
        clients = [(cell.depths[i // args.clients_per_depth], rows) for i, (_, rows) in enumerate(ctx["clients"])]
    depths = list(cell.depths)

    def score(depth: int, state: dict) -> dict:
        result = common.evaluate_rows(models.load(depth, state), ctx["held"], pad_id)
        return {"loss": result.loss, "tokens": result.tokens}

    if cell.run.mode == "local":
        losses: dict[int, list[float]] = {}
        tokens = 0
        for index, (depth, rows) in enumerate(clients):
            model = models.load(depth, ctx["init"])
            torch.manual_seed(client_seed(cell.seed, 0, index))
            common.finetune(model, rows, steps=args.rounds * args.local_steps, batch_size=args.batch_size, lr=args.lr,
                            seed=client_seed(cell.seed, 0, index), pad_id=pad_id)
            scored = score(depth, models.local_state(depth))
            losses.setdefault(depth, []).append(scored["loss"])
            tokens = scored["tokens"]
        rows_out = [{"depth": d, "loss": sum(v) / len(v), "client_losses": v, "heldout_tokens": tokens,
                     "curve": []} for d, v in losses.items()]
        return rows_out, {"resumed_after_round": None}

    per_group = cell.run.mode != "heteagg"
    agg_config = AggregationConfig(server_lr=cell.run.server_lr)
    started, cpu_started = time.time(), time.process_time()
    load = common.load_checkpoint(checkpoint, config)
    if load is not None:
        globals_, curves, start, reports = load["globals"], load["curves"], load["round"] + 1, load["reports"]
        common.log(f"  resuming {checkpoint.stem} after round {load['round']}")
        started -= load["seconds"]
        cpu_started -= load["cpu_seconds"]
    else:
        init = {k: v.clone() for k, v in ctx["init"].items()}
        globals_ = {d: init for d in depths} if per_group else {None: init}
        curves = {d: [] for d in depths}
        reports = []
        start = 1
        if 0 in args.eval_set:
            for d in depths:
                curves[d].append({"round": 0, **score(d, globals_[d if per_group else None])})
    kept = {d: tuple(models.kept[d]) for d in depths}
    depth_of = {layers: d for d, layers in kept.items()}
    for rnd in range(start, args.rounds + 1):
        tick = time.time()
        if per_group:  # homogeneous: one group (every client at the same depth), FedAvg within it
            mode = "fedavg-group" if cell.run.mode == "homogeneous" else cell.run.mode
            aggregator = group_aggregator(mode, {kept[d]: globals_[d] for d in depths}, agg_config, mix=cell.run.mix)
        else:
            aggregator = HeteAggregator(globals_[None], agg_config)
        for index, (depth, rows) in enumerate(clients):
            start_state = globals_[depth if per_group else None]
            model = models.load(depth, start_state)
            torch.manual_seed(client_seed(cell.seed, rnd, index))
            common.finetune(model, rows, steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                            seed=client_seed(cell.seed, rnd, index), pad_id=pad_id)
            local = models.local_state(depth)
            update = {key: value - start_state[key] for key, value in local.items()}
            if per_group:
                aggregator.add(kept[depth], update, len(rows), name=f"client{index}")
            else:
                aggregator.add(update, len(rows), name=f"client{index}")
        if per_group:
            results = aggregator.finish()
            globals_ = {depth_of[g]: r.state for g, r in results.items()}
            reports.append({str(depth_of[g]): {k: v for k, v in r.report.items() if k in ("lambda", "mu")}
                            for g, r in results.items()})
        else:
            globals_ = {None: aggregator.finish().state}
        seconds = time.time() - tick
        if rnd in args.eval_set:
            for d in depths:
                curves[d].append({"round": rnd, **score(d, globals_[d if per_group else None]),
                                  "round_seconds": round(seconds, 1)})
        common.log(f"  {cell.run.name} seed {cell.seed} round {rnd}: " + (", ".join(
            f"d={d} {curves[d][-1]['loss']:.3f}" for d in depths) if rnd in args.eval_set else "trained")
            + f" ({seconds:.0f}s wall, {time.process_time() - cpu_started:.0f}s CPU so far)")
        common.save_checkpoint(checkpoint, {"config": config, "round": rnd, "globals": globals_, "curves": curves,
                                            "reports": reports, "seconds": time.time() - started,
                                            "cpu_seconds": time.process_time() - cpu_started})
    rows_out = [{"depth": d, "loss": curves[d][-1]["loss"], "heldout_tokens": curves[d][-1]["tokens"],
                 "curve": curves[d]} for d in depths]
    extra = {"resumed_after_round": load["round"] if load is not None else None,
             "wall_seconds": round(time.time() - started, 1),
             "cpu_seconds": round(time.process_time() - cpu_started, 1)}
    if any(r for rep in reports for r in rep.values()):
        extra["mix_per_round"] = reports
    return rows_out, extra


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    import torch

    from aggregator.core.init_adapter import initial_global_adapter
    from edge_client.core.pruning import SCORED_STRATEGIES, make_plan
    from edge_client.layer_scores import calibration_passages, compute_layer_scores
    from edge_client.model import DEFAULT_LORA_TARGETS, load_base_model
    from prufed.common.errors import ConfigError
    from prufed.common.models import read_model_config

    model_dir = common.model_dir_for(args)
    device = common.resolve_device(args.device)
    precision = common.resolve_precision(args.precision, device)
    config_dict = read_model_config(model_dir)
    num_layers = int(config_dict["num_hidden_layers"])
    for _, depths in args.regime_list:
        if any(not 1 <= d <= num_layers for d in depths):
            raise ConfigError("--regimes", f"depths must lie in [1, {num_layers}], got {depths}")
        if len(depths) != len(args.regime_list[0][1]):
            raise ConfigError("--regimes", "every regime needs the same number of depth groups (the same data split)")
    cells = plan_cells(args, num_layers)
    budget = budget_tag(args)
    todo = common.cells_to_run(args, cells, lambda cell: args.data_dir / f"{cell.name(budget)}.json",
                               lambda cell: cell_config(args, cell, model_dir), f"device {device}, {precision} base weights")
    if args.list or not todo:
        return 0

    base, tokenizer = load_base_model(model_dir)
    scores = {}
    for strategy, _ in args.regime_list:  # scored on the fp32 model, as the product does
        if strategy in SCORED_STRATEGIES and strategy not in scores:
            scores[strategy] = compute_layer_scores(base, tokenizer, calibration_passages(), block_sizes={
                num_layers - d for _, ds in args.regime_list for d in ds if d < num_layers})
    base.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    data = common.load_task("alpaca", alpaca=args.alpaca, gsm8k_train=None, gsm8k_test=None, heldout=args.heldout,
                            generate=0, demo_count=max(400, 3 * args.clients_per_depth * args.examples_per_client))
    groups = len(args.regime_list[0][1])
    pool = data.train[: groups * args.clients_per_depth * args.examples_per_client]
    labels = common.category_labels(pool)
    held = common.tokenize(data.heldout, tokenizer, args.max_len)
    meta = common.cell_meta(device, precision)
    models_cache: dict = {}  # kept layers -> PEFT model
    for number, cell in enumerate(todo, start=1):
        tick, cpu_tick = time.time(), time.process_time()
        name = cell.name(budget)
        config = cell_config(args, cell, model_dir)
        common.log(f"[{number}/{len(todo)}] {name}")
        kept = {d: tuple(range(num_layers)) if d == num_layers else
                tuple(make_plan(cell.strategy, num_layers, d, scores=scores.get(cell.strategy),
                                source_model=str(model_dir)).kept_layers) for d in cell.depths}
        parts = equal_share_split(labels, groups, args.clients_per_depth, args.alpha, cell.seed)
        clients = [(None, common.tokenize([pool[j] for j in part], tokenizer, args.max_len)) for part in parts]
        init = initial_global_adapter(config_dict, r=args.lora_r, alpha=2 * args.lora_r,
                                      targets=DEFAULT_LORA_TARGETS, seed=cell.seed)
        ctx = {"models": DepthModels(base, kept, args.lora_r, models_cache), "pad_id": tokenizer.pad_token_id,
               "clients": clients, "held": held, "init": init}
        checkpoint = args.state_dir / f"{name}.pt"
        rows, extra = run_cell(cell, ctx, args, checkpoint, config)
        client_depths = ([cell.depths[0]] * len(clients) if cell.run.mode == "homogeneous"
                         else [cell.depths[i // args.clients_per_depth] for i in range(len(clients))])
        for row in rows:
            row["kept_layers"] = list(kept[row["depth"]])
            row["clients"] = client_depths.count(row["depth"])
            row["train_examples"] = sum(len(r) for (_, r), d in zip(clients, client_depths) if d == row["depth"])
            row["perplexity"] = math.exp(min(row["loss"], 700))
        cell_out = {
            "experiment": EXPERIMENT, "run": cell.run.name, "mode": cell.run.mode, "strategy": cell.strategy,
            "depths": list(cell.depths), "depth": rows, "task": "alpaca",
            "seed": {"training": cell.seed, "partition": cell.seed},
            "server_lr": cell.run.server_lr, "mix": cell.run.mix,
            "budget": {"rounds": args.rounds, "local_steps": args.local_steps,
                       "optimizer_steps_per_client": args.rounds * args.local_steps,
                       "examples_per_step": args.batch_size},
            "heldout_examples": len(held), "client_examples": [len(r) for _, r in clients],
            "loss_unit": "nats per answer token", "wall_seconds": round(time.time() - tick, 1),
            "cpu_seconds": round(time.process_time() - cpu_tick, 1), "config": config, **meta, **extra,
        }
        common.write_cell(args.data_dir / f"{name}.json", cell_out)
        checkpoint.unlink(missing_ok=True)
        common.log(f"  done in {cell_out['wall_seconds']:.0f}s: " + ", ".join(
            f"d={r['depth']} {r['loss']:.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
