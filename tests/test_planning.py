"""One planner: `prufed plan`, `prufed train --depth auto`, `prufed edge run` and `prufed simulate --profiles` pick the
same precision and depth for every shipped hardware profile; `--quant auto` rules; the README table is generated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from edge_client.core.hardware import HardwareSpec
from edge_client.core.memory import GIB, QUANT_CHOICES, RUNTIME_BYTES, BudgetTooSmall, TrainingSetup
from edge_client.hardware_profiles import load_profiles
from edge_client.planning import CPU_SPEED_ORDER, auto_quant_candidates, device_spec, plan_training
from prufed import cli

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(load_profiles())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """LLaMA-2-7B's config.json (values only) as a model directory: planning reads config.json and never loads
    weights, so the placeholder weight file only satisfies the directory check (loading it would fail loudly)."""
    path = tmp_path_factory.mktemp("llama-2-7b-config")
    path.joinpath("config.json").write_text(
        resources.files("edge_client.builtin_configs").joinpath("llama-2-7b.json").read_text())
    path.joinpath("model.safetensors").write_bytes(b"")
    return path


def _via_plan(capsys, model: Path, profile: str, quant: str) -> tuple[int, str]:
    assert cli.main(["plan", "--model", str(model), "--profile", profile, "--quant", quant, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    return result["depth"], result["quant"]


def _via_train(model: Path, profile: str, quant: str, tmp_path: Path) -> tuple[int, str]:
    from edge_client.train import resolve_plan
    from prufed.cli.train import config_from_args

    args = cli.build_parser().parse_args(["train", "--model", str(model), "--depth", "auto", "--profile", profile,
                                          "--quant", quant, "--out", str(tmp_path / "train")])
    plan, chosen, _ = resolve_plan(config_from_args(args))
    return plan.depth, chosen


def _via_edge(argv: list[str]) -> tuple[int, str]:
    from edge_client.agent import hardware_spec, plan_layers
    from prufed.cli.edge import build_config

    config = build_config(cli.build_parser().parse_args(argv))
    plan, choice = plan_layers(config, hardware_spec(config))
    return plan.depth, choice["quant"]


def _via_simulate(model: Path, profile: str, quant: str, tmp_path: Path) -> tuple[int, str]:
    """The exact `prufed edge run` arguments `prufed simulate --profiles` launches for a client, planned."""
    from prufed.simulation.run import ClientSpec, SimulationConfig, agent_args

    data = tmp_path / "data.jsonl"
    data.write_text("")
    config = SimulationConfig(out=tmp_path, depths=None, profiles=(profile,), quant=quant, gradient_checkpointing=True)
    spec = ClientSpec(0, ["--depth", "auto", "--profile", profile], data, 0, {}, state_dir=tmp_path / "state")
    return _via_edge(agent_args(config, spec, "127.0.0.1:1", "token", str(model), "sim"))


@pytest.mark.parametrize("quant", ["auto", "fp32"])
def test_every_command_picks_the_same_depth_for_every_profile(capsys, llama_dir, tmp_path, quant):
    depths = set()
    for profile in PROFILES:
        expected = plan_training(json.loads((llama_dir / "config.json").read_text()), device_spec(profile),
                                 TrainingSetup(), quant=quant, depth="auto")
        picks = {
            "prufed plan": _via_plan(capsys, llama_dir, profile, quant),
            "prufed train --depth auto": _via_train(llama_dir, profile, quant, tmp_path),
            "prufed edge run": _via_edge(["edge", "run", "--aggregator", "127.0.0.1:1", "--model", str(llama_dir),
                                          "--profile", profile, "--quant", quant]),
            "prufed simulate --profiles": _via_simulate(llama_dir, profile, quant, tmp_path),
        }
        assert set(picks.values()) == {(expected.depth, expected.quant)}, (profile, picks)
        depths.add(expected.depth)
    assert len(depths) >= 3  # the profiles really differ, so agreement is not agreement on "all layers"


def test_jetson_unified_memory_counts_the_runtime(llama_dir):
    """The drift this module fixed: only `prufed plan` counted a Jetson's CPU-side runtime in its shared memory."""
    config = json.loads((llama_dir / "config.json").read_text())
    spec = device_spec("jetson-orin-nano-8gb")
    planned = plan_training(config, spec, TrainingSetup(), depth="auto")
    as_discrete = plan_training(config, replace(spec, unified_memory=False), TrainingSetup(), depth="auto")
    assert spec.unified_memory and planned.breakdown.total_bytes <= spec.budget_bytes
    assert planned.breakdown.overhead - as_discrete.breakdown.overhead == RUNTIME_BYTES
    assert planned.depth < as_discrete.depth


