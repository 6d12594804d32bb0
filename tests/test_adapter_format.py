"""Adapter files and the key scheme: metadata, atomic saves, and round trips through PEFT on tiny models."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import save_file

from aggregator.core.init_adapter import initial_global_adapter
from prufed.common.adapter_format import (
    DELTA_FORMAT,
    GLOBAL_FORMAT,
    AdapterFormatError,
    AdapterMeta,
    load_adapter,
    read_meta,
    save_adapter,
)
from prufed.common.adapter_keys import KeySchemeError, layers_of_keys, to_original_keys, to_pruned_keys
from prufed.common.peft_bridge import adapter_state, load_adapter_state

TARGETS = ("q_proj", "v_proj")


def lora(model, r=4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0))


def test_metadata_round_trip(tmp_path):
    meta = AdapterMeta(DELTA_FORMAT, (0, 3, 7), base_model="sha256:abc", round=4, num_examples=12,
                       lora={"r": 4, "alpha": 8, "targets": list(TARGETS)}, extra={"client": "c1"})
    tensors = {"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": torch.randn(4, 8)}
    path = save_adapter(tmp_path / "u.safetensors", tensors, meta)
    assert read_meta(path) == meta
    loaded, loaded_meta = load_adapter(path)
    assert loaded_meta == meta and torch.equal(loaded[next(iter(tensors))], next(iter(tensors.values())))
    assert AdapterMeta.from_strings(meta.to_strings()) == meta


@pytest.mark.parametrize("change, match", [
    ({"format": "other/1"}, "format"),
    ({"kept_layers": "not json"}, "kept_layers"),
    ({"kept_layers": None}, "kept_layers"),
    ({"num_examples": "1.5"}, "num_examples"),
    ({"num_examples": None}, "num_examples"),
    ({"round": "x"}, "round"),
])
def test_bad_metadata(tmp_path, change, match):
    strings = AdapterMeta(DELTA_FORMAT, (0,), round=1, num_examples=3).to_strings()
    for key, value in change.items():
        if value is None:
            strings.pop(key)
        else:
            strings[key] = value
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=strings)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such"):
        load_adapter(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AdapterFormatError, match="not a readable"):
        load_adapter(garbage)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import prufed.common.adapter_format as fmt

    path = tmp_path / "g.safetensors"
    first = {"a.layers.0.b": torch.ones(2)}
    save_adapter(path, first, AdapterMeta(GLOBAL_FORMAT, (0,)))

    def broken(tensors, name, metadata):
        with open(name, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, {"a.layers.0.b": torch.zeros(2)}, AdapterMeta(GLOBAL_FORMAT, (0,), round=1))
    tensors, meta = load_adapter(path)
    assert torch.equal(tensors["a.layers.0.b"], first["a.layers.0.b"]) and meta.round == 0
    assert os.listdir(tmp_path) == ["g.safetensors"]  # no temp file left behind


def test_key_scheme_round_trip_and_errors():
    kept = [1, 4, 6]
    pruned = {f"base_model.model.model.layers.{j}.self_attn.q_proj.lora_A.weight": j for j in range(3)}
    original = to_original_keys(pruned, kept)
    assert layers_of_keys(original) == kept and to_pruned_keys(original, kept) == pruned
    with pytest.raises(KeySchemeError, match="keeps 3"):
        to_original_keys({"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": 0}, kept)
    with pytest.raises(KeySchemeError, match="outside"):
        to_original_keys({"lm_head.weight": 0}, kept)


def test_initial_adapter_matches_peft_and_loads_on_unpruned_model():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    base = build_tiny_llama(4, seed=0)
    model = lora(base)
    expected = get_peft_model_state_dict(model)
    init = initial_global_adapter(base.config.to_dict(), r=4, alpha=8, targets=TARGETS, seed=5)
    assert set(init) == set(expected) and all(init[k].shape == expected[k].shape for k in init)
    assert all(torch.equal(v, initial_global_adapter(base.config.to_dict(), 4, 8, TARGETS, 5)[k])
               for k, v in init.items())  # deterministic in seed
    a_key = next(k for k in init if "lora_A" in k)
    bound = 1 / base.config.hidden_size ** 0.5  # kaiming-uniform(a=√5) = U(±1/√fan_in), as PEFT
    assert init[a_key].abs().max() <= bound and init[a_key].std() > bound / 3
    assert all(init[k].count_nonzero() == 0 for k in init if "lora_B" in k)

    nonzero = {k: v + 0.1 if "lora_B" in k else v for k, v in init.items()}  # make the adapter change outputs
    result = set_peft_model_state_dict(model, nonzero)
    assert not result.unexpected_keys
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], nonzero[k]) for k in nonzero)
    load_adapter_state(model, init, kept_layers=range(4))  # the shared bridge accepts the full-depth global too
    assert all(torch.equal(get_peft_model_state_dict(model)[k], init[k]) for k in init)


def test_pruned_peft_round_trip(tmp_path):
    """adapter_state -> save -> load -> load_adapter_state into a fresh pruned model gives identical outputs."""
    from edge_client.model import prune_model

    kept = (0, 3, 5, 6)
    trained = lora(prune_model(build_tiny_llama(8, seed=1), kept))
    with torch.no_grad():  # stand-in for training: every LoRA tensor gets distinct values
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    state = adapter_state(trained, kept)
    assert layers_of_keys(state) == list(kept)
    path = save_adapter(tmp_path / "local.safetensors", state, AdapterMeta(GLOBAL_FORMAT, kept, round=2))
    tensors, meta = load_adapter(path)
    assert meta.kept_layers == kept

    fresh = lora(prune_model(build_tiny_llama(8, seed=1), kept))
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        load_adapter_state(fresh, tensors, meta.kept_layers)
        after, expected = fresh(input_ids=ids).logits, trained(input_ids=ids).logits
    assert torch.equal(after, expected) and not torch.allclose(before, expected)
    with pytest.raises(KeySchemeError, match="missing"):
        load_adapter_state(fresh, {k: v for k, v in tensors.items() if ".layers.5." not in k}, kept)
