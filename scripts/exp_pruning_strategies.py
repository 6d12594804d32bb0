"""Experiment 1 as a resumable grid: which layer-pruning strategy is best, per task, after a fixed LoRA budget.

  python scripts/exp_pruning_strategies.py --alpaca ../shared/data/alpaca_5000.json \\
      --gsm8k ../shared/data/gsm8k_train.jsonl --seeds 3
  python scripts/exp_pruning_strategies.py --smoke          # tiny random model + demo data, seconds

Every cell = (strategy, depth, task, seed) writes one JSON file under --data-dir when it finishes, and a rerun
skips it: the held-out masked loss (nats per answer token) of the pruned model BEFORE fine-tuning, and AFTER a
fresh LoRA (r, alpha = 2r, q/v) trained for exactly --steps AdamW steps of --batch-size examples (the seed picks
the LoRA init, dropout and batch order). One reference cell per task scores the unpruned model. GSM8K exact match
(the number after '####' in a greedy completion of --gen test questions) is measured for the reference and for
every model whose answer-token loss is at most --em-max-loss: above that, a model cannot produce a correct chain of
arithmetic and generation would only cost time. Alpaca: a fixed (seed 0) 5% is held out, the first --heldout of it
scored; GSM8K: the first --heldout test questions. Tables and plots: scripts/results_report.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL

EXPERIMENT = "pruning"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="example: python scripts/exp_pruning_strategies.py --smoke")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--strategies", default="contribution,angular-block,top,top-alternate",
                        help="comma-separated strategies, or 'all'")
    parser.add_argument("--depths", default="20,15", help="comma-separated numbers of layers to keep")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per cell (0..N-1)")
    parser.add_argument("--steps", type=int, default=200, help="LoRA optimizer steps per fine-tune (the fixed budget)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the LoRA factors")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, targets q_proj,v_proj)")
    parser.add_argument("--max-len", type=int, default=192, help="tokens per example (prompt + answer), truncated")
    parser.add_argument("--heldout", type=int, default=100, help="held-out examples scored per task")
    parser.add_argument("--gen", type=int, default=20, help="GSM8K questions answered by greedy generation (0 = skip)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per GSM8K question")
    parser.add_argument("--em-max-loss", type=float, default=2.5,
                        help="measure GSM8K exact match only for models whose answer-token loss is at most this")
    parser.add_argument("--alpaca", default=None, help="Alpaca JSON (instruction/input/output); default: demo data")
    parser.add_argument("--gsm8k", default=None, help="GSM8K train jsonl; default: demo data")
    parser.add_argument("--gsm8k-test", default=None, help="GSM8K test jsonl (default: --gsm8k with train->test)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_pruning"), help="scratch directory (smoke model)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, demo data, 1 seed, 2 steps")
    common.add_grid_flags(parser)
    args = parser.parse_args(argv)
    from edge_client.core.pruning import STRATEGIES
    from prufed.common.errors import ConfigError

    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.heldout, args.gen, args.max_new_tokens = 1, 2, 2, 4, 2, 8
        args.max_len, args.alpaca, args.gsm8k, args.em_max_loss = 512, None, None, 100.0
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


def plan_cells(args, num_layers: int) -> list[tuple[str, int, str, int]]:
    """(strategy, depth, task, seed): the references first, then seed-major so that every strategy gets seed 0."""
    cells = [("none", num_layers, task, 0) for task in common.TASKS]
    cells += [(strategy, depth, task, seed) for seed in range(args.seeds) for depth in args.depth_list
              for strategy in args.strategy_list for task in common.TASKS]
    return cells


def cell_file(args, strategy: str, depth: int, task: str, seed: int) -> str:
    run, budget = ("reference", "s0") if strategy == "none" else ("finetune", f"s{args.steps}b{args.batch_size}")
    return common.cell_name(EXPERIMENT, run, strategy, [depth], f"s{seed}", budget, task=task) + ".json"


def cell_config(args, strategy: str, task: str) -> dict:
    data = {"alpaca": Path(args.alpaca).name if args.alpaca else "demo",
            "gsm8k": Path(args.gsm8k).name if args.gsm8k else "demo"}[task]
    config = {"model": "tiny-random" if args.smoke else str(args.model), "heldout": args.heldout,
              "max_len": args.max_len, "data": data}
    if task == "gsm8k":
        config |= {"gen": args.gen, "max_new_tokens": args.max_new_tokens, "em_max_loss": args.em_max_loss}
    if strategy != "none":
        config |= {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lora_r": args.lora_r,
                   "lora_alpha": 2 * args.lora_r, "trainer": common.TRAINER}
    return config


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_client.core.pruning import SCORED_STRATEGIES, make_plan
    from edge_client.layer_scores import calibration_passages, compute_layer_scores
    from edge_client.model import attach_lora, load_base_model
    from prufed.common.errors import ConfigError
    from prufed.common.models import read_model_config

    model_dir = common.model_dir_for(args)
    device = common.resolve_device(args.device)
    precision = common.resolve_precision(args.precision, device)
    num_layers = int(read_model_config(model_dir)["num_hidden_layers"])
    bad = [d for d in args.depth_list if not 1 <= d <= num_layers]
    if bad:
        raise ConfigError("--depths", f"must lie in [1, {num_layers}], got {bad}")
    cells = plan_cells(args, num_layers)
    todo = common.cells_to_run(args, cells, lambda cell: args.data_dir / cell_file(args, *cell),
                               lambda cell: cell_config(args, cell[0], cell[2]), f"device {device}, {precision} base weights")
    if args.list or not todo:
        return 0

    base, tokenizer = load_base_model(model_dir)
    pad_id = tokenizer.pad_token_id
    scores = None
    if any(s in SCORED_STRATEGIES for s in args.strategy_list):
        common.log("scoring layers on calibration text ...")
        scores = compute_layer_scores(base, tokenizer, calibration_passages(),
                                      block_sizes={num_layers - d for d in args.depth_list if d < num_layers})
    base.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    tasks = {}
    for name in common.TASKS:
        data = common.load_task(name, alpaca=args.alpaca, gsm8k_train=args.gsm8k, gsm8k_test=args.gsm8k_test,
                                heldout=args.heldout, generate=args.gen)
        pool = data.train[: max(args.steps * args.batch_size, 64)]
        tasks[name] = (data, common.tokenize(pool, tokenizer, args.max_len),
                       common.tokenize(data.heldout, tokenizer, args.max_len))
    meta = common.cell_meta(device, precision)

    def exact_match(model, task: str, loss: float) -> dict:
        data = tasks[task][0]
        if task != "gsm8k" or not args.gen or not data.generate:
            return {}
        if loss > args.em_max_loss:
            return {"exact_match": None, "exact_match_note": f"not measured: loss {loss:.2f} > {args.em_max_loss}"}
        return {"exact_match": common.exact_match(model, tokenizer, data.generate, args.max_new_tokens),
                "exact_match_questions": len(data.generate)}

    for number, (strategy, depth, task, seed) in enumerate(todo, start=1):
        tick, cpu_tick = time.time(), time.process_time()
        name = cell_file(args, strategy, depth, task, seed)
        common.log(f"[{number}/{len(todo)}] {name}")
        data, train_rows, held_rows = tasks[task]
        if strategy == "none":
            kept = list(range(num_layers))
            pruned = base
        else:
            kept = list(make_plan(strategy, num_layers, depth, scores=scores, source_model=str(model_dir)).kept_layers)
            pruned = common.pruned_copy(base, kept)
        before = common.evaluate_rows(pruned, held_rows, pad_id)
        row = {"depth": depth, "kept_layers": kept, "before_loss": before.loss, "heldout_tokens": before.tokens}
        if strategy == "none":
            row |= {"loss": before.loss, **exact_match(pruned, task, before.loss)}
            steps = 0
        else:
            torch.manual_seed(seed)
            model = attach_lora(copy.deepcopy(pruned), r=args.lora_r, alpha=2 * args.lora_r)
            losses = common.finetune(model, train_rows, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     seed=seed, pad_id=pad_id)
            after = common.evaluate_rows(model, held_rows, pad_id)
            row |= {"loss": after.loss, "train_loss_first": losses[0], "train_loss_last": losses[-1],
                    **exact_match(model, task, after.loss)}
            steps = args.steps
            del model
        cell = {"experiment": EXPERIMENT, "run": "reference" if strategy == "none" else "finetune",
                "strategy": strategy, "depths": [depth], "depth": [row], "task": task,
                "seed": {"training": seed, "partition": None},
                "budget": {"optimizer_steps_per_client": steps, "examples_per_step": args.batch_size if steps else 0},
                "heldout_examples": len(held_rows), "loss_unit": "nats per answer token",
                "wall_seconds": round(time.time() - tick, 1), "cpu_seconds": round(time.process_time() - cpu_tick, 1),
                "config": cell_config(args, strategy, task), **meta}
        common.write_cell(args.data_dir / name, cell)
        common.log(f"  before {before.loss:.3f} after {row['loss']:.3f} "
                   f"em {row.get('exact_match', '-')} ({cell['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
