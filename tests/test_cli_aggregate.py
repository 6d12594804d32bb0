"""`prufed aggregate` on updates from REAL LoRA training of two pruned tiny models of different depths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama

import prufed.cli
from aggregator.core.heteagg import AggregationConfig, aggregate
from aggregator.core.init_adapter import initial_global_adapter
from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, load_adapter, save_adapter
from prufed.common.adapter_keys import keys_for_layers, layer_of

BASE = "sha256:tiny-base"
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
CLIENTS = {"deep": ((0, 1, 2, 3, 4), 12), "shallow": ((0, 2, 4), 5)}  # layers 5, 6, 7: no holder


def train_delta(global_state: dict, kept: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """A few AdamW steps of LoRA on a pruned tiny LLaMA started from the global slice; returns local − global."""
    from edge_client.model import attach_lora, prune_model
    from prufed.common.peft_bridge import adapter_state, load_adapter_state

    model = attach_lora(prune_model(build_tiny_llama(8, seed=0), kept), r=LORA["r"], alpha=LORA["alpha"], dropout=0.0)
    load_adapter_state(model, global_state, kept)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        ids = torch.randint(3, 256, (2, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    local = adapter_state(model, kept)
    return {key: value - global_state[key] for key, value in local.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aggregate")
    config = build_tiny_llama(8).config.to_dict()
    global_state = initial_global_adapter(config, r=LORA["r"], alpha=LORA["alpha"], targets=LORA["targets"], seed=0)
    paths = {"global": save_adapter(root / "global.safetensors", global_state,
                                    AdapterMeta(GLOBAL_FORMAT, tuple(range(8)), base_model=BASE, round=3, lora=LORA))}
    deltas = {}
    for seed, (name, (kept, examples)) in enumerate(CLIENTS.items()):
        deltas[name] = train_delta(global_state, kept, seed)
        paths[name] = save_adapter(root / f"{name}.safetensors", deltas[name], AdapterMeta(
            DELTA_FORMAT, kept, base_model=BASE, round=3, num_examples=examples, lora=LORA))
    return root, paths, global_state, deltas


def run(argv, monkeypatch, capsys):
    monkeypatch.setattr(prufed.cli, "COMMAND_MODULES", ("prufed.cli.aggregate",))
    code = prufed.cli.main(["aggregate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_aggregates_real_training_updates(files, monkeypatch, capsys, tmp_path):
    root, paths, global_state, deltas = files
    for delta in deltas.values():  # real training moved both factors
        assert any(v.abs().max() > 0 for k, v in delta.items() if "lora_A" in k)
        assert any(v.abs().max() > 0 for k, v in delta.items() if "lora_B" in k)
    out_path = tmp_path / "global-4.safetensors"
    code, out, _ = run(["--global", paths["global"], "--update", paths["deep"], "--update", paths["shallow"],
                        "--out", out_path, "--json"], monkeypatch, capsys)
    assert code == 0
    summary = json.loads(out)
    state, meta = load_adapter(out_path)
    assert meta.format == GLOBAL_FORMAT and meta.round == 4 and meta.base_model == BASE and meta.lora == LORA
    expected = aggregate(global_state, [(deltas[n], CLIENTS[n][1]) for n in CLIENTS], AggregationConfig())
    assert all(torch.equal(state[k], expected.state[k]) for k in global_state)
    for key in keys_for_layers(global_state, [5, 6, 7]):
        assert torch.equal(state[key], global_state[key])
    for key in keys_for_layers(global_state, [1]):  # held by the deep client only: global + its delta
        torch.testing.assert_close(state[key], global_state[key] + deltas["deep"][key])
    holders = summary["holders"]
    assert {layer_of(k): c for k, c in holders.items()} == {0: 2, 1: 1, 2: 2, 3: 1, 4: 2, 5: 0, 6: 0, 7: 0}
    assert summary["rejected"] == [] and [a["num_examples"] for a in summary["accepted"]] == [12, 5]
    assert summary["report"]["factors_error_max"] >= 0


def test_rejected_updates_are_reported_and_skipped(files, monkeypatch, capsys, tmp_path):
    root, paths, global_state, deltas = files
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    other_base = save_adapter(tmp_path / "other.safetensors", deltas["deep"], AdapterMeta(
        DELTA_FORMAT, CLIENTS["deep"][0], base_model="sha256:other", num_examples=3))
    poisoned = dict(deltas["shallow"])
    key = next(iter(poisoned))
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = float("nan")
    nan_path = save_adapter(tmp_path / "nan.safetensors", poisoned, AdapterMeta(
        DELTA_FORMAT, CLIENTS["shallow"][0], base_model=BASE, num_examples=3))
    lying = save_adapter(tmp_path / "lying.safetensors", deltas["shallow"], AdapterMeta(
        DELTA_FORMAT, CLIENTS["deep"][0], base_model=BASE, num_examples=3))  # declares layers it does not hold
    out_path = tmp_path / "out.safetensors"
    code, out, _ = run(["--global", paths["global"], "--out", out_path, "--json",
                        *[arg for p in (garbage, paths["global"], other_base, nan_path, lying, paths["shallow"])
                          for arg in ("--update", p)]], monkeypatch, capsys)
    assert code == 0
    summary = json.loads(out)
    assert [r["code"] for r in summary["rejected"]] == ["bad_file", "bad_format", "base_model_mismatch",
                                                        "non_finite", "wrong_keys"]
    assert key in summary["rejected"][3]["reason"]
    state, _ = load_adapter(out_path)
    expected = aggregate(global_state, [(deltas["shallow"], 5)])
    assert all(torch.equal(state[k], expected.state[k]) for k in global_state)


def test_no_accepted_update_exits_2(files, monkeypatch, capsys, tmp_path):
    root, paths, *_ = files
    out_path = tmp_path / "never.safetensors"
    code, _, err = run(["--global", paths["global"], "--update", paths["global"], "--out", out_path],
                       monkeypatch, capsys)
    assert code == 2 and "no update was accepted" in err and "rejected" in err and not out_path.exists()


def test_fedavg_refuses_mixed_depths(files, monkeypatch, capsys, tmp_path):
    root, paths, *_ = files
    code, _, err = run(["--global", paths["global"], "--update", paths["deep"], "--update", paths["shallow"],
                        "--out", tmp_path / "o.safetensors", "--mode", "fedavg"], monkeypatch, capsys)
    assert code == 2 and "fedavg" in err and "layers.1." in err


@pytest.mark.parametrize("extra, flag", [(["--server-lr", "0"], "--server-lr"), (["--clip-norm", "-1"], "--clip-norm"),
                                         (["--trim-fraction", "0.7"], "--trim-fraction"), (["--mode", "x"], "--mode"),
                                         (["--space", "x"], "--space"), (["--weighting", "x"], "--weighting")])
def test_bad_flags_exit_2(files, monkeypatch, capsys, tmp_path, extra, flag):
    root, paths, *_ = files
    code, _, err = run(["--global", paths["global"], "--update", paths["deep"], "--out", tmp_path / "o.safetensors",
                        *extra], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: {flag}")


def test_global_must_be_a_global_adapter(files, monkeypatch, capsys, tmp_path):
    root, paths, *_ = files
    code, _, err = run(["--global", paths["deep"], "--update", paths["shallow"], "--out", tmp_path / "o.safetensors"],
                       monkeypatch, capsys)
    assert code == 2 and "--global" in err and "prufed-adapter/1" in err


def test_per_group_mode_writes_one_file_per_group_and_an_index(files, monkeypatch, capsys, tmp_path):
    """fedavg-group: each group's file is the global plus its own clients' mean only; the DIR is the next --global."""
    root, paths, global_state, deltas = files
    out = tmp_path / "groups"
    code, stdout, _ = run(["--global", paths["global"], "--update", paths["deep"], "--update", paths["shallow"],
                           "--out", out, "--mode", "fedavg-group", "--json"], monkeypatch, capsys)
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert json.loads(stdout)["groups"] == index
    assert sorted((e["kept_layers"], e["clients"], e["examples"]) for e in index) == sorted(
        (list(kept), 1, n) for kept, n in CLIENTS.values())
    for name, (kept, _n) in CLIENTS.items():
        [entry] = [e for e in index if e["kept_layers"] == list(kept)]
        state, meta = load_adapter(out / entry["file"])
        assert meta.format == GLOBAL_FORMAT and meta.round == 4 and meta.lora == LORA
        for key, value in state.items():
            want = global_state[key] if key not in deltas[name] else \
                (global_state[key].double() + deltas[name][key].double()).float()
            assert torch.equal(value, want), key
    # the next round from the directory: mixed at 0 is fedavg-group on every group's held keys
    again = tmp_path / "groups-2"
    code, _, _ = run(["--global", out, "--update", paths["deep"], "--update", paths["shallow"], "--out", again,
                      "--mode", "mixed", "--mix", "0"], monkeypatch, capsys)
    assert code == 0
    for entry in json.loads((again / "index.json").read_text()):
        before = load_adapter(out / entry["file"])[0]
        after = load_adapter(again / entry["file"])[0]
        name = next(n for n, (kept, _) in CLIENTS.items() if list(kept) == entry["kept_layers"])
        for key in deltas[name]:
            assert torch.equal(after[key], (before[key].double() + deltas[name][key].double()).float())
    # a group the directory does not list has no global to start from
    lone = save_adapter(tmp_path / "lone.safetensors", {k: deltas["shallow"][k] for k in
                                                         keys_for_layers(global_state, [0, 2])},
                        AdapterMeta(DELTA_FORMAT, (0, 2), base_model=BASE, round=4, num_examples=3, lora=LORA))
    code, _, err = run(["--global", out, "--update", lone, "--out", tmp_path / "g3", "--mode", "fedavg-group"],
                       monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --global") and "[0, 2]" in err
