"""Poisoning defences for one round (pure): a per-client weight-share cap, adaptive norm clipping around the round's
median, and the check a round's result must pass before it is published.

1. Weight share. Client weights w_k (num_examples, or 1) are capped so that no client carries more than a share c
   of the round's total: w'_k = min(w_k, τ), with τ the largest value for which max_k w'_k ≤ c·Σ_j w'_j
   (water-filling: τ = c·R / (1 − c·m), R the sum of the n − m uncapped weights, m the number capped). A round with
   fewer than ⌈1/c⌉ clients cannot satisfy the cap; its weights become equal (the closest it can get).
2. Adaptive clipping. With ν_k = ‖Δ_k‖₂ and ν̃ the round's lower median of {ν_k}, each update is scaled by
   s_k = min(1, m·ν̃ / ν_k) (m = `adaptive_clip`). The lower median is the middle value for odd n and the smaller
   middle value for even n, so with two clients one outlier cannot raise the bound to its own scale. A zero
   median (most updates empty) disables the clip for that round rather than zeroing every update.
3. Result check. The new global G' must be finite everywhere and ‖G' − G‖₂ ≤ r·max(‖G‖₂, 1) (r =
   `max_step_ratio`), else the round fails and G stays the latest version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def capped_weights(weights: Sequence[float], share: float) -> list[float]:
    """Weights with no single weight above `share` of their sum (formula 1 of the module docstring)."""
    n = len(weights)
    if n == 0 or share >= 1.0:
        return list(weights)
    if n * share < 1.0:
        return [1.0] * n
    order = sorted(range(n), key=lambda i: weights[i], reverse=True)
    rest = float(sum(weights))
    for capped in range(n):
        top = weights[order[capped]]
        tau = share * rest / (1.0 - share * capped) if capped else share * rest
        if top <= tau:
            return [min(float(w), tau) for w in weights] if capped else [float(w) for w in weights]
        rest -= top
    raise AssertionError("unreachable: n·share ≥ 1 always leaves a feasible cap")  # pragma: no cover


def lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def adaptive_clip_scales(norms: Sequence[float], multiplier: float | None) -> list[float]:
    """s_k = min(1, multiplier·lower_median(norms) / ν_k) (formula 2); all ones when off or the median is 0."""
    if multiplier is None or not norms:
        return [1.0] * len(norms)
    bound = multiplier * lower_median(norms)
    if bound <= 0:
        return [1.0] * len(norms)
    return [1.0 if nu <= bound else bound / nu for nu in norms]


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """‖G‖₂ over all tensors, accumulated in float64 (inf if any value is not finite)."""
    total = 0.0
    for value in state.values():
        total += float(torch.linalg.vector_norm(value, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def result_problem(new: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
                   max_step_ratio: float) -> str | None:
    """Why `new` must not be published (formula 3), or None when it passes."""
    for key in sorted(new):
        if not bool(torch.isfinite(new[key]).all()):
            return f"the aggregated global has non-finite values in {key}"
    step = math.sqrt(sum(float(torch.linalg.vector_norm(new[k].to(torch.float64) - previous[k].to(torch.float64)))
                         ** 2 for k in new))
    bound = max_step_ratio * max(state_norm(previous), 1.0)
    if not step <= bound:
        return (f"the aggregated global moved by ‖ΔG‖₂ = {step:.4g}, above the bound {bound:.4g} "
                f"(max_step_ratio {max_step_ratio} × max(‖G‖₂, 1))")
    return None
