"""`prufed edge run`: the long-running edge agent (register, then pull -> download -> train -> upload per round)."""

from __future__ import annotations

import math
from pathlib import Path

from edge_client.core.memory import QUANT_CHOICES
from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES, parse_protect
from prufed.cli.help import HelpFormatter
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

EPILOG = """examples:
  prufed edge run --aggregator agg.example.org:50051 --tls-ca ca.crt --token "$(cat enroll.txt)" \\
      --data my_private.jsonl --depth auto --state-dir ~/.prufed/agent
  # emulate a smaller device on a laptop:
  prufed edge run --aggregator 127.0.0.1:50051 --token T --profile jetson-orin-nano-8gb --quant fp32
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("edge", help="run the edge agent that trains for the aggregator",
                                   description="The PruFed edge agent.")
    sub = parser.add_subparsers(dest="edge_command", metavar="SUBCOMMAND", required=True)
    run = sub.add_parser(
        "run", help="register and train every round until the federation is done",
        formatter_class=HelpFormatter, epilog=EPILOG,
        description="Profile this device (or emulate one), pick the pruned depth, register the kept layers and "
        "loop: pull a task, download the global adapter slice, train LoRA locally, upload the delta. Every step "
        "is persisted in --state-dir, so a restarted agent resumes where it stopped. Local data never leaves "
        "the device; only the update file is uploaded. SIGTERM stops cleanly (exit 0).")
    run.add_argument("--aggregator", required=True,
                     help="HOST:PORT of the aggregator's gRPC endpoint, or HOST:PORT,HOST:PORT,... of several "
                          "replicas: calls are balanced over them (gRPC round_robin) and a call that fails on a dying "
                          "replica is retried on another")
    run.add_argument("--token", default=None,
                     help="enrolment token for the first Register (afterwards the per-client token in "
                          "--state-dir is used)")
    run.add_argument("--data", default=None, help="private instruction file (JSON/JSONL: alpaca, dolly or gsm8k); "
                                                  "default: built-in KJV demo tasks")
    run.add_argument("--depth", default="auto", help="decoder layers to keep, or 'auto' (memory planner)")
    run.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                     help=f"which layers to keep: {', '.join(STRATEGIES)}")
    run.add_argument("--protect", default="", help="comma-separated ORIGINAL layer indices never dropped")
    run.add_argument("--state-dir", default="prufed-agent", help="directory for state.json, downloads and updates")
    run.add_argument("--tls-ca", default=None, help="PEM CA that signed the aggregator's certificate (enables TLS)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--profile", default=None, help="emulate this hardware profile (hardware_profiles/NAME.yaml)")
    group.add_argument("--budget-gib", type=float, default=None, help="emulate this training memory budget in GiB")
    run.add_argument("--quant", default="auto", choices=QUANT_CHOICES,
                     help="weight precision; auto = on a CPU the fastest that fits the budget (bf16 where the "
                     "CPU has native bf16, else fp32), on a GPU nf4, with --profile its default_quant")
    run.add_argument("--model", default=DEFAULT_MODEL, help="base model alias or local HF directory (unpruned)")
    run.add_argument("--max-examples", type=int, default=None, help="use at most this many local examples")
    run.add_argument("--eval-examples", type=int, default=16,
                     help="hold out up to this many local examples (at most 10%%) to score each downloaded global "
                          "before training; the loss and count go with the upload (0: no federated evaluation)")
    run.add_argument("--seed", type=int, default=0, help="seed for data order and the demo data")
    run.add_argument("--name", default="", help="a display name sent at registration")
    run.add_argument("--no-gradient-checkpointing", action="store_true",
                     help="keep activations (faster, more memory)")
    run.add_argument("--retry-base", type=float, default=0.5, help="first backoff window in seconds")
    run.add_argument("--retry-cap", type=float, default=30.0, help="largest backoff window in seconds")
    run.add_argument("--retry-attempts", type=int, default=8, help="attempts per call before giving up")
    run.add_argument("--verbose", action="store_true", help="training progress and mode lines on stderr")
    run.set_defaults(func=run_command)


def _depth(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        depth = int(text)
    except ValueError:
        raise ConfigError("--depth", f"must be 'auto' or a positive integer, got {text!r}") from None
    if depth < 1:
        raise ConfigError("--depth", f"must be >= 1, got {depth}")
    return depth


def build_config(args):
    from edge_client.agent import AgentConfig
    from edge_client.backoff import BackoffPolicy
    from edge_client.transport import parse_addresses

    parse_addresses(args.aggregator)  # errors name --aggregator
    if args.budget_gib is not None and not (math.isfinite(args.budget_gib) and args.budget_gib > 0):
        raise ConfigError("--budget-gib", f"must be a positive number of GiB, got {args.budget_gib}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError("--max-examples", f"must be >= 1, got {args.max_examples}")
    if args.eval_examples < 0:
        raise ConfigError("--eval-examples", f"must be >= 0, got {args.eval_examples}")
    if args.data is not None and not Path(args.data).is_file():
        raise ConfigError("--data", f"{args.data}: no such file")
    if args.tls_ca is not None and not Path(args.tls_ca).is_file():
        raise ConfigError("--tls-ca", f"{args.tls_ca}: no such file")
    if args.profile is not None:
        from edge_client.hardware_profiles import get_profile

        get_profile(args.profile)  # unknown names fail here, naming --profile
    return AgentConfig(
        aggregator=args.aggregator, state_dir=Path(args.state_dir).expanduser(), enroll_token=args.token,
        model=args.model, data=args.data, depth=_depth(args.depth), strategy=args.strategy,
        protect=parse_protect(args.protect), profile=args.profile, budget_gib=args.budget_gib, quant=args.quant,
        tls_ca=args.tls_ca, max_examples=args.max_examples, eval_examples=args.eval_examples, seed=args.seed,
        name=args.name,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        backoff=BackoffPolicy(args.retry_base, args.retry_cap, args.retry_attempts), verbose=args.verbose)


def run_command(args) -> int:
    from edge_client.agent import run_agent

    return run_agent(build_config(args))
