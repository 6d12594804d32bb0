"""Memory planner: formulas against hand-computed numbers, monotonicity, and depth choice at budget edges."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from edge_client.core import memory as mem
from edge_client.core.memory import BudgetTooSmall, ModelShape, TrainingSetup, choose_depth, estimate_memory, plan_depth
from prufed.common.errors import ConfigError, PrufedError

GIB = 2**30
# The tiny LLaMA of tests/conftest.py: h=64, I=128, 4 heads of 16, 2 KV heads, V=256, tied, 8 layers.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, "tie_word_embeddings": True, "num_hidden_layers": 8, "dtype": "float32"}
LLAMA_7B = json.loads(resources.files("edge_client.builtin_configs").joinpath("llama-2-7b.json").read_text())
SMOLLM2 = json.loads(resources.files("edge_client.builtin_configs").joinpath("smollm2-135m.json").read_text())


def test_tiny_fp32_breakdown_by_hand():
    setup = TrainingSetup(seq_len=32, batch=2, lora_r=8, quant="fp32", gradient_checkpointing=True)
    got = estimate_memory(TINY, 4, setup)
    # q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64 = 36,864 linear params per layer.
    assert got.weights == 4 * (36_864 * 4 + 2 * 64 * 4) + 64 * 4
    assert got.embeddings_and_head == 256 * 64 * 4  # tied: counted once
    lora_params = 4 * 8 * ((64 + 64) + (64 + 32))  # r·(d_in + d_out) for q and v, 4 layers
    assert got.adapter == lora_params * 4 and got.gradients == lora_params * 4
    assert got.optimizer_state == lora_params * 8
    tokens = 64
    one_layer = tokens * 4 * (mem.A_H * 64 + mem.A_Q * 64 + mem.A_I * 128 + mem.A_LORA * (64 + 64))
    assert got.activations == int(4 * tokens * 64 * 4 + one_layer)
    assert got.logits == int(mem.LOGIT_COPIES * tokens * 256 * 4)
    # fp32 weights alias the fp32 checkpoint's pages: only the runtime and the allocator slack remain.
    assert got.overhead == int(mem.RUNTIME_BYTES + mem.CPU_SLACK_PER_LAYER * 4)
    assert got.total_bytes == sum(got.to_json_dict()[k] for k in (
        "weights", "embeddings_and_head", "adapter", "optimizer_state", "gradients", "activations", "logits",
        "overhead"))


def test_tiny_nf4_and_gpu_overheads_by_hand():
    cpu = estimate_memory(TINY, 4, TrainingSetup(quant="nf4"))
    assert cpu.weights == int(4 * (36_864 * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * 64 * 4) + 64 * 4)
    # nf4 keeps the embeddings in fp32 (aliasing the file); the fp32 linears' pages stay mapped.
    mapped = (4 * (36_864 + 128) + 64) * 4
    assert cpu.overhead == int(mem.RUNTIME_BYTES + mapped + mem.CPU_SLACK_PER_LAYER * 4)
    no_dq = estimate_memory(TINY, 4, TrainingSetup(quant="nf4", double_quant=False))
    assert no_dq.weights == int(4 * (36_864 * 0.5625 + 2 * 64 * 4) + 64 * 4)
    gpu = estimate_memory(TINY, 4, TrainingSetup(quant="nf4", accelerator="cuda"))
    assert gpu.overhead == mem.CUDA_CONTEXT_BYTES
    jetson = estimate_memory(TINY, 4, TrainingSetup(quant="nf4", accelerator="cuda", unified_memory=True))
    assert jetson.overhead == mem.CUDA_CONTEXT_BYTES + mem.RUNTIME_BYTES
    int8 = estimate_memory(TINY, 1, TrainingSetup(quant="int8"))
    per_layer = sum(d_in * d_out * (1 + 4 / d_in) for d_in, d_out in ModelShape.from_config(TINY).linear_dims().values())
    assert int8.weights == int(per_layer + 2 * 64 * 4 + 64 * 4)


def test_untied_head_counts_twice_and_head_dim_default():
    untied = estimate_memory({**TINY, "tie_word_embeddings": False}, 2, TrainingSetup(quant="bf16"))
    assert untied.embeddings_and_head == 2 * 256 * 64 * 2
    assert ModelShape.from_config(TINY).head_dim == 16
    assert ModelShape.from_config({**TINY, "head_dim": 32}).linear_dims()["q_proj"] == (64, 128)


@pytest.mark.parametrize("config", [TINY, SMOLLM2, LLAMA_7B], ids=["tiny", "smollm2", "llama-2-7b"])
def test_monotone_in_depth_seq_batch(config):
    setup = TrainingSetup()
    totals = [estimate_memory(config, d, setup).total_bytes for d in range(1, config["num_hidden_layers"] + 1)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    base = estimate_memory(config, 2, setup).total_bytes
    assert estimate_memory(config, 2, TrainingSetup(seq_len=512)).total_bytes > base
    assert estimate_memory(config, 2, TrainingSetup(batch=2)).total_bytes > base
    assert estimate_memory(config, 2, TrainingSetup(lora_r=64)).total_bytes > base
    assert estimate_memory(config, 2, TrainingSetup(gradient_checkpointing=False)).activations > \
        estimate_memory(config, 2, setup).activations
    assert estimate_memory(config, 2, TrainingSetup(optimizer="sgd")).optimizer_state == 0


def test_weight_bytes_order_nf4_int8_bf16_fp32():
    weights = [estimate_memory(LLAMA_7B, 32, TrainingSetup(quant=q)).weights for q in ("nf4", "int8", "bf16", "fp32")]
    assert weights[0] < weights[1] < weights[2] < weights[3]
    # LLaMA-2-7B decoder: 32 × 202,383,360 linear params; nf4 ≈ 0.516 B/param ≈ 3.1 GiB, fp32 > 24 GiB.
    assert 3.0 * GIB < weights[0] < 3.3 * GIB and weights[3] > 24 * GIB


def test_llama_7b_full_depth_needs_more_than_8_gib_in_fp32():
    full = estimate_memory(LLAMA_7B, 32, TrainingSetup(quant="fp32"))
    assert full.total_bytes > 8 * GIB
    assert full.embeddings_and_head == 2 * 32_000 * 4096 * 4  # untied head
    with pytest.raises(BudgetTooSmall):
        choose_depth(LLAMA_7B, 2 * GIB, TrainingSetup(quant="fp32"))


@pytest.mark.parametrize("depth", [1, 5, 8])
def test_choose_depth_at_budget_edges(depth):
    setup = TrainingSetup(quant="nf4")
    exact = estimate_memory(TINY, depth, setup).total_bytes
    assert choose_depth(TINY, exact, setup) == depth  # exactly fits
    if depth > 1:
        assert choose_depth(TINY, exact - 1, setup) == depth - 1  # one byte short
    plan = plan_depth(TINY, exact, setup)
    assert plan.breakdown.total_bytes == exact and plan.totals[depth - 1] == exact and len(plan.totals) == 8


def test_nothing_fits_is_a_clear_error():
    setup = TrainingSetup()
    need = estimate_memory(TINY, 1, setup).total_bytes
    with pytest.raises(PrufedError, match="no depth fits.*MiB") as excinfo:
        choose_depth(TINY, need - 1, setup)
    assert excinfo.value.needed_bytes == need
    assert choose_depth(TINY, 10**15, setup) == 8  # a huge budget keeps every layer


@pytest.mark.parametrize("kwargs, flag", [
    ({"seq_len": 0}, "--seq-len"), ({"batch": -1}, "--batch"), ({"lora_r": 0}, "--lora-r"),
    ({"quant": "fp8"}, "--quant"), ({"optimizer": "adam8bit"}, "--optimizer"),
    ({"lora_targets": ("q_proj", "wq")}, "--lora-targets"), ({"lora_targets": ()}, "--lora-targets"),
])
def test_bad_setup_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainingSetup(**kwargs)


def test_bad_config_and_depth_are_named():
    with pytest.raises(ConfigError, match="intermediate_size"):
        estimate_memory({k: v for k, v in TINY.items() if k != "intermediate_size"}, 1, TrainingSetup())
    with pytest.raises(ConfigError, match="--depth"):
        estimate_memory(TINY, 9, TrainingSetup())
    with pytest.raises(ConfigError, match="--budget-gib"):
        choose_depth(TINY, -1, TrainingSetup())
