"""The help formatter every `prufed` subcommand uses."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each flag's default, and keep multi-line epilog examples as written."""