def _cpu(budget_gib: float, *, bf16: bool, bnb: bool = True) -> HardwareSpec:
    return HardwareSpec(name="cpu", total_memory_bytes=int(budget_gib * GIB), available_memory_bytes=int(budget_gib * GIB),
                        unified_memory=False, accelerator="cpu", compute_capability=None, bnb_4bit=bnb,
                        budget_fraction=1.0, cpu_bf16=bf16)


def test_auto_quant_candidates_follow_the_measured_cpu_order():
    assert CPU_SPEED_ORDER[:2] == ("bf16", "fp32")  # measured: bf16 0.62 s, fp32 1.17 s per step here
    assert auto_quant_candidates(_cpu(8, bf16=True)) == CPU_SPEED_ORDER
    assert auto_quant_candidates(_cpu(8, bf16=False)) == ("fp32", "nf4", "int8")
    assert auto_quant_candidates(_cpu(8, bf16=False, bnb=False)) == ("fp32",)
    gpu = replace(_cpu(8, bf16=False), accelerator="cuda", compute_capability="8.6")
    assert auto_quant_candidates(gpu) == ("nf4",)
    assert auto_quant_candidates(device_spec("raspberry-pi-5-8gb")) == ("fp32",)  # a profile's default_quant
    assert set(QUANT_CHOICES) == {"auto", *CPU_SPEED_ORDER}


def test_cpu_auto_picks_the_fastest_that_fits_and_prefers_depth():
    config = json.loads(resources.files("edge_client.builtin_configs").joinpath("llama-2-7b.json").read_text())
    roomy = plan_training(config, _cpu(64, bf16=True), TrainingSetup(), depth="auto")
    assert (roomy.quant, roomy.depth) == ("bf16", 32)
    # without native bf16, fp32 fits only some layers in 10 GiB and nf4 fits more: depth first, then speed
    tight = plan_training(config, _cpu(10, bf16=False), TrainingSetup(), depth="auto")
    fp32_only = plan_training(config, _cpu(10, bf16=False), TrainingSetup(), quant="fp32", depth="auto")
    assert tight.quant == "nf4" and tight.depth > fp32_only.depth
    # a fixed depth: the fastest precision whose prediction fits
    fixed = plan_training(config, _cpu(10, bf16=False), TrainingSetup(), depth=fp32_only.depth)
    assert fixed.quant == "fp32" and fixed.fits
    deeper = plan_training(config, _cpu(10, bf16=False), TrainingSetup(), depth=fp32_only.depth + 1)
    assert deeper.quant == "nf4" and deeper.fits
    with pytest.raises(BudgetTooSmall):
        plan_training(config, _cpu(0.5, bf16=True), TrainingSetup(), depth="auto")


def test_this_machine_reports_its_cpu_bf16_to_the_planner():
    from edge_client.model import native_bf16
    from edge_client.profiling import profile_device

    spec = profile_device()
    assert spec.cpu_bf16 == native_bf16("cpu")
    assert ("bf16" in auto_quant_candidates(spec)) == (spec.accelerator == "cpu" and spec.cpu_bf16)


def test_readme_planner_table_is_generated(tmp_path):
    script = REPO / "scripts" / "planner_table.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    stale = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", stale)
    stale.write_text(stale.read_text().replace("| jetson-orin-nano-8gb |", "| jetson-orin-nano-8gb (typo) |"))
    assert subprocess.run([sys.executable, str(script), "--check", "--readme", str(stale)],
                          capture_output=True, cwd=REPO).returncode == 1
    assert subprocess.run([sys.executable, str(script), "--readme", str(stale)], capture_output=True,
                          cwd=REPO).returncode == 0
    assert stale.read_text() == (REPO / "README.md").read_text()
