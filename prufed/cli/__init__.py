"""The `prufed` command line: maps subcommands to functions, nothing else.

Each command module exposes `register(subparsers)` and keeps heavy imports (torch, transformers) inside its
handlers, so `prufed --help` is instant and `prufed generate --onnx` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from prufed import __version__
from prufed.cli import quiet
from prufed.common.errors import PrufedError

COMMAND_MODULES: tuple[str, ...] = (
    "prufed.cli.pruning",  # prune, layers, eval
    "prufed.cli.aggregate",  # aggregate
    "prufed.cli.plan",  # profile, plan
    "prufed.cli.train",  # train
    "prufed.cli.aggregator",  # aggregator serve | status
    "prufed.cli.edge",  # edge run
    "prufed.cli.simulate",  # simulate
    "prufed.cli.onnx",  # export-onnx, generate
    "prufed.cli.export_adapter",  # export-adapter
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prufed",
        description="PruFed: federated fine-tuning of layer-pruned LLMs across heterogeneous devices.",
        epilog="Run `prufed COMMAND --help` for a command's options. Errors exit with status 2.",
    )
    parser.add_argument("--version", action="version", version=f"prufed {__version__}")
    parser.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    quiet.add_verbose_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet.configure(args.verbose)
    try:
        return int(args.func(args) or 0)
    except PrufedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
