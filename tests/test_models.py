"""Model resolution: one-line errors, atomic default-model conversion, content fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import save_tiny_model

import prufed.common.models as models
from prufed.common.errors import ModelError
from prufed.common.models import fingerprint_model_dir, resolve_model


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_path(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_model(tmp_path / "nowhere")
    assert_one_line(info, "no such directory", "nowhere")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError) as info:
        resolve_model(tmp_path)
    assert_one_line(info, "no config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as info:
        resolve_model(tmp_path)
    assert_one_line(info, "unsupported architecture", "gpt2", "llama")


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelError) as info:
        resolve_model(str(tmp_path))
    assert_one_line(info, "not valid JSON")


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError) as info:
        resolve_model(tmp_path)
    assert_one_line(info, "no weight files")


def test_local_model_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_failed_conversion_leaves_no_target(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUFED_CACHE", str(tmp_path / "cache"))

    def half_then_crash(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", half_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model()
    target = models.default_model_dir()
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_conversion_replaces_a_half_cache_and_runs_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUFED_CACHE", str(tmp_path / "cache"))
    target = models.default_model_dir()
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"half")  # an older interrupted writer, no completion marker
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(gguf)
        save_tiny_model(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert resolve_model() == target
    assert resolve_model("smollm2-135m") == target
    assert len(calls) == 1 and calls[0].name == models.SMOLLM2_GGUF_FILE
    assert not (target / "stale.bin").exists() and (target / "config.json").is_file()


def test_fingerprint_is_content_based(tmp_path):
    source = save_tiny_model(tmp_path / "a", seed=0)
    first = fingerprint_model_dir(source)
    assert first.startswith("sha256:") and fingerprint_model_dir(source) == first
    copy = tmp_path / "b"
    shutil.copytree(source, copy)
    (copy / "prufed-fingerprint.json").unlink(missing_ok=True)
    assert fingerprint_model_dir(copy) == first  # a copy elsewhere has the same fingerprint
    assert fingerprint_model_dir(save_tiny_model(tmp_path / "c", seed=1)) != first


def test_fingerprint_changes_when_a_weight_or_the_config_changes(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    source = save_tiny_model(tmp_path / "a")
    before = fingerprint_model_dir(source)
    weights = source / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if "layers.3.mlp.up_proj" in n)
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    after_weight = fingerprint_model_dir(source)
    assert after_weight != before
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (source / "config.json").write_text(json.dumps(config))
    assert fingerprint_model_dir(source) != after_weight
    assert torch.equal(load_file(weights)[name], tensors[name])
