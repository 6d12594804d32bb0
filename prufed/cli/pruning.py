"""`prufed prune`, `prufed layers` and `prufed eval`: build layer-pruned models, inspect layer scores, measure them.

Heavy imports (torch, transformers) stay inside the handlers so `prufed --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES, parse_protect
from prufed.cli.help import HelpFormatter
from prufed.cli.quiet import progress_bar
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

MODEL_HELP = f"model alias ({DEFAULT_MODEL}) or a local Hugging Face LLaMA-family directory"
CALIB_HELP = (
    "plain-text calibration file for scored strategies (passages separated by blank lines); "
    "default: built-in KJV calibration split"
)


def register(subparsers) -> None:
    fmt = HelpFormatter

    prune = subparsers.add_parser(
        "prune", help="drop decoder layers and save the pruned model with pruning.json", formatter_class=fmt,
        description="Build a layer-pruned copy of a model. Kept layers keep their weights; pruning.json maps "
        "each of them to its ORIGINAL index.",
        epilog="example: prufed prune --model smollm2-135m --strategy top-alternate --keep 20 --out runs/pruned-20",
    )
    prune.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    prune.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                       help=f"pruning strategy: {', '.join(STRATEGIES)}")
    prune.add_argument("--keep", type=int, required=True, help="number of decoder layers to keep")
    prune.add_argument("--protect", default="", help="comma-separated ORIGINAL layer indices never dropped, e.g. 0,-1")
    prune.add_argument("--calib", type=Path, default=None, help=CALIB_HELP)
    prune.add_argument("--out", type=Path, required=True, help="output directory (must not already hold a model)")
    prune.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    prune.set_defaults(func=cmd_prune)

    layers = subparsers.add_parser(
        "layers", help="per-layer scores and which layers each strategy keeps", formatter_class=fmt,
        description="Score every decoder layer on calibration text (mean |w|, Block Influence, angular distance "
        "of the block starting there) and show the layers each strategy keeps.",
        epilog="example: prufed layers --model smollm2-135m --keep 20 --json",
    )
    layers.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    layers.add_argument("--calib", type=Path, default=None, help=CALIB_HELP)
    layers.add_argument("--keep", type=int, default=None, help="layers to keep (default: round(2/3 of the layers))")
    layers.add_argument("--json", action="store_true", help="print scores and plans as JSON on stdout")
    layers.set_defaults(func=cmd_layers)

    evaluate = subparsers.add_parser(
        "eval", help="held-out perplexity of a (pruned) model", formatter_class=fmt,
        description="Perplexity on held-out text: the built-in KJV held-out split by default, or the masked "
        "response loss of an instruction file (--data).",
        epilog="example: prufed eval --model runs/pruned-20 --json",
    )
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP + " (a pruned directory also works)")
    evaluate.add_argument("--data", type=Path, default=None,
                          help="instruction file (JSON/JSONL, see `prufed train`); default: built-in held-out text")
    evaluate.add_argument("--texts", type=int, default=32, help="number of built-in held-out passages")
    evaluate.add_argument("--max-len", type=int, default=256, help="tokens per text or example (longer ones are cut)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="texts per forward pass")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    evaluate.set_defaults(func=cmd_eval)


def _check_keep(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise ConfigError("--keep", f"must be >= 1, got {keep}")


def _check_positive(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(flag, f"must be >= {minimum}, got {value}")


def _check_file(flag: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise ConfigError(flag, f"no such file: {path}")


def _scores(model_dir: Path, calib: Path | None, block_sizes):
    """Load the model and score its layers on calibration text, with a progress bar."""
    from edge_client.layer_scores import calibration_passages, compute_layer_scores
    from edge_client.model import load_base_model

    texts = calibration_passages(calib)
    model, tokenizer = load_base_model(model_dir)
    with progress_bar() as progress:
        task = progress.add_task("scoring layers", total=None)
        return compute_layer_scores(model, tokenizer, texts, block_sizes=block_sizes,
                                    on_batch=lambda done, total: progress.update(task, completed=done, total=total))


def _ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    items = list(indices)
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] != items[i - 1] + 1:
            run = items[start:i]
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            start = i
    return ",".join(parts) or "-"


def cmd_prune(args: argparse.Namespace) -> int:
    from edge_client.layer_scores import plan_for_model, source_model_dir
    from edge_client.model import load_base_model, prune_model, save_pruned

    _check_keep(args.keep)
    _check_file("--calib", args.calib)
    protect = parse_protect(args.protect)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ConfigError("--out", f"{args.out} exists and is not an empty directory")
    model_dir = source_model_dir(args.model)
    with progress_bar() as progress:
        task = progress.add_task(f"planning ({args.strategy})", total=None)
        plan = plan_for_model(args.model, args.strategy, args.keep, protect, args.calib,
                              on_batch=lambda done, total: progress.update(task, completed=done, total=total))
        progress.update(task, description="pruning and saving", completed=0, total=None)
        model, tokenizer = load_base_model(model_dir)
        prune_model(model, plan.kept_layers)
        save_pruned(model, tokenizer, plan, args.out)
    if args.json:
        print(json.dumps({**plan.to_json_dict(), "out": str(args.out)}, indent=2))
    else:
        from rich.console import Console

        Console().print(
            f"[bold]{plan.strategy}[/]: kept {plan.depth}/{plan.source_num_layers} layers "
            f"{_ranges(plan.kept_layers)} (dropped {_ranges(plan.dropped_layers)}) -> {args.out}"
        )
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from edge_client.core.pruning import make_plan
    from edge_client.layer_scores import source_model_dir
    from edge_client.model import num_layers_of

    _check_keep(args.keep)
    _check_file("--calib", args.calib)
    model_dir = source_model_dir(args.model)
    num_layers = num_layers_of(model_dir)
    keep = args.keep if args.keep is not None else max(1, round(2 * num_layers / 3))
    if keep > num_layers:
        raise ConfigError("--keep", f"must be between 1 and {num_layers} (the model's layer count), got {keep}")
    drops = num_layers - keep
    scores = _scores(model_dir, args.calib, (drops,) if drops else ())
    plans = {s: make_plan(s, num_layers, keep, scores=scores, source_model=args.model) for s in STRATEGIES}
    angular = scores.angular.get(drops, ())
    rows = [
        {
            "layer": i,
            "magnitude": scores.magnitude[i],
            "contribution": scores.contribution[i],
            "angular_block": angular[i] if i < len(angular) else None,
            "kept_by": [s for s in STRATEGIES if i in plans[s].kept_layers],
        }
        for i in range(num_layers)
    ]
    if args.json:
        print(json.dumps({
            "model": args.model, "num_layers": num_layers, "keep": keep, "block_size": drops, "layers": rows,
            "plans": {s: {"kept_layers": list(p.kept_layers), "dropped_layers": list(p.dropped_layers)}
                      for s, p in plans.items()},
        }, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    layer_table = Table(title=f"{args.model}: {num_layers} layers, keep {keep}")
    for column in ("layer", "magnitude", "contribution (BI)", f"angular d(h_i, h_i+{drops})"):
        layer_table.add_column(column, justify="right")
    for row in rows:
        angular_text = "-" if row["angular_block"] is None else f"{row['angular_block']:.4f}"
        layer_table.add_row(str(row["layer"]), f"{row['magnitude']:.5f}", f"{row['contribution']:.4f}", angular_text)
    plan_table = Table(title=f"layers each strategy keeps at --keep {keep} (ORIGINAL indices)")
    plan_table.add_column("strategy", no_wrap=True)
    plan_table.add_column("kept", overflow="fold")
    plan_table.add_column("dropped", overflow="fold")
    for strategy, plan in plans.items():
        plan_table.add_row(strategy, _ranges(plan.kept_layers), _ranges(plan.dropped_layers))
    console = Console()
    console.print(layer_table)
    console.print(plan_table)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _check_positive("--texts", args.texts)
    _check_positive("--max-len", args.max_len, 2)
    _check_positive("--batch-size", args.batch_size)
    _check_file("--data", args.data)
    from edge_client.evaluate import batched, masked_loss, perplexity
    from edge_client.model import load_base_model, read_plan
    from prufed.common.models import resolve_model

    model_dir = resolve_model(args.model)
    plan = read_plan(model_dir)
    model, tokenizer = load_base_model(model_dir)
    with progress_bar() as progress:
        if args.data is None:
            from edge_client.corpus import heldout_texts

            texts = heldout_texts(args.texts)
            task = progress.add_task("perplexity", total=-(-len(texts) // args.batch_size))
            result = perplexity(model, tokenizer, texts, max_len=args.max_len, batch_size=args.batch_size,
                                on_batch=lambda done: progress.update(task, completed=done))
            source = f"built-in held-out text ({len(texts)} passages)"
        else:
            # edge_client.data is the training engineer's module: imported only for --data.
            from edge_client.data import load_examples, tokenize_examples

            rows = tokenize_examples(load_examples(args.data), tokenizer, args.max_len)
            if not rows:
                raise ConfigError("--data", f"{args.data} holds no example whose prompt fits in --max-len {args.max_len}")
            task = progress.add_task("held-out loss", total=-(-len(rows) // args.batch_size))
            result = masked_loss(model, batched(rows, tokenizer.pad_token_id or 0, args.batch_size),
                                 on_batch=lambda done: progress.update(task, completed=done))
            source = f"{args.data} ({len(rows)} examples, response tokens only)"
    report = {
        "model": args.model, "data": source, **result.to_json_dict(),
        "num_layers": len(model.model.layers),
        "kept_layers": list(plan.kept_layers) if plan else None,
        "strategy": plan.strategy if plan else None,
        "source_num_layers": plan.source_num_layers if plan else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {args.model}", show_header=False)
    table.add_row("data", source)
    table.add_row("layers", str(report["num_layers"]) if plan is None else
                  f"{plan.depth}/{plan.source_num_layers} ({plan.strategy}: kept {_ranges(plan.kept_layers)})")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.2f}")
    table.add_row("tokens", str(result.tokens))
    Console().print(table)
    return 0

