"""`additive` (pure): each depth group keeps its own full mean step and adds the other holders' mean, scaled.

With a_g, a and b_g the float64 steps of aggregator/core/fedavg_group.py (g's own mean, every holder's mean, the
other holders' mean; server lr included), per key x:

    global_g'[x] = global_g[x] + a_g[x] + μ·b_g[x]     where g holds x (no b_g term where only g holds it)
    global_g'[x] = global_g[x] + μ_u·a[x]             where g does not hold x (μ_u = μ; 1 under auto)
    global_g'[x] = global_g[x]                        where nobody does

μ = `--mix X` with X >= 0 for every layer, or `--mix auto`, per layer l:

    μ_l = max(0, cos(a_g|_l, b_g|_l)) · ‖a_g|_l‖ / ‖b_g|_l‖

over the layer's concatenated tensors. The added term μ_l·b_g then has the length of g's own step projected on the
others' direction: others contribute only along directions g's own data also moves, never more than g moved itself,
and nothing when the updates are orthogonal or opposed (μ_l = 0 where ‖b_g‖ = 0).

μ = 0 is exactly fedavg-group. With s = W_g/W, g's share of the weight on x, μ = (1 − s)/s gives
a_g + (1−s)/s·b_g = (s·a_g + (1−s)·b_g)/s = a/s: HeteAgg's update divided by g's share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from aggregator.core.fedavg_group import Group, GroupAggregator, Mix, layer_agreement
from aggregator.core.heteagg import AggregationConfig
from prufed.common.adapter_keys import layer_of
from prufed.common.errors import ConfigError


class AdditiveAggregator(GroupAggregator):
    """Per-group globals: own full step plus μ × the other holders' mean step; see the module docstring."""

    mode = "additive"
    needs_total = True

    def __init__(self, globals_: Mapping[Group, Mapping[str, torch.Tensor]], config: AggregationConfig | None = None,
                 initial: Mapping[str, torch.Tensor] | None = None, mix: Mix = "auto"):
        if mix != "auto" and not (isinstance(mix, (int, float)) and math.isfinite(mix) and mix >= 0.0):
            raise ConfigError("--mix", f"--mode additive needs 'auto' or a finite number >= 0, got {mix!r}")
        super().__init__(globals_, config, initial)
        self.mix = mix

    def _combine(self, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                 others: Mapping[str, torch.Tensor], every: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.mix == "auto":
            mus = {layer: max(0.0, cos) * nu / nv if nv > 0 else 0.0
                   for layer, (cos, nu, nv) in layer_agreement(own, others).items()}
            unheld = 1.0
        else:
            mus = {layer_of(key): float(self.mix) for key in own}
            unheld = float(self.mix)
        out = {}
        for key, reference in state.items():
            ref64 = reference.to(torch.float64)
            if key in own:
                ref64.add_(own[key])
                if key in others:
                    ref64.add_(others[key], alpha=mus.get(layer_of(key), 0.0))
                out[key] = ref64.to(reference.dtype)
            elif key in every:
                out[key] = ref64.add_(every[key], alpha=unheld).to(reference.dtype)
            else:
                out[key] = reference.clone()
        return out, {"mix": "auto" if self.mix == "auto" else float(self.mix), "unheld_mu": unheld,
                     "mu": {str(layer): mu for layer, mu in sorted(mus.items(), key=lambda i: -1 if i[0] is None else i[0])}}
