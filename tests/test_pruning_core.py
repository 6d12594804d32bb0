"""The pure pruning core: every strategy's kept layers against hand-computed lists, protect, bad inputs, invariants."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.core.pruning import (
    POSITIONAL_STRATEGIES,
    SCORED_STRATEGIES,
    STRATEGIES,
    LayerScores,
    PruningPlan,
    make_plan,
    parse_protect,
)
from prufed.common.errors import ConfigError


def kept_without(num_layers: int, dropped) -> list[int]:
    return [i for i in range(num_layers) if i not in set(dropped)]


# (L, keep) -> strategy -> kept layers, worked out by hand from each strategy's definition.
HAND_COMPUTED = {
    (12, 8): {  # the example, K=4
        "top": list(range(8)),
        "bottom": list(range(4, 12)),
        "even-alternate": [0, 1, 2, 3, 4, 6, 8, 10],  # drops 11, 9, 7, 5
        "odd-alternate": [0, 1, 2, 3, 5, 7, 9, 11],  # drops 10, 8, 6, 4
        "top-alternate": [0, 1, 2, 3, 4, 6, 8, 11],  # block 10, 9 below the final layer, then 7, 5
        "symmetric": [0, 1, 2, 3, 8, 9, 10, 11],  # drops the middle 4..7
    },
    (12, 11): {  # K=1
        "top": kept_without(12, [11]),
        "bottom": kept_without(12, [0]),
        "even-alternate": kept_without(12, [11]),
        "odd-alternate": kept_without(12, [10]),
        "top-alternate": kept_without(12, [10]),
        "symmetric": kept_without(12, [5]),  # block starts at floor((12 - 1) / 2) = 5
    },
    (7, 4): {  # odd L, K=3
        "top": [0, 1, 2, 3],
        "bottom": [3, 4, 5, 6],
        "even-alternate": [0, 1, 3, 5],  # drops 6, 4, 2
        "odd-alternate": [0, 2, 4, 6],  # drops 5, 3, 1
        "top-alternate": [0, 1, 3, 6],  # block 5, 4, then 2
        "symmetric": [0, 1, 5, 6],  # drops 2, 3, 4
    },
    (10, 4): {  # K=6 > L/2: alternation runs out and continues from the top
        "top": [0, 1, 2, 3],
        "bottom": [6, 7, 8, 9],
        "even-alternate": [0, 2, 4, 6],  # drops 9, 7, 5, 3, 1, then 8
        "odd-alternate": [1, 3, 5, 7],  # drops 8, 6, 4, 2, 0, then 9
        "top-alternate": [1, 3, 5, 9],  # block 8, 7, 6, then 4, 2, 0
        "symmetric": [0, 1, 8, 9],  # drops 2..7
    },
    (8, 1): {  # K = L - 1
        "top": [0],
        "bottom": [7],
        "even-alternate": [0],  # drops 7, 5, 3, 1, then 6, 4, 2
        "odd-alternate": [1],  # drops 6, 4, 2, 0, then 7, 5, 3
        "top-alternate": [7],  # never drops the final layer
        "symmetric": [7],  # block starts at floor((8 - 7) / 2) = 0
    },
    (30, 20): {  # the default model at --keep 20
        "top": list(range(20)),
        "bottom": list(range(10, 30)),
        "even-alternate": kept_without(30, range(29, 10, -2)),
        "odd-alternate": kept_without(30, range(28, 9, -2)),
        "top-alternate": kept_without(30, [28, 27, 26, 25, 24, 22, 20, 18, 16, 14]),
        "symmetric": kept_without(30, range(10, 20)),  # starts at floor((30 - 10) / 2)
    },
}


@pytest.mark.parametrize("shape", sorted(HAND_COMPUTED))
@pytest.mark.parametrize("strategy", POSITIONAL_STRATEGIES)
def test_positional_strategies_match_hand_computed(shape, strategy):
    num_layers, keep = shape
    plan = make_plan(strategy, num_layers, keep)
    assert list(plan.kept_layers) == HAND_COMPUTED[shape][strategy]
    assert plan.depth == keep
    assert sorted(plan.kept_layers + plan.dropped_layers) == list(range(num_layers))


@pytest.mark.parametrize("strategy", POSITIONAL_STRATEGIES)
def test_keep_all_drops_nothing(strategy):
    assert make_plan(strategy, 8, 8).kept_layers == tuple(range(8))
    assert make_plan(strategy, 1, 1).kept_layers == (0,)


def scores_for(num_layers: int, values, block: int | None = None, block_values=None) -> LayerScores:
    angular = {block: tuple(block_values)} if block is not None else {}
    return LayerScores(magnitude=tuple(values), contribution=tuple(values), angular=angular)


@pytest.mark.parametrize("strategy", ["magnitude", "contribution"])
def test_lowest_score_dropping(strategy):
    values = [0.9, 0.1, 0.5, 0.05, 0.7, 0.3]
    plan = make_plan(strategy, 6, 3, scores=scores_for(6, values))
    assert plan.kept_layers == (0, 2, 4)  # drops 3 (0.05), 1 (0.1), 5 (0.3)
    protected = make_plan(strategy, 6, 3, scores=scores_for(6, values), protect=[-3])
    assert protected.kept_layers == (0, 3, 4)  # 3 is protected, so 2 (0.5) goes instead
    assert protected.protected == (3,)


def test_lowest_score_ties_drop_lower_index_first():
    plan = make_plan("magnitude", 4, 2, scores=scores_for(4, [0.2, 0.2, 0.2, 0.1]))
    assert plan.kept_layers == (1, 2)


def test_magnitude_and_contribution_read_their_own_scores():
    scores = LayerScores(magnitude=(0.1, 0.9, 0.5), contribution=(0.9, 0.1, 0.5))
    assert make_plan("magnitude", 3, 2, scores=scores).kept_layers == (1, 2)
    assert make_plan("contribution", 3, 2, scores=scores).kept_layers == (0, 2)


def test_angular_block_picks_closest_block_and_respects_protect():
    # block size 3 on 8 layers: starts 0..5
    distances = [0.4, 0.3, 0.35, 0.05, 0.2, 0.1]
    scores = scores_for(8, [1.0] * 8, block=3, block_values=distances)
    assert make_plan("angular-block", 8, 5, scores=scores).dropped_layers == (3, 4, 5)
    # protecting 4 rules out starts 2, 3 and 4: the best remaining start is 5
    assert make_plan("angular-block", 8, 5, scores=scores, protect=[4]).dropped_layers == (5, 6, 7)


def test_protect_refuses_positional_plans_that_drop_it():
    with pytest.raises(ConfigError, match="--protect") as info:
        make_plan("top", 12, 8, protect=[0, -1])
    assert "11" in str(info.value)
    assert make_plan("top-alternate", 12, 8, protect=[0, -1]).protected == (0, 11)
    assert make_plan("symmetric", 12, 8, protect=[0, -1]).kept_layers[0] == 0


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"strategy": "top", "num_layers": 8, "keep": 0}, "--keep"),
        ({"strategy": "top", "num_layers": 8, "keep": 9}, "--keep"),
        ({"strategy": "top", "num_layers": 8, "keep": -1}, "--keep"),
        ({"strategy": "middle", "num_layers": 8, "keep": 4}, "--strategy"),
        ({"strategy": "top", "num_layers": 8, "keep": 4, "protect": [8]}, "--protect"),
        ({"strategy": "top", "num_layers": 8, "keep": 4, "protect": [-9]}, "--protect"),
        ({"strategy": "magnitude", "num_layers": 8, "keep": 4}, "--strategy"),  # no scores
        ({"strategy": "top", "num_layers": 0, "keep": 1}, "num_hidden_layers"),
    ],
)
def test_bad_inputs_raise_config_error_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as info:
        make_plan(**kwargs)
    assert info.value.field == flag
    assert str(info.value).startswith(flag)


def test_scored_bad_inputs():
    with pytest.raises(ConfigError, match="scores"):
        make_plan("magnitude", 4, 2, scores=scores_for(3, [1, 2, 3]))
    with pytest.raises(ConfigError, match="block size 2"):
        make_plan("angular-block", 4, 2, scores=scores_for(4, [1, 2, 3, 4], block=1, block_values=[0.1] * 4))
    with pytest.raises(ConfigError, match="--protect"):  # only 2 unprotected layers, 3 must go
        make_plan("contribution", 4, 1, scores=scores_for(4, [1, 2, 3, 4]), protect=[0, 1])
    with pytest.raises(ConfigError, match="--protect"):  # every 2-block touches layer 1 or 2
        make_plan("angular-block", 4, 2, scores=scores_for(4, [1] * 4, 2, [0.1, 0.2, 0.3]), protect=[1, 2])


@pytest.mark.parametrize(
    ("text", "expected"), [(None, ()), ("", ()), ("0,-1", (0, -1)), (" 3, 5 ,", (3, 5)), ("7", (7,))]
)
def test_parse_protect(text, expected):
    assert parse_protect(text) == expected


@pytest.mark.parametrize("text", ["a", "0;1", "1.5", "0,x"])
def test_parse_protect_rejects_non_integers(text):
    with pytest.raises(ConfigError, match="^--protect"):
        parse_protect(text)


@pytest.mark.parametrize(
    "kept", [(), (3, 1), (1, 1, 2), (-1, 2), (0, 8)],
)
def test_plan_rejects_bad_kept_layers(kept):
    with pytest.raises(ConfigError):
        PruningPlan("top", 8, kept)


def test_plan_json_round_trip_and_index_maps():
    plan = make_plan("top-alternate", 12, 8, protect=[0, -1], source_model="smollm2-135m")
    document = json.loads(plan.to_json())
    assert document["kept_layers"] == [0, 1, 2, 3, 4, 6, 8, 11]
    assert {"strategy", "kept_layers", "source_num_layers", "source_model"} <= set(document)
    again = PruningPlan.from_json_dict(document)
    assert again == plan
    assert again.original_index(5) == 6 and again.pruned_index(11) == 7
    with pytest.raises(KeyError):
        again.pruned_index(10)
    with pytest.raises(ConfigError, match="missing"):
        PruningPlan.from_json_dict({"strategy": "top", "kept_layers": [0]})


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 64), strategy=st.sampled_from(POSITIONAL_STRATEGIES))
def test_positional_invariants(data, num_layers, strategy):
    keep = data.draw(st.integers(1, num_layers))
    plan = make_plan(strategy, num_layers, keep)
    kept = list(plan.kept_layers)
    assert kept == sorted(set(kept))
    assert len(kept) == keep
    assert kept[0] >= 0 and kept[-1] < num_layers
    if strategy == "top-alternate":
        assert kept[-1] == num_layers - 1
    if strategy == "symmetric" and keep >= 2:
        assert kept[0] == 0 and kept[-1] == num_layers - 1


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 40), strategy=st.sampled_from(SCORED_STRATEGIES))
def test_scored_invariants_respect_protect(data, num_layers, strategy):
    keep = data.draw(st.integers(1, num_layers))
    drops = num_layers - keep
    values = data.draw(st.lists(st.floats(0, 1), min_size=num_layers, max_size=num_layers))
    block = data.draw(st.lists(st.floats(0, 1), min_size=num_layers - drops + 1, max_size=num_layers - drops + 1))
    protect = data.draw(st.lists(st.integers(-num_layers, num_layers - 1), max_size=3))
    scores = LayerScores(tuple(values), tuple(values), {drops: tuple(block)} if drops else {})
    try:
        plan = make_plan(strategy, num_layers, keep, scores=scores, protect=protect)
    except ConfigError as exc:
        assert exc.field == "--protect"
        return
    kept = list(plan.kept_layers)
    assert kept == sorted(set(kept)) and len(kept) == keep
    assert set(plan.protected) <= set(kept)
    assert {p % num_layers for p in protect} <= set(kept)
    if strategy == "angular-block" and drops:
        dropped = plan.dropped_layers
        assert list(dropped) == list(range(dropped[0], dropped[0] + drops))  # one contiguous block


def test_every_strategy_is_covered():
    assert set(STRATEGIES) == set(POSITIONAL_STRATEGIES) | set(SCORED_STRATEGIES)
    assert all(set(HAND_COMPUTED[shape]) == set(POSITIONAL_STRATEGIES) for shape in HAND_COMPUTED)
