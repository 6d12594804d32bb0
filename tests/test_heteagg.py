"""HeteAgg core: property test against an independent implementation, plus every option."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core.heteagg import AggregationConfig, AggregationError, HeteAggregator, aggregate
from aggregator.core.init_adapter import initial_global_adapter
from aggregator.core.robust import trim_count
from prufed.common.adapter_keys import keys_for_layers, layer_of
from prufed.common.errors import ConfigError

NUM_LAYERS = 6
CONFIG = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
          "num_hidden_layers": NUM_LAYERS}


def global_adapter(seed: int = 0, r: int = 2) -> dict[str, torch.Tensor]:
    state = initial_global_adapter(CONFIG, r=r, alpha=2 * r, targets=("q_proj", "v_proj"), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: v + torch.randn(v.shape, generator=gen) * 0.1 for k, v in state.items()}  # B non-zero too


def delta(global_state, layers, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(global_state[k].shape, generator=gen) * scale for k in keys_for_layers(global_state, layers)}


def reference(global_state, updates, weighting="examples", lr=1.0):
    """Straightforward per-key loop in float64, written independently of the streaming code."""
    out = {}
    for key, value in global_state.items():
        num = torch.zeros(value.shape, dtype=torch.float64)
        den = 0.0
        for update, n in updates:
            if key in update:
                w = n if weighting == "examples" else 1
                num += w * update[key].double()
                den += w
        out[key] = value.clone() if den == 0 else (value.double() + lr * num / den).float()
    return out


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place."""
    ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # map sign-magnitude onto a monotone line
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


def assert_close_ulp(result, expected, ulps: int = 1):
    assert result.keys() == expected.keys()
    for key in expected:
        assert max_ulps(result[key], expected[key]) <= ulps, key


layer_sets = st.lists(st.integers(0, NUM_LAYERS - 2), min_size=1, max_size=NUM_LAYERS - 1, unique=True)


@settings(max_examples=40, deadline=None)
@given(clients=st.lists(st.tuples(layer_sets, st.integers(1, 10_000)), min_size=1, max_size=6),
       weighting=st.sampled_from(["examples", "uniform"]), lr=st.sampled_from([1.0, 0.5, 2.0]),
       seed=st.integers(0, 1000))
def test_matches_independent_implementation(clients, weighting, lr, seed):
    g = global_adapter(seed)
    updates = [(delta(g, layers, seed * 31 + i), n) for i, (layers, n) in enumerate(clients)]
    result = aggregate(g, updates, AggregationConfig(weighting=weighting, server_lr=lr))
    assert_close_ulp(result.state, reference(g, updates, weighting, lr))
    last = f".layers.{NUM_LAYERS - 1}."  # never drawn: the empty holder set must be bit-identical
    for key in g:
        if last in key:
            assert torch.equal(result.state[key], g[key]) and key not in result.holders
    held = {k for u, _ in updates for k in u}
    assert result.holders == {k: sum(k in u for u, _ in updates) for k in held}
    assert result.report["updates"] == len(updates) and result.report["keys_updated"] == len(held)


def test_order_independent():
    g = global_adapter(3)
    rng = random.Random(0)
    updates = [(delta(g, sorted(rng.sample(range(NUM_LAYERS), rng.randint(1, NUM_LAYERS))), i, scale=1.0),
                rng.randint(1, 10**6)) for i in range(40)]
    first = aggregate(g, updates).state
    for _ in range(3):
        rng.shuffle(updates)
        assert_close_ulp(aggregate(g, updates).state, first, ulps=1)


def test_float64_accumulation_beats_float32_summation():
    """1000 updates of very different magnitudes: the result is the correctly rounded formula (≤ 1 ulp)."""
    g = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    gen = torch.Generator().manual_seed(0)
    updates = [({k: torch.randn(4, 64, generator=gen) * 10 ** (i % 7 - 3) for k in g}, 1 + i % 5) for i in range(1000)]
    result = aggregate(g, updates).state
    assert_close_ulp(result, reference(g, updates), ulps=1)


