"""The `prufed` command line: maps subcommands to functions, nothing else.

Each command module exposes `register(subparsers)` and keeps heavy imports (torch, transformers) inside its
handlers, so `prufed --help` is instant and `prufed generate --onnx` never imports torch. A command whose role
extra is not installed stops here with the pip command that installs it (`prufed.cli.extras`), exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from prufed import __version__
from prufed.cli import quiet
from prufed.cli.extras import COMMAND_EXTRAS, extras_providing, install_hint, missing_extras, missing_extras_message
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
    "prufed.cli.doctor",  # doctor
    "prufed.cli.export_adapter",  # export-adapter
)
FIRST_PARTY = ("prufed", "edge_client", "aggregator")


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
    extras = COMMAND_EXTRAS.get(args.command, ())
    missing = missing_extras(extras)
    if missing:
        print(f"error: {missing_extras_message(args.command, missing)}", file=sys.stderr)
        return 2
    quiet.configure(args.verbose)
    try:
        return int(args.func(args) or 0)
    except PrufedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # A module outside the command's own extras (export-adapter --db needs the aggregator's store), a
        # source checkout on PYTHONPATH (no metadata to check up front) or a broken environment.
        if exc.name is None or exc.name.partition(".")[0] in FIRST_PARTY:
            raise
        providers = extras_providing(exc.name)
        needed = [extra for extra in providers if extra in extras] or providers or list(extras)
        hint = install_hint(needed) if needed else "pip install --force-reinstall prufed"
        print(f"error: {exc.name} is not installed; `prufed {args.command}` needs {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
