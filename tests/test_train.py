"""Local training on the tiny model: loss goes down, the update file's keys/metadata/Δ, NF4 on CPU, exact resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from edge_client.train import TrainConfig, lr_factor, train_local
from prufed.common.adapter_format import DELTA_FORMAT, load_adapter
from prufed.common.adapter_keys import keys_for_layers, layers_of_keys
from prufed.common.errors import ConfigError
from prufed.common.models import fingerprint_model_dir

WORDS = ["cat", "dog", "sun", "tree", "moon", "fish", "bird", "rain"]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    """40 short Alpaca records with a learnable rule (repeat the word twice)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "repeat.jsonl"
    lines = []
    for _ in range(40):
        word = rng.choice(WORDS)
        lines.append(json.dumps({"instruction": "Say it twice.", "input": word, "output": f"{word} {word}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config(model_dir, data, **overrides) -> TrainConfig:
    base = dict(model=str(model_dir), depth=4, data=str(data), max_steps=4, quant="fp32", lr=1e-2,
                warmup_steps=0, eval_fraction=0.1, checkpoint_every=0, gradient_checkpointing=False, verbose=False)
    return TrainConfig(**{**base, **overrides})


def full_depth_adapter(model_dir, seed: int = 7) -> dict[str, torch.Tensor]:
    """An ORIGINAL-keyed full-depth adapter with non-zero A and B (what a server would send after a round)."""
    from edge_client.model import attach_lora, load_base_model
    from prufed.common.peft_bridge import adapter_state

    model, _ = load_base_model(model_dir)
    model = attach_lora(model, r=8, alpha=16)
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * 0.05
            for key, value in adapter_state(model, range(8)).items()}


def test_training_lowers_train_and_heldout_loss(tiny_model_dir, alpaca_file, tmp_path):
    # The tiny model's tied 0.02-std embeddings bound its logits, so its loss cannot fall far below ln(256) = 5.5.
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    result = train_local(config(tiny_model_dir, alpaca_file, max_steps=20, lora_targets=targets), tmp_path)
    losses = result.metrics["train_loss"]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert result.metrics["eval_after"]["loss"] < result.metrics["eval_before"]["loss"] - 0.15
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_loss"] == losses and metrics["quant"] == "fp32" and metrics["depth"] == 4
    assert metrics["tokens_per_s"] > 0 and metrics["peak_rss_bytes"] > 50 * 2**20
    assert metrics["num_examples"] == result.num_examples == 36 and metrics["num_heldout"] == 4


def test_update_has_original_keys_metadata_and_exact_delta(tiny_model_dir, alpaca_file, tmp_path):
    global_state = full_depth_adapter(tiny_model_dir)
    kept = (0, 2, 5, 7)
    result = train_local(config(tiny_model_dir, alpaca_file, kept_layers=kept, max_steps=3), tmp_path,
                         global_adapter=global_state, round=5)
    delta, meta = load_adapter(result.update_path)
    after, _ = load_adapter(tmp_path / "adapter.safetensors")
    assert sorted(delta) == keys_for_layers(global_state, kept) and layers_of_keys(delta) == list(kept)
    assert meta.format == DELTA_FORMAT and meta.kept_layers == kept and meta.round == 5
    assert meta.num_examples == result.num_examples == 36
    assert meta.base_model == fingerprint_model_dir(tiny_model_dir)
    assert meta.lora == {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
    for key, value in delta.items():
        assert torch.equal(value, after[key] - global_state[key]), key  # Δ = local_after − global_before
    assert all(value.abs().max() > 0 for value in delta.values())  # every kept LoRA tensor was trained


def test_fresh_init_is_the_delta_reference(tiny_model_dir, alpaca_file, tmp_path):
    result = train_local(config(tiny_model_dir, alpaca_file, depth=3, strategy="bottom", max_steps=2), tmp_path)
    delta, meta = load_adapter(result.update_path)
    after, _ = load_adapter(tmp_path / "adapter.safetensors")
    assert meta.kept_layers == (5, 6, 7) and layers_of_keys(delta) == [5, 6, 7]
    for key, value in delta.items():
        if "lora_B" in key:  # PEFT initialises B to zero, so Δ_B is the trained B itself
            assert torch.equal(value, after[key])
        else:  # A starts from a random init: Δ_A is small against A itself
            assert value.norm() < 0.5 * after[key].norm()


def test_nf4_training_on_cpu(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    import edge_client.model

    loaded = []
    original = edge_client.model.load_model_dir

    def capture(model_dir, quant="fp32"):
        model, tokenizer = original(model_dir, quant)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(edge_client.model, "load_model_dir", capture)
    result = train_local(config(tiny_model_dir, alpaca_file, quant="nf4", max_steps=2, depth=2,
                                             gradient_checkpointing=True), tmp_path)
    four_bit = [m for m in loaded[0].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q,k,v,o,gate,up,down in each kept layer
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    # The held-out eval ran before training: it must not have switched the weights to the no-autograd CPU kernel.
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    assert result.metrics["quant"] == "nf4" and "NF4" in result.metrics["quant_detail"]
    delta, _ = load_adapter(result.update_path)
    assert all(torch.isfinite(v).all() for v in delta.values()) and any(v.abs().max() > 0 for v in delta.values())


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, alpaca_file, tmp_path):
    # Dropout and gradient checkpointing on: the RNG state must be restored for the resumed steps to match.
    settings = dict(max_steps=5, checkpoint_every=2, batch_size=2, lora_dropout=0.1, warmup_steps=2,
                    gradient_checkpointing=True)
    straight = train_local(config(tiny_model_dir, alpaca_file, **settings), tmp_path / "straight")

    def kill_after_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt  # as a kill would: step 3 is lost, the checkpoint holds step 2

    interrupted = config(tiny_model_dir, alpaca_file, **settings)
    with pytest.raises(KeyboardInterrupt):
        train_local(interrupted, tmp_path / "resumed", on_step=kill_after_step_3)
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "update.safetensors").exists()
    resumed = train_local(interrupted, tmp_path / "resumed", resume=True)

    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 5
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    assert resumed.metrics["eval_after"] == straight.metrics["eval_after"]
    for name in ("update.safetensors", "adapter.safetensors"):
        a, _ = load_adapter(tmp_path / "straight" / name)
        b, _ = load_adapter(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_other_settings_and_starts_fresh_without_checkpoint(tiny_model_dir, alpaca_file, tmp_path):
    first = config(tiny_model_dir, alpaca_file, max_steps=2, checkpoint_every=1)
    train_local(first, tmp_path)
    with pytest.raises(ConfigError, match="^--resume: .*different training settings"):
        train_local(config(tiny_model_dir, alpaca_file, max_steps=2, checkpoint_every=1, lr=1e-3), tmp_path,
                    resume=True)
    result = train_local(first, tmp_path / "empty", resume=True)
    assert result.metrics["resumed_from_step"] == 0 and result.metrics["steps"] == 2


def test_lr_schedule():
    assert [lr_factor(s, 2, 6) for s in range(2)] == [0.5, 1.0]
    assert lr_factor(2, 2, 6) == 1.0 and lr_factor(6, 2, 6) == pytest.approx(0.1)
    assert lr_factor(0, 0, 4) == 1.0


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("depth", 0, "--depth"), ("depth", "deep", "--depth"), ("strategy", "random", "--strategy"),
        ("max_steps", 0, "--max-steps"), ("batch_size", 0, "--batch-size"), ("grad_accum", 0, "--grad-accum"),
        ("lr", 0.0, "--lr"), ("lr", float("nan"), "--lr"), ("seq_len", 4, "--seq-len"),
        ("lora_r", 0, "--lora-r"), ("eval_fraction", 1.0, "--eval-fraction"), ("quant", "fp8", "--quant"),
        ("checkpoint_every", -1, "--checkpoint-every"), ("lora_targets", (), "--targets"),
        ("budget_gib", -1.0, "--budget-gib"), ("data_format", "csv", "--format"), ("max_examples", 1, "--max-examples"),
        ("warmup_steps", -1, "--warmup-steps"), ("lora_dropout", 1.0, "--lora-dropout"),
    ],
)
def test_bad_config_names_the_flag(field, value, flag):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert info.value.field == flag


def test_depth_beyond_the_model_names_the_flag(tiny_model_dir, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match="^--depth: must be between 1 and 8"):
        train_local(config(tiny_model_dir, alpaca_file, depth=9), tmp_path)
