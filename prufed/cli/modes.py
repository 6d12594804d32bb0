"""`--mode` and `--mix`, as `prufed aggregate`, `prufed aggregator serve` and `prufed simulate` all take them."""

from __future__ import annotations

from aggregator.core.modes import MIX_HELP, MODE_HELP, MODES


def add_mode_arguments(parser, default: str | None = "heteagg") -> None:
    """Add `--mode` (one of aggregator.core.modes.MODES) and `--mix X|auto` to `parser`.

    default None: keep the value of a config file (serve's --config), else heteagg."""
    # no argparse `choices`: check_mode() refuses a bad value with an error that names --mode, as for every flag
    parser.add_argument("--mode", default=default, metavar="MODE",
                        help=f"aggregation mode, one of {'|'.join(MODES)} ({MODE_HELP})"
                        + ("" if default else " (default: the --config value, else heteagg)"))
    parser.add_argument("--mix", default=None, metavar="X|auto", help=f"with --mode mixed|additive: {MIX_HELP}")
