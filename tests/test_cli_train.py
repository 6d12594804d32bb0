"""`prufed train` through prufed.cli.main: tiny model + a tiny Alpaca JSONL, --json, and bad flags (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

import prufed.cli
from edge_client.core.pruning import make_plan
from prufed.common.adapter_format import DELTA_FORMAT, load_adapter


@pytest.fixture(autouse=True)
def only_train_command(monkeypatch):
    """Parse only this module's command, so these tests do not depend on the other command modules."""
    monkeypatch.setattr(prufed.cli, "COMMAND_MODULES", ("prufed.cli.train",))


@pytest.fixture(scope="module")
def alpaca_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-data") / "tiny.jsonl"
    records = [{"instruction": "Reverse the letters.", "input": word, "output": word[::-1]}
               for word in ("abc", "dog", "tree", "moon", "fish", "rain", "star", "leaf", "sand", "wind")]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = prufed.cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_json_output_and_files(tiny_model_dir, alpaca_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run(capsys, "train", "--model", tiny_model_dir, "--depth", 3, "--strategy", "even-alternate",
                               "--data", alpaca_jsonl, "--max-steps", 3, "--quant", "fp32", "--eval-fraction", 0.2,
                               "--lora-r", 4, "--lora-alpha", 8, "--targets", "q_proj,k_proj,v_proj",
                               "--round", 2, "--out", out, "--json")
    assert code == 0
    metrics = json.loads(stdout)  # nothing but JSON on stdout
    kept = make_plan("even-alternate", 8, 3).kept_layers
    assert tuple(metrics["kept_layers"]) == kept
    assert metrics["depth_choice"] == {"mode": "fixed", "quant": "fp32", "quant_source": "flag"}
    assert metrics["quant"] == "fp32" and "quant: fp32" in stderr  # the mode is always printed
    assert metrics["num_examples"] == 8 and metrics["num_heldout"] == 2 and len(metrics["train_loss"]) == 3
    assert metrics["eval_before"]["tokens"] == metrics["eval_after"]["tokens"] > 0
    delta, meta = load_adapter(out / "update.safetensors")
    assert meta.format == DELTA_FORMAT and meta.round == 2 and meta.kept_layers == kept
    assert meta.lora == {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj"]}
    assert len(delta) == 3 * 3 * 2 and all(value.shape[0] == 4 or value.shape[1] == 4 for value in delta.values())
    assert json.loads((out / "metrics.json").read_text())["train_loss"] == metrics["train_loss"]


def test_train_table_and_resume_flag(tiny_model_dir, alpaca_jsonl, tmp_path, capsys):
    args = ["train", "--model", tiny_model_dir, "--depth", 2, "--data", alpaca_jsonl, "--max-steps", 2,
            "--quant", "fp32", "--checkpoint-every", 1, "--out", tmp_path]
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "held-out loss after" in stdout and "2/8 (top, fixed)" in stdout
    first, _ = load_adapter(tmp_path / "update.safetensors")
    code, stdout, stderr = run(capsys, *args, "--resume", "--json")  # the checkpoint already holds step 2
    assert code == 0 and json.loads(stdout)["resumed_from_step"] == 2 and "continuing from step 2" in stderr
    again, _ = load_adapter(tmp_path / "update.safetensors")
    assert all(torch.equal(first[key], again[key]) for key in first)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--depth", "zero"], "--depth"),
        (["--depth", "0"], "--depth"),
        (["--depth", "9"], "--depth"),
        (["--depth", "2", "--budget-gib", "1"], "--budget-gib"),
        (["--depth", "2", "--profile", "laptop-cpu-8gb"], "--profile"),
        (["--depth", "auto", "--profile", "no-such-device"], "--profile"),
        (["--depth", "2", "--max-steps", "0"], "--max-steps"),
        (["--depth", "2", "--lr", "-1"], "--lr"),
        (["--depth", "2", "--seq-len", "2"], "--seq-len"),
        (["--depth", "2", "--eval-fraction", "1.5"], "--eval-fraction"),
        (["--depth", "2", "--targets", ","], "--targets"),
        (["--depth", "2", "--data", "/nonexistent/data.json"], "--data"),
        (["--depth", "2", "--global-adapter", "/nonexistent/a.safetensors"], "--global-adapter"),
        (["--depth", "2", "--protect", "x"], "--protect"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tiny_model_dir, tmp_path, capsys, extra, flag):
    code, stdout, stderr = run(capsys, "train", "--model", tiny_model_dir, "--quant", "fp32", "--out", tmp_path, *extra)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: {flag}")


def test_bad_data_file_exits_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "wrong.json"
    data.write_text(json.dumps([{"prompt": "hi", "completion": "yo"}]))
    code, _, stderr = run(capsys, "train", "--model", tiny_model_dir, "--depth", 2, "--quant", "fp32",
                          "--data", data, "--out", tmp_path / "o")
    assert code == 2 and stderr.startswith("error: --format") and "cannot detect" in stderr


def test_argparse_rejects_unknown_choices(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prufed.cli.main(["train", "--model", str(tiny_model_dir), "--depth", "2", "--quant", "fp8", "--out",
                         str(tmp_path)])
    assert info.value.code == 2 and "--quant" in capsys.readouterr().err


@pytest.mark.slow
def test_depth_auto_with_a_small_budget_chooses_a_shallow_model(tmp_path, capsys):
    """The real default model with a budget that fits only part of it: the planner's depth is what trains."""
    from edge_client.core.memory import TrainingSetup, plan_depth
    from prufed.common.models import read_model_config, resolve_model

    model_config = read_model_config(resolve_model("smollm2-135m"))
    setup = TrainingSetup(seq_len=160, batch=1, quant="nf4")
    totals = plan_depth(model_config, 2**40, setup).totals
    budget_gib = (totals[5] + totals[6]) / 2 / 2**30  # between the predictions for depths 6 and 7
    code, stdout, stderr = run(capsys, "train", "--depth", "auto", "--budget-gib", budget_gib, "--quant", "nf4",
                               "--seq-len", 160, "--max-steps", 1, "--max-examples", 20, "--max-eval-examples", 2,
                               "--out", tmp_path, "--json")
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["depth"] == 6 and metrics["kept_layers"] == list(range(6))
    assert metrics["depth_choice"]["mode"] == "auto" and metrics["depth_choice"]["predicted_bytes"] == totals[5]
    assert metrics["quant"] == "nf4" and metrics["source_num_layers"] == 30
