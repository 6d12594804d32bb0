"""Robust aggregation pieces (pure): per-update norm clipping and the coordinate-wise trimmed mean."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """‖Δ‖₂ over all tensors of one update: sqrt(Σ_x Σ_i Δ[x]_i²), accumulated in float64."""
    total = 0.0
    for value in update.values():
        total += float(torch.linalg.vector_norm(value, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_scale(norm: float, clip_norm: float | None) -> float:
    """Factor that scales an update of L2 norm `norm` to at most `clip_norm`: min(1, clip_norm / norm)."""
    if clip_norm is None or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def trim_count(holders: int, fraction: float) -> int:
    """Values dropped at EACH end of a coordinate with `holders` values: floor(fraction·m), leaving at least one."""
    return min(math.floor(fraction * holders), (holders - 1) // 2)


def trimmed_mean(values: torch.Tensor, weights: torch.Tensor, fraction: float) -> torch.Tensor:
    """Coordinate-wise weighted trimmed mean over dim 0.

    values: [m, ...] (one row per holder), weights: [m] > 0. Per coordinate, the t = trim_count(m, fraction)
    smallest and t largest values are dropped and the rest averaged with their weights: Σ w v / Σ w (float64).
    """
    m = values.shape[0]
    t = trim_count(m, fraction)
    flat = values.reshape(m, -1).to(torch.float64)
    if t == 0:
        w = weights.to(torch.float64)
        return ((w[:, None] * flat).sum(0) / w.sum()).reshape(values.shape[1:])
    ordered, order = torch.sort(flat, dim=0)
    kept_values = ordered[t:m - t]
    kept_weights = weights.to(torch.float64)[order[t:m - t]]
    mean = (kept_values * kept_weights).sum(0) / kept_weights.sum(0)
    return mean.reshape(values.shape[1:])
