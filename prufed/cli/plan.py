"""`prufed profile` and `prufed plan`: what this device is, and how deep a pruned model it can fine-tune.

`prufed plan` reads a config.json only (never weights), so a 7B model can be planned on a laptop. Heavy imports
(torch, via the profiler's CUDA/bitsandbytes probes) stay inside the handlers.
"""

from __future__ import annotations

import json
import math
import sys
from importlib import resources
from pathlib import Path

from edge_client.core.memory import ACCELERATORS, MIB, OPTIMIZERS, QUANT_CHOICES, TARGET_SHAPES
from edge_client.core.pruning import DEFAULT_STRATEGY, POSITIONAL_STRATEGIES, STRATEGIES
from prufed.cli.help import HelpFormatter
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

GIB = 2**30
BUILTIN_PACKAGE = "edge_client.builtin_configs"


def builtin_configs() -> list[str]:
    """Names accepted by `--config` without a path (config values only, no weights)."""
    return sorted(p.name[: -len(".json")] for p in resources.files(BUILTIN_PACKAGE).iterdir() if p.name.endswith(".json"))


def register(subparsers) -> None:
    fmt = HelpFormatter
    profile = subparsers.add_parser(
        "profile", help="probe this device: memory, accelerator, sensors, nearest hardware profile",
        formatter_class=fmt,
        description="Probe this machine (psutil, torch.cuda, Jetson files, bitsandbytes). Missing sensors are "
        "reported as absent.",
        epilog="example: prufed profile --json",
    )
    profile.add_argument("--json", action="store_true", help="print the HardwareSpec as JSON on stdout")
    profile.set_defaults(func=cmd_profile)

    plan = subparsers.add_parser(
        "plan", help="choose the deepest pruned depth whose LoRA training fits a memory budget", formatter_class=fmt,
        description="Predict peak training memory from a model config alone (no weights) and choose the deepest "
        "kept depth that fits budget_fraction x memory of a hardware profile, an explicit budget or this device. "
        "With no target, print the chosen depth for every shipped hardware profile.",
        epilog="examples: prufed plan --config llama-2-7b    |    "
        "prufed plan --model smollm2-135m --profile jetson-orin-nano-8gb --json    |    "
        "prufed plan --config llama-2-7b --budget-gib 6 --quant nf4 --seq-len 512",
    )
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help=f"model alias ({DEFAULT_MODEL}) or local HF directory; only config.json is read "
                        f"(default when --config is not given: {DEFAULT_MODEL})")
    source.add_argument("--config", default=None,
                        help="a config.json path or a built-in config name (values only, no weights): "
                        + ", ".join(builtin_configs()))
    target = plan.add_mutually_exclusive_group()
    target.add_argument("--profile", default=None, help="hardware profile name (see hardware_profiles/*.yaml)")
    target.add_argument("--budget-gib", type=float, default=None,
                        help="explicit memory budget in GiB, on this machine's accelerator (see --accelerator)")
    target.add_argument("--this-device", action="store_true", help="probe this machine and use its budget")
    target.add_argument("--all-profiles", action="store_true",
                        help="table of the chosen depth per hardware profile (the default when no target is given)")
    plan.add_argument("--accelerator", choices=ACCELERATORS, default=None,
                      help="where the budget lives, for --budget-gib (cuda: count the CUDA context, not Python); "
                      "default: this machine's")
    plan.add_argument("--seq-len", type=int, default=256, help="tokens per training example")
    plan.add_argument("--batch", type=int, default=1, help="examples per micro-batch")
    plan.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    plan.add_argument("--lora-targets", default="q_proj,v_proj",
                      help=f"comma-separated LoRA target modules from {', '.join(TARGET_SHAPES)}")
    plan.add_argument("--quant", default="auto", choices=QUANT_CHOICES,
                      help="weight precision; auto = a profile's default_quant, on this machine's CPU the fastest "
                      "precision that fits, on its GPU nf4 (the same rule as `prufed train` and `prufed edge run`)")
    plan.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer whose state is counted")
    plan.add_argument("--no-grad-ckpt", action="store_true", help="plan without gradient checkpointing")
    plan.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                      help=f"pruning strategy for the kept layers: {', '.join(STRATEGIES)}")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    plan.set_defaults(func=cmd_plan)


