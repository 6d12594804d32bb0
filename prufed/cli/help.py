"""The help formatter every `prufed` subcommand and script uses."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each flag's default, and keep multi-line epilog examples as written.

    No "(default: None)" or "(default: False)" noise for unset options and switches, and no second default where
    the help text already states one.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)
