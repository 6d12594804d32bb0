"""Dirichlet non-IID split: a partition of all examples, non-empty clients, deterministic, skew grows as α shrinks."""

import random

import pytest

from edge_client.core.partition import dirichlet, dirichlet_split, label_skew
from prufed.common.errors import ConfigError


def _categories(count=600, kinds=12, seed=0):
    rng = random.Random(seed)
    return [f"book{rng.randrange(kinds)}" for _ in range(count)]


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
@pytest.mark.parametrize("clients", [1, 3, 6])
def test_partition_covers_every_index_once_and_no_client_is_empty(alpha, clients):
    cats = _categories()
    shards = dirichlet_split(cats, clients, alpha, seed=3)
    assert len(shards) == clients
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(len(cats)))
    assert all(shard for shard in shards)
    assert all(shard == sorted(shard) for shard in shards)


def test_deterministic_in_seed_and_independent_of_nothing_else():
    cats = _categories()
    assert dirichlet_split(cats, 5, 0.3, seed=11) == dirichlet_split(list(cats), 5, 0.3, seed=11)
    assert dirichlet_split(cats, 5, 0.3, seed=11) != dirichlet_split(cats, 5, 0.3, seed=12)


def test_skew_increases_as_alpha_shrinks():
    cats = _categories(1200, 20)
    def mean_skew(alpha):
        return sum(label_skew(cats, dirichlet_split(cats, 6, alpha, seed=s)) for s in range(5)) / 5
    skews = [mean_skew(a) for a in (100.0, 1.0, 0.1, 0.01)]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.15 and skews[-1] > 0.6


def test_empty_clients_are_filled_even_with_a_single_category():
    cats = ["only"] * 7
    shards = dirichlet_split(cats, 7, 0.01, seed=0)
    assert sorted(len(s) for s in shards) == [1] * 7


def test_label_skew_extremes():
    cats = ["a", "a", "b", "b"]
    assert label_skew(cats, [[0, 2], [1, 3]]) == 0.0
    assert label_skew(cats, [[0, 1], [2, 3]]) == pytest.approx(0.5)


def test_dirichlet_draw_is_a_distribution():
    p = dirichlet(0.001, 8, random.Random(0))
    assert len(p) == 8 and abs(sum(p) - 1.0) < 1e-9 and min(p) >= 0.0


@pytest.mark.parametrize("args, flag", [((3, 0.0), "--alpha"), ((0, 1.0), "--clients"), ((99, 1.0), "--clients"),
                                        ((2, float("inf")), "--alpha")])
def test_invalid_arguments_name_the_flag(args, flag):
    with pytest.raises(ConfigError, match=flag):
        dirichlet_split(_categories(20), *args)
