"""`prufed simulate`: a heterogeneous federation on loopback with real aggregator and agent processes."""

from __future__ import annotations

import json
from argparse import SUPPRESS
from pathlib import Path

from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from prufed.cli.help import HelpFormatter
from prufed.cli.modes import add_mode_arguments
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

EPILOG = """examples:
  prufed simulate                                   # 6 clients over depths 30,20,10, 3 rounds -> runs/simulate/
  prufed simulate --profiles jetson-orin-nano-8gb,laptop-cpu-8gb --clients 4 --baseline homogeneous
  prufed simulate --smoke --model path/to/tiny-llama --depths 8,6,4 --out /tmp/sim
  prufed simulate --db postgresql+psycopg://me@127.0.0.1/scratch --replicas 2 --blob-store db --chaos 3
  prufed simulate --mode mixed --mix auto --baseline homogeneous   # per-group globals vs FedAvg per depth
  prufed simulate --engine flower --out runs/simulate-flower   # the same federation on Flower's Ray engine
"""


# Run sizes: the demo's defaults, and the tiny ones --smoke picks (explicit flags override either).
DEFAULT_SIZES = {"clients": 6, "rounds": 3, "local_steps": 6, "examples": 360, "heldout": 8, "seq_len": 160}
SMOKE_SIZES = {"clients": 3, "rounds": 2, "local_steps": 2, "examples": 30, "heldout": 6, "seq_len": 256}


