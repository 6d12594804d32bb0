"""Non-IID split of a data set over clients: a Dirichlet draw of category proportions per category (pure).

For every category c (sorted, so the result does not depend on input order), p_c ~ Dir(α·1_N) over the N clients;
the category's examples, shuffled, are cut at the cumulative proportions. Small α concentrates each category on few
clients (strong skew), large α approaches an IID split (Hsu et al. 2019, "Measuring the effects of non-identical
data distribution"). A client left empty takes one example from the largest client, so every client can train.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from prufed.common.errors import ConfigError


def dirichlet(alpha: float, size: int, rng: random.Random) -> list[float]:
    """One draw of Dir(α·1_size) via normalised Gamma(α, 1) variates."""
    while True:
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(size)]
        total = sum(draws)
        if total > 0:  # tiny α can underflow every variate to 0.0; redraw
            return [d / total for d in draws]


def dirichlet_split(categories: Sequence[str], num_clients: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Indices into `categories` for each client: every index exactly once, every client non-empty, sorted lists.

    Deterministic in (categories, num_clients, alpha, seed).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError("--clients", f"must be an integer >= 1, got {num_clients!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("--alpha", f"must be a positive number, got {alpha}")
    if len(categories) < num_clients:
        raise ConfigError("--clients", f"{num_clients} clients need at least as many examples, got {len(categories)}")
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for category in sorted(by_category):
        members = by_category[category]
        rng.shuffle(members)
        proportions = dirichlet(alpha, num_clients, rng)
        start, cumulative = 0, 0.0
        for client, share in enumerate(proportions):
            cumulative += share
            end = len(members) if client == num_clients - 1 else round(cumulative * len(members))
            shards[client].extend(members[start:end])
            start = max(start, end)
    for client in range(num_clients):
        if not shards[client]:
            donor = max(range(num_clients), key=lambda c: (len(shards[c]), -c))
            shards[client].append(shards[donor].pop())
    return [sorted(shard) for shard in shards]


def label_skew(categories: Sequence[str], shards: Sequence[Sequence[int]]) -> float:
    """Mean total-variation distance between each client's category mix and the global mix, in [0, 1]."""
    overall = Counter(categories)
    total = len(categories)
    distances = []
    for shard in shards:
        local = Counter(categories[i] for i in shard)
        distances.append(0.5 * sum(abs(local[c] / len(shard) - overall[c] / total) for c in overall))
    return sum(distances) / len(distances)