def cmd_profile(args) -> int:
    from edge_client.profiling import profile_device

    spec = profile_device()
    data = spec.to_json_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="this device", show_header=False)
    for key, value in data.items():
        if key.endswith("_bytes") and value is not None:
            value = f"{value / GIB:.2f} GiB"
        table.add_row(key, "absent" if value is None else str(value))
    Console().print(table)
    return 0


def load_plan_config(model: str | None, config: str | None) -> tuple[str, dict]:
    """(label, config dict) from --config (path or built-in name) or --model (config.json only)."""
    if config is not None:
        if config in builtin_configs():
            text = resources.files(BUILTIN_PACKAGE).joinpath(f"{config}.json").read_text()
            return config, json.loads(text)
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError("--config", f"{config!r} is neither a config.json file nor a built-in "
                              f"({', '.join(builtin_configs())})")
        try:
            return str(config), json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid JSON ({exc.msg})") from None
    from prufed.common.models import default_model_dir, read_model_config

    spec = model or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        converted = default_model_dir() / "config.json"
        if converted.is_file():
            return spec, json.loads(converted.read_text())
        # Not converted yet: the shipped copy of its config avoids a 30 s conversion just to read 20 numbers.
        return spec, json.loads(resources.files(BUILTIN_PACKAGE).joinpath(f"{DEFAULT_MODEL}.json").read_text())
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError("--model", f"{spec!r} is not a directory (give a local HF model directory or "
                          f"'{DEFAULT_MODEL}')")
    return spec, read_model_config(path)


def _setup(args):
    """The training setup flags; the planner fills in the device and the precision."""
    from edge_client.core.memory import TrainingSetup

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return TrainingSetup(seq_len=args.seq_len, batch=args.batch, lora_r=args.lora_r, lora_targets=targets,
                         gradient_checkpointing=not args.no_grad_ckpt, optimizer=args.optimizer)


def plan_row(config: dict, spec, setup, quant: str, strategy: str) -> dict:
    """Depth, precision, kept layers and breakdown of `edge_client.planning.plan_training` on one device;
    `depth` None when nothing fits. The README's planner table is built from these rows."""
    from edge_client.core.memory import BudgetTooSmall
    from edge_client.core.pruning import make_plan
    from edge_client.planning import auto_quant_candidates, plan_training

    num_layers = int(config["num_hidden_layers"])
    result: dict = {"budget_bytes": spec.budget_bytes, "accelerator": spec.accelerator,
                    "unified_memory": spec.unified_memory, "num_layers": num_layers, "strategy": strategy}
    try:
        planned = plan_training(config, spec, setup, quant=quant, depth="auto")
    except BudgetTooSmall as exc:
        tried = quant if quant != "auto" else "/".join(auto_quant_candidates(spec))
        return {**result, "quant": tried, "depth": None, "kept_layers": None, "error": str(exc),
                "needed_bytes": exc.needed_bytes}
    assert planned.depth_plan is not None
    result.update(quant=planned.quant, quant_source=planned.quant_source, depth=planned.depth,
                  breakdown=planned.breakdown.to_json_dict(),
                  totals_by_depth=planned.depth_plan.to_json_dict()["totals_by_depth"])
    if strategy in POSITIONAL_STRATEGIES:
        result["kept_layers"] = list(make_plan(strategy, num_layers, planned.depth).kept_layers)
    else:
        result["kept_layers"] = None
        result["note"] = (f"{strategy!r} chooses layers from scores on calibration text, which needs the weights: "
                          f"run `prufed layers --keep {planned.depth}` or `prufed prune --strategy {strategy}`")
    return result


