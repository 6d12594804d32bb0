"""The fast CPU training pieces: length-grouped batches, loss at trained positions only, bf16 base weights with fp32
LoRA, `--quant auto` on this CPU, and the step primitives an in-process loop calls on its own model."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from edge_client.data import IGNORE_INDEX, batch_indices, grouped_batch_indices
from edge_client.evaluate import pad_batch
from edge_client.model import attach_lora, load_base_model, native_bf16
from edge_client.train import TrainConfig, resolve_plan, train_local
from edge_client.train.precision import apply_precision, fastest_float_precision, precision_record
from edge_client.train.steps import full_logits_loss, micro_batches, train_step, trained_position_loss


def _rows(count: int, seed: int = 0) -> list[dict]:
    """Rows of varied length (4..60 tokens) whose first half is an untrained prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = rng.randint(4, 60)
        ids = [rng.randint(3, 250) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return rows


def test_grouped_batches_keep_the_examples_and_cut_padding():
    lengths = [len(row["input_ids"]) for row in _rows(100)]
    group, batch = 16, 4
    padded = {"grouped": 0, "shuffled": 0}
    for window in range(3):  # 3 windows = 48 batches, straddling the 100-row epoch
        positions = range(window * group, (window + 1) * group)
        grouped = [grouped_batch_indices(lengths, batch, 0, p, group) for p in positions]
        shuffled = [batch_indices(len(lengths), batch, 0, p) for p in positions]
        # the same examples, the same number of times, as the plain stream over the same positions
        assert Counter(i for b in grouped for i in b) == Counter(i for b in shuffled for i in b)
        assert all(len(b) == batch for b in grouped)
        for name, batches in (("grouped", grouped), ("shuffled", shuffled)):
            padded[name] += sum(max(lengths[i] for i in b) * batch - sum(lengths[i] for i in b) for b in batches)
    assert padded["grouped"] * 4 < padded["shuffled"]
    # a pure function of the position: a resumed run sees the same batch
    assert grouped_batch_indices(lengths, batch, 0, 37, group) == grouped_batch_indices(lengths, batch, 0, 37, group)
    assert grouped_batch_indices(lengths, batch, 1, 37, group) != grouped_batch_indices(lengths, batch, 0, 37, group)


def test_batch_size_one_is_not_regrouped():
    rows = _rows(20)
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for step in range(10)
               for a, b in zip(micro_batches(rows, 0, 1, 2, 3, step, grouped=True),
                               micro_batches(rows, 0, 1, 2, 3, step, grouped=False)))


@pytest.fixture
def lora_model(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir)
    torch.manual_seed(0)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():  # non-zero B, so the adapter takes part in the gradients
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def test_trained_position_loss_equals_the_full_logits_loss(lora_model):
    batch = pad_batch(_rows(4, seed=3), pad_token_id=0)
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    grads = {}
    for name, loss_fn in (("full", full_logits_loss), ("trained", trained_position_loss)):
        lora_model.zero_grad(set_to_none=True)
        loss = loss_fn(lora_model, batch)
        loss.backward()
        grads[name] = (float(loss), [p.grad.clone() for p in lora_params])
    assert grads["full"][0] == pytest.approx(grads["trained"][0], rel=1e-5)
    for a, b in zip(grads["full"][1], grads["trained"][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_base_keeps_lora_and_adamw_in_fp32(lora_model):
    apply_precision(lora_model, "bf16")
    params = [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    micro = micro_batches(_rows(16), 0, 4, 1, 0, 0, grouped=True)
    loss, tokens = train_step(lora_model, micro, params, optimizer, max_grad_norm=1.0, loss_fn=trained_position_loss)
    record = precision_record(lora_model, optimizer, "bf16")
    assert record["base_weights"] == ["bfloat16"] and record["trained"] == ["float32"]
    assert record["optimizer_state"] == ["float32"] and record["cpu_native_bf16"] == native_bf16("cpu")
    assert torch.isfinite(torch.tensor(loss)) and tokens == int(micro[0]["attention_mask"].sum())
    with pytest.raises(ValueError, match="nf4"):
        apply_precision(lora_model, "nf4")


def test_quant_auto_on_this_cpu_is_the_fastest_precision(tiny_model_dir):
    plan, quant, choice = resolve_plan(TrainConfig(model=str(tiny_model_dir), depth=2, quant="auto"))
    assert quant == fastest_float_precision() == ("bf16" if native_bf16("cpu") else "fp32")
    assert choice == {"mode": "fixed", "quant": quant, "quant_source": "fastest that fits on this cpu"}


def test_default_path_trains_and_records_its_choices(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rng = random.Random(1)
    data.write_text("".join(json.dumps({"instruction": "Repeat.", "input": w, "output": " ".join([w] * rng.randint(1, 9))})
                            + "\n" for w in rng.choices(["cat", "dog", "sun", "moon"], k=40)))
    config = TrainConfig(model=str(tiny_model_dir), depth=4, data=str(data), max_steps=12, batch_size=4, lr=1e-2,
                         warmup_steps=0, checkpoint_every=0, gradient_checkpointing=False, verbose=False)
    metrics = train_local(config, tmp_path / "run").metrics
    assert metrics["quant"] == fastest_float_precision()
    assert metrics["precision"]["trained"] == ["float32"] and metrics["precision"]["optimizer_state"] == ["float32"]
    assert metrics["precision"]["base_weights"] == [{"bf16": "bfloat16", "fp32": "float32"}[metrics["quant"]]]
    assert metrics["batching"] == "length-grouped" and metrics["loss_positions"] == "trained"
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    # padding is not counted as trained tokens: at most the tokens of the rows the steps consumed
    assert 0 < metrics["train_tokens"] <= 12 * 4 * config.seq_len
