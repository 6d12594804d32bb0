"""`--help` of every `prufed` command: it parses, shows real defaults and examples, and no "(default: None)"."""

from __future__ import annotations

import argparse

import pytest

from prufed.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, prefix + (name,)) or [prefix + (name,)]
    return found


COMMANDS = _commands(build_parser())


def test_every_documented_command_is_registered():
    names = {" ".join(c) for c in COMMANDS}
    assert {"simulate", "edge run", "train", "plan", "prune", "export-onnx", "generate", "aggregate",
            "aggregator serve", "profile"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_defaults_without_noise(command, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: prufed {' '.join(command)}")
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default") <= text.count("--")  # at most one default per flag


def test_simulate_smoke_sizes_yield_to_explicit_flags(tiny_model_dir):
    from prufed.cli.simulate import DEFAULT_SIZES, SMOKE_SIZES, build_config

    parser = build_parser()
    model = ["--model", str(tiny_model_dir), "--depths", "2,1"]
    smoke = build_config(parser.parse_args(["simulate", "--smoke", "--rounds", "1", *model]))
    assert smoke.rounds == 1 and smoke.clients == SMOKE_SIZES["clients"] and smoke.seq_len == SMOKE_SIZES["seq_len"]
    plain = build_config(parser.parse_args(["simulate", "--clients", "4", *model]))
    assert plain.clients == 4 and plain.rounds == DEFAULT_SIZES["rounds"]
