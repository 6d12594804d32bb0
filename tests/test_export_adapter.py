"""`prufed export-adapter`: PEFT's own loading of full and pruned exports equals PruFed's model, the merged export,
reading a global from an aggregator database, and errors that name the flag."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from aggregator_helpers import ENROLL, make_delta, start_inprocess

from edge_client.core.pruning import make_plan
from edge_client.model import attach_lora, load_base_model, load_model_dir, prune_model, read_plan, save_pruned
from prufed.cli import main
from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta, save_adapter
from prufed.common.models import fingerprint_model_dir
from prufed.common.peft_bridge import adapter_state, load_adapter_state

LAYERS, KEEP, R, ALPHA = 8, 5, 4, 8.0
TARGETS = ("q_proj", "v_proj")
PROMPT = [[5, 17, 42, 99, 3, 64, 128, 7, 250, 11]]
#: PEFT's unmerged forward and PruFed's run the same fp32 ops; the merged weights differ by rounding of W + s B A.
ATOL = 1e-5


@pytest.fixture(scope="module")
def global_file(tiny_model_dir, tmp_path_factory) -> Path:
    """A full-depth global adapter with random non-zero lora_B (so it changes the logits), as the aggregator writes."""
    model, _ = load_base_model(tiny_model_dir)
    peft_model = attach_lora(model, r=R, alpha=ALPHA, targets=TARGETS, dropout=0.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    state = adapter_state(peft_model, range(LAYERS))
    meta = AdapterMeta(GLOBAL_FORMAT, tuple(range(LAYERS)), fingerprint_model_dir(tiny_model_dir), round=4,
                       lora={"r": R, "alpha": ALPHA, "targets": list(TARGETS)})
    return save_adapter(tmp_path_factory.mktemp("global") / "global.safetensors", state, meta)


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A `prufed prune` output whose kept layers are not a prefix, so the key renumbering is really exercised."""
    plan = make_plan("symmetric", LAYERS, KEEP, source_model=str(tiny_model_dir))
    assert list(plan.kept_layers) != list(range(KEEP))
    model, tokenizer = load_base_model(tiny_model_dir)
    prune_model(model, plan.kept_layers)
    return save_pruned(model, tokenizer, plan, tmp_path_factory.mktemp("pruned") / "p5")


def prufed_logits(model_dir: Path, global_file: Path, kept_layers) -> torch.Tensor:
    """PruFed's own model: the (pruned) directory, LoRA attached as the edge trainer does, the global slice loaded."""
    from safetensors.torch import load_file

    model, _ = load_model_dir(model_dir, "fp32")
    peft_model = attach_lora(model, r=R, alpha=ALPHA, targets=TARGETS, dropout=0.0).eval()
    state = {k: v for k, v in load_file(str(global_file)).items()
             if int(k.split(".layers.")[1].split(".")[0]) in set(kept_layers)}
    load_adapter_state(peft_model, state, kept_layers)
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(PROMPT)).logits


