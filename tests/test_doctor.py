"""`prufed doctor`: the report on this machine, the agent's plan for a model, and the verdict when it cannot run."""

from __future__ import annotations

import json
import shutil
from importlib import metadata

import torch

from edge_client.hardware_profiles import load_profiles
from edge_client.model import probe_bf16, probe_bnb_4bit
from prufed.cli import main


def run_doctor(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["doctor", "--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_doctor_json_reports_this_machine(capsys):
    code, report, err = run_doctor(capsys)
    assert code == 0 and report["ok"] and report["reason"] is None, err
    assert report["packages"]["torch"] == torch.__version__
    assert report["packages"]["bitsandbytes"] == metadata.version("bitsandbytes")
    assert (report["cuda"] is None) == (not torch.cuda.is_available())
    memory = report["memory"]
    assert 0 < memory["available_bytes"] <= memory["total_bytes"]
    assert memory["budget_bytes"] == int(memory["available_bytes"] * memory["budget_fraction"])
    assert report["nearest_profile"] in load_profiles()
    # bitsandbytes 0.50.2 runs NF4 on this CPU (docs/architecture.md), and bf16 matmuls work everywhere torch does.
    assert report["bnb_4bit"]["ok"] and report["bnb_4bit"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["bf16"]["ok"] and isinstance(report["bf16"]["native"], bool)
    # `--quant auto` chooses only among precisions the probes found working (bf16 on a CPU: also native).
    candidates, bnb, bf16 = report["quant_candidates"], report["bnb_4bit"]["ok"], report["bf16"]
    if torch.cuda.is_available():
        assert candidates == (["nf4"] if bnb else ["bf16"])
    else:
        assert "fp32" in candidates and ("nf4" in candidates) == bnb
        assert ("bf16" in candidates) == (bf16["ok"] and bf16["native"])


def test_doctor_and_training_share_one_try_of_each_probe(capsys):
    """The profiler (which the planner and training read) and doctor run the same cached probe, not two checks."""
    from edge_client.model import bitsandbytes_available
    from edge_client.profiling import profile_device

    probe_bnb_4bit.cache_clear()
    probe_bf16.cache_clear()
    spec = profile_device()
    assert probe_bnb_4bit.cache_info().misses == 1 and probe_bf16.cache_info().misses == 1
    if not torch.cuda.is_available():  # on a GPU machine the bf16 try runs on the GPU, cpu_bf16 is unused
        assert spec.cpu_bf16 == (probe_bf16().ok and bool(probe_bf16().native))
    code, report, _ = run_doctor(capsys)
    assert code == 0
    assert bitsandbytes_available() == spec.bnb_4bit == report["bnb_4bit"]["ok"]
    assert probe_bnb_4bit.cache_info().misses == 1 and probe_bnb_4bit.cache_info().hits >= 2
    assert probe_bf16.cache_info().misses == 1


def test_doctor_model_reports_the_agents_plan(capsys, tiny_model_dir):
    code, report, err = run_doctor(capsys, "--model", str(tiny_model_dir))
    assert code == 0, err
    plan = report["plan"]
    assert plan["num_layers"] == 8 and plan["depth"] == 8  # a tiny model fits any real device whole
    assert plan["kept_layers"] == list(range(8)) and plan["strategy"] == "top"
    probe = {"nf4": report["bnb_4bit"], "int8": report["bnb_4bit"], "bf16": report["bf16"]}.get(plan["quant"])
    assert probe is None or probe["ok"]  # the chosen precision is one the probes found working
    assert plan["quant"] in report["quant_candidates"]
    assert 0 < plan["predicted_bytes"] <= plan["budget_bytes"] <= report["memory"]["total_bytes"]
    assert plan["why"].startswith(f"{plan['quant']} (") and "depth 8/8" in plan["why"]


def test_doctor_exits_1_with_one_line_when_no_depth_fits(capsys, tiny_model_dir, tmp_path):
    huge = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, huge)
    config = json.loads((huge / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=512, num_key_value_heads=512,
                  vocab_size=1_000_000, num_hidden_layers=4)
    (huge / "config.json").write_text(json.dumps(config))
    code, report, err = run_doctor(capsys, "--model", str(huge))
    assert code == 1 and not report["ok"] and "plan" not in report
    assert err.count("\n") == 1 and err.startswith("doctor: the agent cannot run here: no depth of ")
    assert report["reason"] in err


def test_doctor_text_output_names_every_check(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("python", "torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "cuda", "jetson",
                "bitsandbytes 4-bit", "bf16", "nearest profile", "agent can run"):
        assert row in out