def test_fedavg_equals_heteagg_for_equal_depths():
    g = global_adapter(1)
    updates = [(delta(g, [0, 2, 3], i), 10 * (i + 1)) for i in range(5)]
    fed = aggregate(g, updates, AggregationConfig(mode="fedavg")).state
    het = aggregate(g, updates, AggregationConfig(mode="heteagg")).state
    assert all(torch.equal(fed[k], het[k]) for k in g)


def test_fedavg_key_mismatch_lists_difference():
    g = global_adapter(1)
    agg = HeteAggregator(g, AggregationConfig(mode="fedavg"))
    agg.add(delta(g, [0, 1], 0), 5)
    with pytest.raises(AggregationError, match=r"fedavg.*missing \[.*layers\.1\..*extra \[.*layers\.2\."):
        agg.add(delta(g, [0, 2], 1), 5)
    agg.add(delta(g, [0, 1], 2), 5)  # the refused update changed nothing; the round goes on
    assert agg.finish().report["updates"] == 2


def test_uniform_weighting_ignores_example_counts():
    g = global_adapter(2)
    a, b = delta(g, [0], 1), delta(g, [0], 2)
    result = aggregate(g, [(a, 1), (b, 1000)], AggregationConfig(weighting="uniform")).state
    key = next(iter(a))
    torch.testing.assert_close(result[key], g[key] + (a[key] + b[key]) / 2)
    weighted = aggregate(g, [(a, 1), (b, 1000)]).state
    torch.testing.assert_close(weighted[key], g[key] + (a[key] + 1000 * b[key]) / 1001)


def test_server_lr_scales_the_step():
    g = global_adapter(2)
    updates = [(delta(g, [1, 2], 1), 3), (delta(g, [2], 2), 4)]
    one = aggregate(g, updates).state
    half = aggregate(g, updates, AggregationConfig(server_lr=0.5)).state
    for key in updates[0][0]:
        torch.testing.assert_close(half[key] - g[key], (one[key] - g[key]) / 2, rtol=1e-5, atol=1e-7)


def test_clipping_scales_large_updates_only():
    g = global_adapter(4)
    small, big = delta(g, [0], 1, scale=1e-3), delta(g, [0], 2, scale=10.0)
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in big.values()))
    clip = 1.0
    result = aggregate(g, [(small, 1), (big, 1)], AggregationConfig(clip_norm=clip))
    scale = clip / norm
    for key in small:
        torch.testing.assert_close(result.state[key], g[key] + (small[key] + scale * big[key]) / 2)
    assert result.report["clip_scales"] == {"update0": 1.0, "update1": pytest.approx(scale)}


def test_trimmed_mean_drops_outliers_per_coordinate():
    g = global_adapter(5)
    honest = [delta(g, [0, 1], i, scale=0.01) for i in range(4)]
    attacker = {k: torch.full_like(v, 1e6) for k, v in delta(g, [0], 99).items()}
    result = aggregate(g, [(u, 1) for u in honest] + [(attacker, 1)], AggregationConfig(trim_fraction=0.2))
    for key in keys_for_layers(g, [0]):  # 5 holders, trim 1 at each end: the median-ish mean of honest values
        stacked = torch.stack([u[key] for u in honest] + [attacker[key]]).double()
        ordered = stacked.sort(0).values[1:4]
        torch.testing.assert_close(result.state[key], (g[key].double() + ordered.mean(0)).float())
        assert result.state[key].abs().max() < 10
    for key in keys_for_layers(g, [1]):  # 4 holders: trim floor(0.8)=0, the plain mean
        torch.testing.assert_close(result.state[key], g[key] + sum(u[key] for u in honest) / 4)
    assert trim_count(3, 0.49) == 1 and trim_count(2, 0.49) == 0 and trim_count(10, 0.25) == 2


def test_trimmed_mean_buffer_is_bounded():
    g = global_adapter(5)
    update = delta(g, list(range(NUM_LAYERS)), 0)
    size = sum(v.numel() * 4 for v in update.values())
    agg = HeteAggregator(g, AggregationConfig(trim_fraction=0.1, buffer_limit_mib=2.5 * size / 2**20))
    agg.add(update, 1)
    agg.add(update, 1)
    with pytest.raises(AggregationError, match="trim-fraction"):
        agg.add(update, 1)


