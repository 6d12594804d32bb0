"""`prufed profile` and `prufed plan` end to end through the real CLI entry point (in-process)."""

from __future__ import annotations

import json

import pytest

from edge_client.core.memory import TrainingSetup, estimate_memory
from edge_client.hardware_profiles import load_profiles
from prufed import cli

GIB = 2**30


@pytest.fixture(autouse=True)
def only_plan_commands(monkeypatch):
    """The real `prufed` entry point, registering only this module's commands (others may still be in progress)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("prufed.cli.plan",))


def main(argv):
    return cli.main(argv)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_profile_json_parses(capsys):
    code, out, _ = run_cli(capsys, "profile", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_memory_bytes"] > 0 and data["budget_bytes"] > 0
    assert data["nearest_profile"] in load_profiles() and data["accelerator"] in ("cpu", "cuda")
    code, out, _ = run_cli(capsys, "profile")
    assert code == 0 and "nearest_profile" in out and "budget_bytes" in out


def test_plan_llama_7b_table_covers_every_profile(capsys):
    code, out, _ = run_cli(capsys, "plan", "--config", "llama-2-7b", "--json")
    data = json.loads(out)
    assert code == 0 and data["num_layers"] == 32
    rows = {row["profile"]: row for row in data["profiles"]}
    assert set(rows) == set(load_profiles())
    nano, agx = rows["jetson-orin-nano-8gb"], rows["jetson-agx-orin-64gb"]
    assert agx["depth"] == 32 and (nano["depth"] is None or nano["depth"] < 32)
    for row in rows.values():
        if row["depth"] is not None:
            assert row["breakdown"]["total_bytes"] <= row["budget_bytes"]
            assert len(row["kept_layers"]) == row["depth"]
    code, out, _ = run_cli(capsys, "plan", "--config", "llama-2-7b")
    assert code == 0 and "jetson-orin-nano-8gb" in out and "rtx4090-24gb-desktop" in out


def test_plan_profile_shows_depth_kept_layers_and_breakdown(capsys):
    code, out, _ = run_cli(capsys, "plan", "--config", "llama-2-7b", "--profile", "rtx3060-12gb-desktop", "--json")
    result = json.loads(out)
    profile = load_profiles()["rtx3060-12gb-desktop"]
    setup = TrainingSetup(quant="nf4", accelerator="cuda")
    depth = result["depth"]
    assert estimate_memory(result_config := _llama(), depth, setup).total_bytes <= profile.budget_bytes
    if depth < 32:
        assert estimate_memory(result_config, depth + 1, setup).total_bytes > profile.budget_bytes
    assert result["kept_layers"] == list(range(depth))  # "top" drops the last layers
    code, out, _ = run_cli(capsys, "plan", "--config", "llama-2-7b", "--profile", "rtx3060-12gb-desktop")
    assert code == 0 and f"chosen depth: {depth} / 32" in out and "optimizer_state" in out and "total" in out


def _llama():
    from importlib import resources

    return json.loads(resources.files("edge_client.builtin_configs").joinpath("llama-2-7b.json").read_text())


def test_plan_budget_model_dir_and_scored_strategy(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "plan", "--model", str(tiny_model_dir), "--budget-gib", "0.6",
                           "--strategy", "even-alternate", "--json")
    result = json.loads(out)
    assert code == 0 and result["num_layers"] == 8 and 1 <= result["depth"] <= 8
    assert len(result["kept_layers"]) == result["depth"]
    code, out, _ = run_cli(capsys, "plan", "--config", "smollm2-135m", "--budget-gib", "2", "--strategy",
                           "magnitude", "--json")
    result = json.loads(out)
    assert result["kept_layers"] is None and "calibration" in result["note"] and result["depth"] >= 1
    code, out, _ = run_cli(capsys, "plan", "--config", "smollm2-135m", "--budget-gib", "0.01")
    assert code == 0 and "none fits" in out


@pytest.mark.parametrize("argv, flag", [
    (["plan", "--config", "llama-2-7b", "--budget-gib", "-1"], "--budget-gib"),
    (["plan", "--config", "llama-2-7b", "--budget-gib", "nan"], "--budget-gib"),
    (["plan", "--config", "llama-2-7b", "--profile", "toaster"], "--profile"),
    (["plan", "--config", "no-such-config"], "--config"),
    (["plan", "--model", "/no/such/dir"], "--model"),
    (["plan", "--config", "llama-2-7b", "--seq-len", "0", "--budget-gib", "4"], "--seq-len"),
    (["plan", "--config", "llama-2-7b", "--lora-targets", "q_proj,wq", "--budget-gib", "4"], "--lora-targets"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and flag in err and out == ""


def test_argparse_rejects_conflicting_targets(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["plan", "--config", "llama-2-7b", "--profile", "laptop-cpu-8gb", "--budget-gib", "4"])
    assert excinfo.value.code == 2 and "--budget-gib" in capsys.readouterr().err
