"""A quiet command line: third-party progress bars, advisory logs and FutureWarnings off unless `--verbose`,
and one rich progress bar of ours per long step.

Silencing works through the environment, set before transformers or huggingface_hub is imported (they read it
once, at import): HF_HUB_DISABLE_PROGRESS_BARS turns off every tqdm bar transformers draws ("Loading weights",
"Writing model shards"), TRANSFORMERS_VERBOSITY=error its info and advisory lines. Child processes (`simulate`,
agents) inherit the same environment, PYTHONWARNINGS included. A value the user set is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}
VERBOSE_HELP = "show third-party logs, progress bars and deprecation warnings (transformers, torch, onnxruntime)"


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """`--verbose` on `parser` and on every (nested) subcommand, so it works before or after the command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--verbose" in a.option_strings for a in sub._actions):
                    # SUPPRESS: an absent flag on the subcommand leaves the top-level value in place.
                    sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
                add_verbose_flag(sub)


def configure(verbose: bool) -> None:
    """Silence third-party noise for this process and its children (no-op with `verbose`); on a terminal, the
    default model's one-time conversion gets a progress bar."""
    import sys

    from prufed.common import models

    if sys.stderr.isatty():
        models.conversion_progress = step_progress
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The TorchScript ONNX exporter warns about how it lowers ops it handles correctly (parity is checked after).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")


def progress_bar():
    """A rich progress bar on stderr (description, bar, n/total, elapsed), off when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # Off when stderr is not a terminal: a redirected log would only get a stray blank line.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@contextlib.contextmanager
def step_progress(description: str) -> Iterator[Callable[[str], None]]:
    """One bar for a long step made of named stages; yields `stage(name)`, which relabels the bar."""
    progress = progress_bar()
    task = progress.add_task(description, total=None)
    with progress:
        yield lambda name: progress.update(task, description=name)


@contextlib.contextmanager
def count_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """One bar counting to `total`; yields `advance(done)`, which sets the count reached."""
    progress = progress_bar()
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda done: progress.update(task, completed=done)