def test_product_space_is_exact_when_the_average_has_rank_r():
    """Every client shares the same local A: Σ w B_k A / Σ w = (mean B) A has rank r, so SVD recovers it exactly."""
    g = global_adapter(6, r=2)
    gen = torch.Generator().manual_seed(0)
    updates = []
    for n in [3, 5, 9]:
        d = {k: torch.zeros_like(v) for k, v in g.items() if layer_of(k) in (0, 1)}
        for k in d:
            if ".lora_B." in k:
                d[k] = torch.randn(d[k].shape, generator=gen)
        updates.append((d, n))
    result = aggregate(g, updates, AggregationConfig(space="product"))
    for module_key in [k for k in g if ".lora_A." in k and layer_of(k) in (0, 1)]:
        b_key = module_key.replace(".lora_A.", ".lora_B.")
        exact = sum(n * (g[b_key] + d[b_key]).double() @ (g[module_key] + d[module_key]).double() for d, n in updates) / 17
        got = result.state[b_key].double() @ result.state[module_key].double()
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    errors = result.report["product_error"]
    assert len(errors) == 4 and result.report["product_error_max"] < 1e-6
    for key in keys_for_layers(g, [2, 3, 4, 5]):
        assert torch.equal(result.state[key], g[key])


def test_product_space_reports_truncation_and_factors_error():
    g = global_adapter(7, r=2)
    updates = [(delta(g, [0, 1, 2], i, scale=0.5), 1 + i) for i in range(4)]  # Σ of 4 rank-2 products: rank ≤ 8
    product = aggregate(g, updates, AggregationConfig(space="product"))
    factors = aggregate(g, updates, AggregationConfig(space="factors"))
    for module, error in product.report["product_error"].items():
        a_key = module + ".lora_A.weight"
        b_key = module + ".lora_B.weight"
        exact = sum(n * (g[b_key] + d[b_key]).double() @ (g[a_key] + d[a_key]).double() for d, n in updates) / 10
        svals = torch.linalg.svdvals(exact)
        best = float(svals[2:].norm() / svals.norm())  # Eckart–Young: the optimum rank-2 error
        assert error == pytest.approx(best, rel=1e-6) and error > 1e-3
        mean_b_a = factors.state[b_key].double() @ factors.state[a_key].double()
        f_err = float((exact - mean_b_a).norm() / exact.norm())
        assert factors.report["factors_error"][module] == pytest.approx(f_err, rel=1e-6)
        assert f_err >= error - 1e-9  # no rank-2 factorisation beats the truncated SVD


def test_config_errors_name_the_flag():
    for kwargs, flag in [({"weighting": "x"}, "--weighting"), ({"mode": "x"}, "--mode"), ({"space": "x"}, "--space"),
                         ({"server_lr": 0.0}, "--server-lr"), ({"clip_norm": -1.0}, "--clip-norm"),
                         ({"trim_fraction": 0.5}, "--trim-fraction"),
                         ({"trim_fraction": 0.1, "space": "product"}, "--trim-fraction")]:
        with pytest.raises(ConfigError, match=flag):
            AggregationConfig(**kwargs)


def test_refused_updates_leave_aggregator_untouched():
    g = global_adapter(8)
    snapshot = {k: v.clone() for k, v in g.items()}
    agg = HeteAggregator(g)
    good = delta(g, [0], 1)
    agg.add(good, 2)
    bad_shape = {k: torch.zeros(3) for k in good}
    unknown = {**good, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 8)}
    for bad, n in [(bad_shape, 1), (unknown, 1), (good, 0), ({}, 1)]:
        with pytest.raises(AggregationError):
            agg.add(bad, n)
    result = agg.finish()
    assert result.report["updates"] == 1
    torch.testing.assert_close(result.state, reference(g, [(good, 2)]))
    assert all(torch.equal(g[k], snapshot[k]) for k in g)
    with pytest.raises(AggregationError, match="finish"):
        agg.finish()