def peft_logits(adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's own loading, exactly as a user would: the base its config names, then the adapter directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=torch.tensor(PROMPT)).logits
        return model(input_ids=torch.tensor(PROMPT)).logits, plain


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_export_loads_with_peft_and_matches_prufed(tiny_model_dir, global_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export-adapter", "--global", str(global_file), "--model", str(tiny_model_dir), "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (R, ALPHA, list(TARGETS))
    assert Path(config["base_model_name_or_path"]) == tiny_model_dir.resolve()
    assert (info["num_layers"], info["round"], info["strategy"]) == (LAYERS, 4, None)
    got, plain = peft_logits(out)
    want = prufed_logits(tiny_model_dir, global_file, range(LAYERS))
    assert (got - want).abs().max() <= ATOL
    assert (got - plain).abs().max() > 1e-2  # the adapter really changes the model


def test_pruned_export_renumbers_layers_and_ships_its_base(tiny_model_dir, global_file, pruned_dir, tmp_path):
    out = tmp_path / "adapter-5"
    assert main(["export-adapter", "--global", str(global_file), "--model", str(tiny_model_dir),
                 "--pruning", str(pruned_dir), "--out", str(out)]) == 0
    plan = read_plan(pruned_dir)
    assert read_plan(out) == plan and read_plan(out / "base") == plan
    from safetensors.torch import load_file

    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(str(out / "adapter_model.safetensors"))}
    assert layers == set(range(KEEP))  # the pruned model's own indices, not the ORIGINAL ones
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (out / "base").resolve()
    got, _ = peft_logits(out)
    assert (got - prufed_logits(pruned_dir, global_file, plan.kept_layers)).abs().max() <= ATOL


def test_merged_export_equals_prufed(tiny_model_dir, global_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export-adapter", "--global", str(global_file), "--model", str(tiny_model_dir), "--keep", "6",
                 "--strategy", "top", "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    plan = read_plan(out)
    assert plan.kept_layers == make_plan("top", LAYERS, 6).kept_layers
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.num_hidden_layers == 6
    with torch.no_grad():
        got = merged(input_ids=torch.tensor(PROMPT)).logits
    pruned_copy = tmp_path / "pruned-6"
    model, tokenizer = load_base_model(tiny_model_dir)
    save_pruned(prune_model(model, plan.kept_layers), tokenizer, plan, pruned_copy)
    assert (got - prufed_logits(pruned_copy, global_file, plan.kept_layers)).abs().max() <= ATOL


def test_export_from_database_reads_the_latest_global(tiny_model_dir, tmp_path, capsys):
    """A real federation round over gRPC writes global version 1; export-adapter --db exports exactly it."""
    from edge_client.transport import AggregatorClient

    server, address, store = start_inprocess(tmp_path, tiny_model_dir)
    try:
        with AggregatorClient(address) as deep, AggregatorClient(address) as shallow:
            deep.register(ENROLL, list(range(LAYERS)))
            shallow.register(ENROLL, [0, 3, 7])
            wait_for(lambda: deep.pull_task().kind == "task")
            global0, _, _ = deep.download_global()
            for client, layers, seed in ((deep, list(range(LAYERS)), 1), (shallow, [0, 3, 7], 2)):
                client.upload_update(make_delta(global0, layers, seed, scale=0.5), 1, 10, layers)
            wait_for(lambda: deep.status()["global_version"] == 1)
            want, meta, version = deep.download_global()
        status = main(["aggregator", "status", "--db", f"sqlite:///{tmp_path / 'agg.db'}"])
    finally:
        server.stop(grace=1)
        store.dispose()
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    assert status == 0 and f"prufed export-adapter --db {db} --version 1" in capsys.readouterr().out
    out = tmp_path / "from-db"
    assert main(["export-adapter", "--db", db, "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    got = load_file(str(out / "adapter_model.safetensors"))
    assert version == 1 and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (meta.lora["r"], meta.lora["alpha"])
    for extra, flag in ((["--version", "0"], "--version"), (["--version", "5"], "--version")):
        assert main(["export-adapter", "--db", db, "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                     *extra]) == 2
        assert f"error: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--pruning", "{pruned}", "--keep", "3"], "--pruning"),
    (["--keep", "0"], "--keep"),
    (["--keep", "9"], "--keep"),
    (["--version", "2"], "--version"),
    (["--out", "{global}"], "--out"),
])
def test_bad_flags_exit_2_naming_the_flag(tiny_model_dir, global_file, pruned_dir, tmp_path, capsys, extra, flag):
    extra = [e.format(pruned=pruned_dir, **{"global": global_file}) for e in extra]
    argv = ["export-adapter", "--global", str(global_file), "--model", str(tiny_model_dir), "--out",
            str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert f"error: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base_is_refused(global_file, tmp_path, capsys):
    from conftest import save_tiny_model

    other = save_tiny_model(tmp_path / "other", seed=3)
    assert main(["export-adapter", "--global", str(global_file), "--model", str(other), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --global" in err and "trained on base" in err
