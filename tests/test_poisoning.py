"""F1 poisoning defences: the weight-share cap, adaptive clipping around the round's median, and the result check
that fails a round instead of publishing a non-finite or runaway global (pure functions and a real store)."""

from __future__ import annotations

import math

import pytest
import torch
from aggregator_helpers import make_delta
from test_rounds import make_fed, upload

from aggregator.core.poisoning import adaptive_clip_scales, capped_weights, lower_median, result_problem, state_norm
from aggregator.core.robust import update_norm
from prufed.common.refusals import RefusalCode, Refused

FLT_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("weights,share", [([1, 1, 98], 0.5), ([10, 30], 0.5), ([1, 2, 3, 100], 0.4),
                                           ([5, 5, 5, 5], 0.25), ([7, 1, 1, 1, 1, 1], 0.3), ([3, 4], 1.0)])
def test_capped_weights_respect_the_share_and_keep_small_weights(weights, share):
    capped = capped_weights(weights, share)
    assert max(capped) <= share * sum(capped) * (1 + 1e-12)
    tau = max(capped)
    # water-filling: weights below the cap are untouched, those above it are cut to exactly the cap
    assert all(c == w if w <= tau else math.isclose(c, tau) for c, w in zip(capped, weights))


def test_capped_weights_cannot_satisfy_the_share_with_too_few_clients():
    assert capped_weights([1, 99], 0.4) == [1.0, 1.0] and capped_weights([9], 0.5) == [1.0]


def test_adaptive_clip_uses_the_lower_median():
    assert lower_median([5.0, 1.0]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    assert adaptive_clip_scales([1.0, 1e30], 3.0) == [1.0, 3.0 / 1e30]
    assert adaptive_clip_scales([1.0, 2.0, 2.5], 3.0) == [1.0, 1.0, 1.0]
    assert adaptive_clip_scales([0.0, 0.0, 5.0], 3.0) == [1.0, 1.0, 1.0]  # zero median: no information
    assert adaptive_clip_scales([1.0, 100.0], None) == [1.0, 1.0]


def test_result_check_refuses_non_finite_and_runaway_steps():
    previous = {"a": torch.ones(4), "b": torch.zeros(3)}
    assert result_problem({"a": torch.ones(4) * 2, "b": torch.ones(3)}, previous, 10.0) is None
    nan = {"a": torch.tensor([1.0, float("nan"), 1, 1]), "b": torch.zeros(3)}
    assert "non-finite values in a" in result_problem(nan, previous, 10.0)
    runaway = {"a": torch.full((4,), 100.0), "b": torch.zeros(3)}
    assert "above the bound 20" in result_problem(runaway, previous, 10.0)  # 10 × ‖previous‖ = 10 × 2
    assert state_norm(previous) == 2.0


def flt_max_delta(global_state, layers) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, FLT_MAX) for k, v in make_delta(global_state, layers, seed=0).items()}


def test_flt_max_attacker_is_clipped_and_capped(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, rounds=1, min_clients=2)
    attacker, _ = fed.clients.register(list(range(8)), {})
    honest, _ = fed.clients.register([1, 5], {})
    fed.tick()
    g0 = {k: v.clone() for k, v in fed.global_state(0).items()}
    with pytest.raises(Refused) as too_many:
        upload(fed, attacker, range(8), 1, seed=0, examples=2**63 - 1, tmp_path=tmp_path)
    assert too_many.value.code == RefusalCode.BAD_NUM_EXAMPLES and "max_num_examples" in str(too_many.value)
    poisoned = flt_max_delta(g0, range(8))
    upload(fed, attacker, range(8), 1, seed=0, examples=fed.config.max_num_examples, tmp_path=tmp_path,
           tensors=poisoned)
    honest_delta = make_delta(g0, [1, 5], seed=7)
    upload(fed, honest, [1, 5], 1, seed=7, examples=1, tmp_path=tmp_path, tensors=honest_delta)
    assert fed.tick() == [1]
    g1 = fed.global_state(1)
    assert all(bool(torch.isfinite(v).all()) for v in g1.values())
    step = math.sqrt(sum(float((g1[k].double() - g0[k].double()).norm()) ** 2 for k in g0))
    assert step <= 3.0 * update_norm(honest_delta) * 1.001  # the attacker moved the global at most 3× an honest step
    metrics = fed.status()["last_metrics"]
    assert metrics["clipped"] == 1 and metrics["weights_capped"] == 1


def test_round_with_a_runaway_result_fails_and_keeps_the_global(db_url, tmp_path, tiny_model_dir):
    fed = make_fed(db_url, tmp_path, tiny_model_dir, rounds=2, min_clients=1, quorum_fraction=1.0)
    alone, _ = fed.clients.register(list(range(8)), {})
    fed.tick()
    g0 = fed.global_state(0)
    upload(fed, alone, range(8), 1, seed=0, examples=1, tmp_path=tmp_path, tensors=flt_max_delta(g0, range(8)))
    assert fed.tick() == []
    first = fed.status()["rounds"][0]
    assert first["state"] == "failed" and "result refused" in first["reason"] and "max_step_ratio" in first["reason"]
    assert fed.globals.latest_version() == 0
    fed.tick()
    assert fed.rounds.pull_task(alone).round == 2 and fed.rounds.pull_task(alone).global_version == 0
