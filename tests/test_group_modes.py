"""fedavg-group, mixed and additive (aggregator/core): property tests against an independent float64 reference,
the exact limits (mix 0 = fedavg-group, mixed 1 = HeteAgg), HeteAgg / share, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_heteagg import NUM_LAYERS, assert_close_ulp, delta, global_adapter

from aggregator.core.additive import AdditiveAggregator
from aggregator.core.fedavg_group import FedAvgGroupAggregator
from aggregator.core.heteagg import AggregationConfig, AggregationError, HeteAggregator
from aggregator.core.mixed import MixedAggregator
from aggregator.core.modes import parse_mix
from prufed.common.adapter_keys import keys_for_layers, layer_of
from prufed.common.errors import ConfigError

MODES = {"fedavg-group": FedAvgGroupAggregator, "mixed": MixedAggregator, "additive": AdditiveAggregator}


def run(mode, globals_, clients, mix=None, lr=1.0, weighting="examples", initial=None):
    """clients: list of (group, update, n) folded in order; returns {group: state}."""
    cls = MODES[mode]
    config = AggregationConfig(weighting=weighting, server_lr=lr)
    agg = cls(globals_, config, initial) if mix is None else cls(globals_, config, initial, mix=mix)
    for i, (group, update, n) in enumerate(clients):
        agg.add(group, update, n, name=f"c{i}")
    return {g: r.state for g, r in agg.finish().items()}


def reference(mode, globals_, clients, mix, lr=1.0, weighting="examples"):
    """Per key, straight from the formulas in float64, written independently of the streaming code."""
    def weight(n):
        return float(n) if weighting == "examples" else 1.0

    def mean(members, key):
        held = [(u[key].double(), weight(n)) for _, u, n in members if key in u]
        if not held:
            return None
        return lr * sum(w * v for v, w in held) / sum(w for _, w in held)

    out = {}
    for group, state in globals_.items():
        mine = [c for c in clients if c[0] == group]
        rest = [c for c in clients if c[0] != group]
        a_g = {k: mean(mine, k) for k in state}
        b_g = {k: mean(rest, k) for k in state}
        a = {k: mean(clients, k) for k in state}
        coef = {}
        for layer in {layer_of(k) for k in state}:
            keys = [k for k in state if layer_of(k) == layer and a_g[k] is not None and b_g[k] is not None]
            if mix != "auto":
                coef[layer] = mix
                continue
            if not keys:
                coef[layer] = 0.0
                continue
            u = torch.cat([a_g[k].flatten() for k in keys])
            v = torch.cat([b_g[k].flatten() for k in keys])
            nu, nv = u.norm().item(), v.norm().item()
            cos = (u @ v).item() / (nu * nv) if nu > 0 and nv > 0 else 0.0
            coef[layer] = max(0.0, cos) if mode == "mixed" else (max(0.0, cos) * nu / nv if nv > 0 else 0.0)
        new = {}
        for k, g in state.items():
            c = coef[layer_of(k)]
            if a_g[k] is not None:
                if mode == "fedavg-group":
                    step = a_g[k]
                elif mode == "mixed":
                    step = (1 - c) * a_g[k] + c * a[k]
                else:
                    step = a_g[k] + (c * b_g[k] if b_g[k] is not None else 0)
            elif a[k] is not None and mode != "fedavg-group":
                step = a[k] if mode == "mixed" else (1.0 if mix == "auto" else c) * a[k]
            else:
                step = None
            new[k] = g.clone() if step is None else (g.double() + step).float()
        out[group] = new
    return out


groups_strategy = st.lists(st.lists(st.integers(0, NUM_LAYERS - 2), min_size=1, max_size=NUM_LAYERS - 1, unique=True),
                           min_size=1, max_size=3, unique_by=lambda layers: tuple(sorted(layers)))


def make_clients(groups, sizes, seed):
    g0 = global_adapter(seed)
    globals_ = {g: global_adapter(seed + 7 * i) for i, g in enumerate(groups)}
    clients = []
    for i, n in enumerate(sizes):
        group = groups[i % len(groups)]
        clients.append((group, delta(g0, list(group), seed * 31 + i), n))
    return globals_, clients


@settings(max_examples=30, deadline=None)
@given(layer_groups=groups_strategy, sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6),
       mode=st.sampled_from(sorted(MODES)), mix=st.sampled_from(["auto", 0.0, 0.3, 1.0, 2.5]),
       lr=st.sampled_from([1.0, 2.0]), weighting=st.sampled_from(["examples", "uniform"]), seed=st.integers(0, 500))
def test_matches_float64_reference(layer_groups, sizes, mode, mix, lr, weighting, seed):
    groups = [tuple(sorted(g)) for g in layer_groups]
    if mode == "mixed" and mix not in ("auto",) and mix > 1:
        mix = 1.0
    globals_, clients = make_clients(groups, sizes, seed)
    result = run(mode, globals_, clients, None if mode == "fedavg-group" else mix, lr, weighting)
    expected = reference(mode, globals_, clients, mix, lr, weighting)
    assert set(result) == set(groups)
    for group in groups:
        for key in expected[group]:
            torch.testing.assert_close(result[group][key], expected[group][key], rtol=2e-6, atol=1e-7)
    never = f".layers.{NUM_LAYERS - 1}."  # nobody holds the last layer: bit-identical
    for group in groups:
        for key in globals_[group]:
            if never in key:
                assert torch.equal(result[group][key], globals_[group][key])


def three_groups(seed=0):
    groups = [tuple(range(5)), (0, 1, 2), (0, 3)]
    return make_clients(groups, [40, 9, 300, 17, 5, 120, 66], seed)


def test_fedavg_group_is_heteagg_fedavg_per_group():
    globals_, clients = three_groups()
    result = run("fedavg-group", globals_, clients)
    for group, state in globals_.items():
        agg = HeteAggregator(state, AggregationConfig(mode="fedavg"))
        for g, update, n in clients:
            if g == group:
                agg.add(update, n)
        assert_close_ulp(result[group], agg.finish().state, ulps=0)


@pytest.mark.parametrize("mode", ["mixed", "additive"])
def test_mix_zero_is_exactly_fedavg_group(mode):
    globals_, clients = three_groups(1)
    base = run("fedavg-group", globals_, clients)
    result = run(mode, globals_, clients, mix=0.0)
    for group, state in globals_.items():
        held = set(keys_for_layers(state, list(group)))
        for key in state:
            if key in held or mode == "additive":
                assert torch.equal(result[group][key], base[group][key]), (group, key)


def test_mixed_one_is_exactly_heteagg():
    g0 = global_adapter(3)
    groups = [tuple(range(5)), (0, 1, 2), (0, 3)]
    _, clients = make_clients(groups, [40, 9, 300, 17, 5, 120, 66], 3)
    result = run("mixed", {g: g0 for g in groups}, clients, mix=1.0, lr=2.0)
    agg = HeteAggregator(g0, AggregationConfig(server_lr=2.0))
    for _, update, n in clients:
        agg.add(update, n)
    expected = agg.finish().state
    for group in groups:
        assert_close_ulp(result[group], expected, ulps=0)


def test_additive_with_share_reproduces_heteagg_over_share():
    # Group (0, 1) holds layers that both groups hold, so its share s = W_g / W is the same on every held key.
    g0 = global_adapter(5)
    deep, shallow = (0, 1, 2, 3), (0, 1)
    clients = [(deep, delta(g0, list(deep), 1), 300), (shallow, delta(g0, list(shallow), 2), 100),
               (deep, delta(g0, list(deep), 3), 50), (shallow, delta(g0, list(shallow), 4), 30)]
    s = 130 / 480
    result = run("additive", {deep: g0, shallow: g0}, clients, mix=(1 - s) / s)
    agg = HeteAggregator(g0, AggregationConfig())
    for _, update, n in clients:
        agg.add(update, n)
    hetero = agg.finish().state
    for key in keys_for_layers(g0, list(shallow)):
        expected = g0[key].double() + (hetero[key].double() - g0[key].double()) / s
        torch.testing.assert_close(result[shallow][key].double(), expected, rtol=1e-5, atol=1e-6)
        # and it differs from plain HeteAgg: the step is 1/s = 3.7x longer
        assert not torch.allclose(result[shallow][key], hetero[key])


def test_auto_coefficients_follow_agreement():
    g0 = global_adapter(0)
    a, b = (0, 1, 2), (0, 1)
    same = delta(g0, [0, 1, 2], 11)
    opposite = {k: -v for k, v in same.items() if layer_of(k) in (0, 1)}
    agg = MixedAggregator({a: g0, b: g0}, mix="auto")
    agg.add(a, same, 10)
    agg.add(b, {k: v.clone() for k, v in same.items() if layer_of(k) in (0, 1)}, 10)
    report = agg.finish()[b].report
    assert report["lambda"]["0"] == pytest.approx(1.0) and report["lambda"]["1"] == pytest.approx(1.0)
    agg = AdditiveAggregator({a: g0, b: g0}, mix="auto")
    agg.add(a, same, 10)
    agg.add(b, opposite, 10)
    result = agg.finish()[b]
    assert result.report["mu"]["0"] == 0.0  # opposed updates: nothing is added
    for key in opposite:
        torch.testing.assert_close(result.state[key], (g0[key].double() + opposite[key].double()).float())


def test_group_without_updates_and_initial_global():
    g0 = global_adapter(2)
    idle = (0, 1, 2, 3)
    clients = [((0, 1), delta(g0, [0, 1], 5), 10)]
    # fedavg-group: a group that sent nothing keeps its global bit for bit; mixed gives it everyone's mean step.
    fed = run("fedavg-group", {idle: g0}, clients, initial=g0)
    assert all(torch.equal(fed[idle][k], g0[k]) for k in g0) and set(fed) == {idle, (0, 1)}
    mixed = run("mixed", {idle: g0}, clients, mix=0.5, initial=g0)
    for key in keys_for_layers(g0, [0, 1]):
        torch.testing.assert_close(mixed[idle][key], mixed[(0, 1)][key])


def test_refused_update_changes_nothing():
    g0 = global_adapter(0)
    agg = MixedAggregator({(0, 1): g0}, mix=0.5)
    good = delta(g0, [0, 1], 1)
    agg.add((0, 1), good, 10)
    with pytest.raises(AggregationError, match="same keys"):
        agg.add((0, 1), delta(g0, [0], 2), 10)  # not the group's key set
    bad = dict(good)
    bad[next(iter(bad))] = torch.zeros(3)
    with pytest.raises(AggregationError, match="shape"):
        agg.add((0, 1), bad, 10)
    result = agg.finish()[(0, 1)]
    assert result.report["clients"] == 1 and result.report["examples"] == 10
    expected = run("mixed", {(0, 1): g0}, [((0, 1), good, 10)], mix=0.5)[(0, 1)]
    assert_close_ulp(result.state, expected, ulps=0)


def test_bad_configuration_names_the_flag():
    g0 = global_adapter(0)
    with pytest.raises(ConfigError, match="--mix"):
        MixedAggregator({(0,): g0}, mix=1.5)
    with pytest.raises(ConfigError, match="--mix"):
        AdditiveAggregator({(0,): g0}, mix=-1.0)
    with pytest.raises(ConfigError, match="--space"):
        FedAvgGroupAggregator({(0,): g0}, AggregationConfig(space="product"))
    with pytest.raises(ConfigError, match="--trim-fraction"):
        MixedAggregator({(0,): g0}, AggregationConfig(trim_fraction=0.1), mix=0.5)
    with pytest.raises(AggregationError, match="no global"):
        FedAvgGroupAggregator({})
    assert parse_mix("auto", upper=1.0) == "auto" and parse_mix("0.25", upper=1.0) == 0.25
    for bad in ("x", "nan", "-1", "2"):
        with pytest.raises(ConfigError, match="--mix"):
            parse_mix(bad, upper=1.0)
    assert parse_mix("7", upper=None) == 7.0
