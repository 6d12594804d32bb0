"""`prufed aggregate` per-group modes on updates from REAL LoRA training: one file per group + index.json, equal to
the core aggregators, a second round from that directory, and clear errors."""

# ruff: noqa: F811 - `files` is test_cli_aggregate's module fixture, imported so that pytest registers it here
from __future__ import annotations

import json

import pytest
import torch
from test_cli_aggregate import BASE, CLIENTS, LORA, files, run  # noqa: F401

from aggregator.core.additive import AdditiveAggregator
from aggregator.core.fedavg_group import FedAvgGroupAggregator
from aggregator.core.heteagg import AggregationConfig
from aggregator.core.mixed import MixedAggregator
from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, load_adapter, save_adapter


def core_result(cls, global_state, deltas, **kwargs):
    agg = cls({}, AggregationConfig(), global_state, **kwargs)
    for name, (kept, examples) in CLIENTS.items():
        agg.add(kept, deltas[name], examples)
    return {group: result.state for group, result in agg.finish().items()}


@pytest.mark.parametrize("mode, mix, cls, kwargs", [
    ("fedavg-group", None, FedAvgGroupAggregator, {}),
    ("mixed", "auto", MixedAggregator, {"mix": "auto"}),
    ("mixed", "0.3", MixedAggregator, {"mix": 0.3}),
    ("additive", "1.5", AdditiveAggregator, {"mix": 1.5}),
])
def test_per_group_modes_write_one_global_per_group(files, monkeypatch, capsys, tmp_path, mode, mix, cls, kwargs):
    root, paths, global_state, deltas = files
    out = tmp_path / "round-4"
    code, stdout, _ = run(["--global", paths["global"], "--update", paths["deep"], "--update", paths["shallow"],
                           "--out", out, "--mode", mode, "--json", *(["--mix", mix] if mix else [])],
                          monkeypatch, capsys)
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert sorted((tuple(e["kept_layers"]), e["clients"], e["examples"]) for e in index) == sorted(
        (kept, 1, n) for kept, n in CLIENTS.values())
    expected = core_result(cls, global_state, deltas, **kwargs)
    for entry in index:
        state, meta = load_adapter(out / entry["file"])
        assert meta.format == GLOBAL_FORMAT and meta.round == 4 and meta.base_model == BASE and meta.lora == LORA
        group = tuple(entry["kept_layers"])
        assert all(torch.equal(state[k], expected[group][k]) for k in global_state)
    summary = json.loads(stdout)
    assert summary["mode"] == mode and len(summary["groups"]) == 2
    # The two groups' globals differ on a layer both trained (their own steps are kept apart).
    states = [load_adapter(out / e["file"])[0] for e in index]
    key = next(k for k in global_state if ".layers.0." in k and "lora_B" in k)
    assert not torch.equal(states[0][key], states[1][key])


def test_second_round_reads_the_group_directory(files, monkeypatch, capsys, tmp_path):
    root, paths, global_state, deltas = files
    first, second = tmp_path / "r4", tmp_path / "r5"
    args = ["--update", paths["deep"], "--update", paths["shallow"], "--mode", "fedavg-group"]
    assert run(["--global", paths["global"], "--out", first, *args], monkeypatch, capsys)[0] == 0
    assert run(["--global", first, "--out", second, *args], monkeypatch, capsys)[0] == 0
    index = {tuple(e["kept_layers"]): e["file"] for e in json.loads((second / "index.json").read_text())}
    for name, (kept, _) in CLIENTS.items():
        state, meta = load_adapter(second / index[kept])
        assert meta.round == 5
        held = [k for k in global_state if k in deltas[name]]
        for key in held:  # fedavg-group with one client per group: two steps of that client's delta
            torch.testing.assert_close(state[key], global_state[key] + 2 * deltas[name][key])


def test_unknown_group_is_rejected_not_fatal(files, monkeypatch, capsys, tmp_path):
    root, paths, global_state, deltas = files
    first = tmp_path / "r4"
    assert run(["--global", paths["global"], "--out", first, "--update", paths["deep"], "--mode", "mixed"],
               monkeypatch, capsys)[0] == 0
    code, stdout, _ = run(["--global", first, "--out", tmp_path / "r5", "--update", paths["deep"], "--update",
                           paths["shallow"], "--mode", "mixed", "--json"], monkeypatch, capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert [r["code"] for r in summary["rejected"]] == ["bad_kept_layers"]
    assert [g["kept_layers"] for g in summary["groups"]] == [list(CLIENTS["deep"][0])]


@pytest.mark.parametrize("extra, flag", [
    (["--mode", "mixed", "--mix", "1.5"], "--mix"), (["--mode", "additive", "--mix", "-1"], "--mix"),
    (["--mode", "mixed", "--mix", "most"], "--mix"), (["--mode", "heteagg", "--mix", "0.5"], "--mix"),
    (["--mode", "fedavg-group", "--mix", "0.5"], "--mix"), (["--mode", "mixed", "--space", "product"], "--space"),
    (["--mode", "additive", "--trim-fraction", "0.1"], "--trim-fraction"), (["--mode", "groups"], "--mode"),
])
def test_bad_mode_flags_exit_2(files, monkeypatch, capsys, tmp_path, extra, flag):
    root, paths, *_ = files
    out = tmp_path / "o"
    code, _, err = run(["--global", paths["global"], "--update", paths["deep"], "--out", out, *extra],
                       monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: {flag}") and not out.exists()


def test_group_directory_is_refused_by_heteagg_and_out_must_be_a_directory(files, monkeypatch, capsys, tmp_path):
    root, paths, *_ = files
    first = tmp_path / "r4"
    assert run(["--global", paths["global"], "--out", first, "--update", paths["deep"], "--mode", "additive"],
               monkeypatch, capsys)[0] == 0
    code, _, err = run(["--global", first, "--out", tmp_path / "x.safetensors", "--update", paths["deep"]],
                       monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --global")
    a_file = save_adapter(tmp_path / "f.safetensors", {}, AdapterMeta(DELTA_FORMAT, (0,), base_model=BASE,
                                                                      num_examples=1))
    code, _, err = run(["--global", paths["global"], "--out", a_file, "--update", paths["deep"], "--mode", "mixed"],
                       monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --out")