def _check_args(args) -> None:
    for flag, value in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--lora-r", args.lora_r)):
        if value < 1:
            raise ConfigError(flag, f"must be an integer >= 1, got {value}")
    if args.budget_gib is not None and not (math.isfinite(args.budget_gib) and args.budget_gib > 0):
        raise ConfigError("--budget-gib", f"must be a positive number of GiB, got {args.budget_gib}")


def cmd_plan(args) -> int:
    from dataclasses import replace

    from edge_client.core.memory import ModelShape
    from edge_client.hardware_profiles import load_profiles
    from edge_client.planning import device_spec

    _check_args(args)
    label, config = load_plan_config(args.model, args.config)
    ModelShape.from_config(config)  # a config missing a planner field fails here, naming the field
    setup = _setup(args)
    if args.profile is not None or args.budget_gib is not None or args.this_device:
        spec = device_spec(args.profile, args.budget_gib)
        if args.budget_gib is not None and args.accelerator not in (None, spec.accelerator):
            spec = replace(spec, accelerator=args.accelerator, unified_memory=False)
        if args.profile is not None:
            target = f"profile {args.profile}"
        elif args.budget_gib is not None:
            target = f"budget {args.budget_gib} GiB"
        else:
            target = f"this device ({spec.name}, nearest {spec.nearest_profile})"
        result = {"model": label, "target": target, **({"profile": args.profile} if args.profile else {}),
                  **plan_row(config, spec, setup, args.quant, args.strategy)}
        return _print_single(args, result)
    rows = [{"profile": name, "memory_gib": profile.memory_gib,
             **plan_row(config, device_spec(name), setup, args.quant, args.strategy)}
            for name, profile in load_profiles().items()]
    return _print_table(args, label, config, rows)


def _print_single(args, result: dict) -> int:
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    num_layers = result["num_layers"]
    print(f"model: {result['model']} ({num_layers} layers)   target: {result['target']}   "
          f"budget: {result['budget_bytes'] / MIB:.0f} MiB   quant: {result['quant']} on {result['accelerator']}")
    if result["depth"] is None:
        print(f"chosen depth: none fits — {result['error']}")
        return 0
    print(f"chosen depth: {result['depth']} / {num_layers}")
    if result["kept_layers"] is not None:
        print(f"kept layers ({result['strategy']}): {result['kept_layers']}")
    else:
        print(f"kept layers: {result['note']}")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"predicted peak at depth {result['depth']}")
    table.add_column("component")
    table.add_column("MiB", justify="right")
    for key, value in result["breakdown"].items():
        table.add_row("total" if key == "total_bytes" else key, f"{value / MIB:,.1f}")
    Console().print(table)
    return 0


def _print_table(args, label: str, config: dict, rows: list[dict]) -> int:
    if args.json:
        print(json.dumps({"model": label, "num_layers": int(config["num_hidden_layers"]), "profiles": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{label}: deepest trainable depth per hardware profile "
                  f"(seq {args.seq_len}, batch {args.batch}, LoRA r={args.lora_r} on {args.lora_targets})")
    for column, justify in (("profile", "left"), ("memory GiB", "right"), ("budget GiB", "right"),
                            ("quant", "left"), ("depth", "right"), ("predicted GiB", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        if row["depth"] is None:
            depth, predicted = "none fits", f"{row['needed_bytes'] / GIB:.2f} (1 layer)"
        else:
            depth, predicted = f"{row['depth']} / {row['num_layers']}", f"{row['breakdown']['total_bytes'] / GIB:.2f}"
        table.add_row(row["profile"], f"{row['memory_gib']:g}", f"{row['budget_bytes'] / GIB:.2f}", row["quant"],
                      depth, predicted)
    Console(width=max(100, Console().width)).print(table)
    print("kept layers: see `prufed plan --profile NAME`; strategy " + args.strategy, file=sys.stderr)
    return 0
