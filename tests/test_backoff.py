"""The retry schedule: capped exponential windows, full jitter, deterministic under a seeded RNG."""

import random

import pytest

from edge_client.backoff import BackoffPolicy
from prufed.common.errors import ConfigError


def test_windows_double_then_cap():
    policy = BackoffPolicy(base_s=0.25, cap_s=3.0, max_attempts=10)
    assert [policy.window(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.window(10_000) == 3.0  # no overflow for absurd retry counts


def test_delays_are_full_jitter_within_window():
    policy = BackoffPolicy(base_s=0.5, cap_s=4.0, max_attempts=7)
    rng = random.Random(1)
    samples = [[policy.delay(n, rng) for _ in range(400)] for n in range(6)]
    for n, values in enumerate(samples):
        window = policy.window(n)
        assert all(0.0 <= v <= window for v in values)
        # full jitter: uniform over the whole window, so the mean is about window/2 and small delays occur
        assert abs(sum(values) / len(values) - window / 2) < 0.1 * window
        assert min(values) < 0.1 * window


def test_delays_count_and_determinism():
    policy = BackoffPolicy(base_s=1.0, cap_s=8.0, max_attempts=5)
    first = list(policy.delays(random.Random(7)))
    assert len(first) == 4
    assert first == list(policy.delays(random.Random(7)))
    assert first != list(policy.delays(random.Random(8)))
    assert list(BackoffPolicy(max_attempts=1).delays(random.Random(0))) == []


@pytest.mark.parametrize("kwargs, flag", [
    ({"base_s": 0.0}, "--retry-base"), ({"base_s": float("nan")}, "--retry-base"),
    ({"base_s": 2.0, "cap_s": 1.0}, "--retry-cap"), ({"max_attempts": 0}, "--retry-attempts"),
    ({"max_attempts": True}, "--retry-attempts"),
])
def test_invalid_policy_names_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        BackoffPolicy(**kwargs)


def test_negative_retry_refused():
    with pytest.raises(ValueError):
        BackoffPolicy().window(-1)