def _size_help(name: str, text: str) -> str:
    return f"{text} (default: {DEFAULT_SIZES[name]}; with --smoke: {SMOKE_SIZES[name]})"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate", help="run a heterogeneous federation on this machine and write a report",
        formatter_class=HelpFormatter, epilog=EPILOG,
        description="Start a real aggregator and N real edge agents on 127.0.0.1, split the data non-IID "
        "(Dirichlet over categories), emulate devices of different strength (pruned depths or hardware profiles), "
        "run the rounds, print a live per-round table and write OUT/report.json, OUT/report.md and "
        "OUT/loss_per_depth.png.")
    parser.add_argument("--clients", type=int, default=SUPPRESS, help=_size_help("clients", "number of edge agents"))
    parser.add_argument("--rounds", type=int, default=SUPPRESS, help=_size_help("rounds", "federated rounds"))
    emulate = parser.add_mutually_exclusive_group()
    emulate.add_argument("--depths", default=None, help="comma-separated depths assigned round-robin "
                                                        "(default: 30,20,10 capped at the model's layer count)")
    emulate.add_argument("--profiles", default=None,
                         help="comma-separated hardware profiles assigned round-robin; each agent plans its depth "
                              "from the profile's memory budget")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                        help=f"pruning strategy: {', '.join(STRATEGIES)}")
    parser.add_argument("--data", default=None, help="instruction file with a 'category' per record (default: "
                                                     "built-in KJV demo tasks, category = book)")
    parser.add_argument("--out", default="runs/simulate", help="output directory")
    add_mode_arguments(parser)
    parser.add_argument("--eval-examples", type=int, default=4,
                        help="local examples each agent holds out for federated evaluation (0: none)")
    parser.add_argument("--engine", default="prufed", choices=("prufed", "flower"),
                        help="prufed: a real aggregator and agent processes over gRPC; flower: the same federation "
                             "on Flower's simulation engine (Ray backend, 127.0.0.1 only; needs prufed[flower])")
    parser.add_argument("--baseline", default=None, choices=("homogeneous",),
                        help="also run FedAvg within each depth group on the same data, for comparison")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skewed)")
    parser.add_argument("--local-steps", type=int, default=SUPPRESS,
                        help=_size_help("local_steps", "local optimiser steps per client per round"))
    parser.add_argument("--examples", type=int, default=SUPPRESS,
                        help=_size_help("examples", "training examples in all, split over clients"))
    parser.add_argument("--heldout", type=int, default=SUPPRESS,
                        help=_size_help("heldout", "held-out examples scored per depth per round"))
    parser.add_argument("--seq-len", type=int, default=SUPPRESS, help=_size_help("seq_len", "tokens per example"))
    parser.add_argument("--lr", type=float, default=1e-3, help="local AdamW learning rate")
    parser.add_argument("--quant", default="fp32", choices=("auto", "nf4", "int8", "bf16", "fp32"),
                        help="agents' weight precision (fp32 measured fastest on CPU for this demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, split and federation")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model alias or local HF directory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny default sizes for tests (see each size flag); flags given explicitly still win")
    parser.add_argument("--json", action="store_true", help="print report.json on stdout instead of tables")
    scale = parser.add_argument_group("replicas and chaos")
    scale.add_argument("--db", default=None, help="database URL the aggregator replicas share, e.g. "
                       "postgresql+psycopg://u@127.0.0.1/scratch (its PruFed tables are reset first; "
                       "default: SQLite OUT/agg.db)")
    scale.add_argument("--replicas", type=int, default=1, help="aggregator processes on the one database; agents "
                       "get all their addresses and balance over them")
    scale.add_argument("--blob-store", default="dir", choices=("dir", "db"),
                       help="where uploads and globals live (aggregator serve --blob-store)")
    scale.add_argument("--chaos", type=int, default=0, metavar="K", help="SIGKILL a random replica K times at "
                       "random moments (seeded by --seed), restarting each; report.json records the kills")
    parser.set_defaults(func=simulate_command)


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(flag, f"must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(flag, f"must be positive integers, got {text!r}")
    return values


def build_config(args):
    from prufed.simulation.run import SimulationConfig

    sizes = {name: getattr(args, name, default)
             for name, default in (SMOKE_SIZES if args.smoke else DEFAULT_SIZES).items()}
    profiles = depths = None
    if args.profiles is not None:
        profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
        from edge_client.hardware_profiles import get_profile

        for name in profiles:
            get_profile(name)  # unknown names fail naming --profile
    elif args.depths is not None:
        depths = _ints("--depths", args.depths)
    else:
        depths = (30, 20, 10)
    if depths is not None:
        from prufed.common.models import read_model_config, resolve_model

        layers = int(read_model_config(resolve_model(args.model))["num_hidden_layers"])
        if args.depths is None:  # the default fits any model: 100%, 2/3 and 1/3 of its layers
            depths = tuple(sorted({max(1, round(layers * f)) for f in (1.0, 2 / 3, 1 / 3)}, reverse=True))
        elif max(depths) > layers:
            raise ConfigError("--depths", f"{max(depths)} exceeds the model's {layers} layers")
    if args.data is not None and not Path(args.data).is_file():
        raise ConfigError("--data", f"{args.data}: no such file")
    if args.timeout <= 0:
        raise ConfigError("--timeout", f"must be > 0, got {args.timeout}")
    return SimulationConfig(out=Path(args.out), depths=depths, profiles=profiles, strategy=args.strategy,
                            data=args.data, alpha=args.alpha, lr=args.lr, quant=args.quant, seed=args.seed,
                            model=args.model, baseline=args.baseline, timeout_s=args.timeout, mode=args.mode,
                            mix=args.mix, eval_examples=args.eval_examples, db=args.db, replicas=args.replicas,
                            blob_store=args.blob_store, chaos=args.chaos, engine=args.engine, **sizes)


def simulate_command(args) -> int:
    from prufed.simulation.run import install_signal_cleanup, simulate, table_rows

    config = build_config(args)
    install_signal_cleanup()
    if args.json:
        report = simulate(config)
        print(json.dumps(report, indent=2, default=str))
        return 0

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file is no 80-column terminal: keep the table readable
    live_rows: dict[str, list[dict]] = {}

    def render() -> Table:
        table = Table(title="PruFed simulation (live)")
        hetero = live_rows.get(config.mode, [])
        depths = sorted({d for row in hetero for d in row["heldout_loss"]}, reverse=True)
        for column in ["run", "round", "clients/depth", "train loss", *[f"held-out d{d}" for d in depths],
                       "KiB up", "KiB down", "seconds"]:
            table.add_column(column, justify="right")
        for name, rows in live_rows.items():
            for row in rows:
                table.add_row(name, str(row["round"]),
                              " ".join(f"{d}:{n}" for d, n in row.get("clients_per_depth", {}).items()),
                              "–" if row.get("train_loss") is None else f"{row['train_loss']:.4f}",
                              *[f"{row['heldout_loss'][d]:.4f}" if d in row["heldout_loss"] else "" for d in depths],
                              f"{row.get('bytes_up', 0) / 1024:.0f}", f"{row.get('bytes_down', 0) / 1024:.0f}",
                              f"{row.get('seconds', 0.0):.1f}")
        return table

    with Live(render(), console=console, refresh_per_second=2, transient=False) as live:
        console.print(f"simulating {config.clients} clients × {config.rounds} rounds into {config.out} "
                      f"(logs: {config.out}/aggregator.log, {config.out}/clients/*/agent.log)", style="dim")

        def on_row(name: str, row: dict) -> None:
            live_rows.setdefault(name, []).append(row)
            live.update(render())

        report = simulate(config, on_row=on_row)
    header, lines = table_rows(report)
    final = Table(title=f"PruFed simulation: {report['wall_s']:.1f} s wall")
    for column in header:
        final.add_column(column, justify="right")
    for line in lines:
        final.add_row(*line)
    console.print(final)
    console.print(f"wrote {config.out}/report.json, report.md, loss_per_depth.png")
    return 0
