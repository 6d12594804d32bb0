"""`mixed` (pure): each depth group's global moves by a blend of its own mean step and every holder's.

With a_g, a and b_g the float64 steps of aggregator/core/fedavg_group.py (g's own mean, every holder's mean = HeteAgg,
the other holders' mean; server lr included), per key x:

    global_g'[x] = global_g[x] + (1 − λ)·a_g[x] + λ·a[x]      where g holds x
    global_g'[x] = global_g[x] + a[x]                        where g does not, but someone does
    global_g'[x] = global_g[x]                               where nobody does

λ = `--mix X` with X in [0, 1] for every layer, or `--mix auto`, per layer l:

    λ_l = max(0, cos(a_g|_l, b_g|_l))

the cosine between g's own mean step and the other holders' mean step over the layer's concatenated tensors
(lora_A and lora_B of q/v), and λ_l = 0 where no other group holds the layer. Where the groups agree the shared
mean (more examples, less noise) is used; where their updates are orthogonal or opposed (measured: cos −0.06 to 0.07
across depths) g keeps its own step undiluted.

λ = 0 is exactly fedavg-group on held keys; λ = 1 is exactly HeteAgg (bit for bit: the same float64 sums in the same
arrival order). Streaming as fedavg-group, plus one all-holder accumulator and b_g per group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from aggregator.core.fedavg_group import Group, GroupAggregator, Mix, layer_agreement
from aggregator.core.heteagg import AggregationConfig
from prufed.common.adapter_keys import layer_of
from prufed.common.errors import ConfigError


class MixedAggregator(GroupAggregator):
    """Per-group globals blended between fedavg-group (λ = 0) and HeteAgg (λ = 1); see the module docstring."""

    mode = "mixed"
    needs_total = True

    def __init__(self, globals_: Mapping[Group, Mapping[str, torch.Tensor]], config: AggregationConfig | None = None,
                 initial: Mapping[str, torch.Tensor] | None = None, mix: Mix = "auto"):
        if mix != "auto" and not (isinstance(mix, (int, float)) and 0.0 <= mix <= 1.0):
            raise ConfigError("--mix", f"--mode mixed needs 'auto' or a number in [0, 1], got {mix!r}")
        super().__init__(globals_, config, initial)
        self.mix = mix

    def _combine(self, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                 others: Mapping[str, torch.Tensor], every: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.mix == "auto":
            agreement = layer_agreement(own, others)
            lambdas = {layer: max(0.0, cos) for layer, (cos, _, _) in agreement.items()}
        else:
            lambdas = {layer_of(key): float(self.mix) for key in own}
        out = {}
        for key, reference in state.items():
            ref64 = reference.to(torch.float64)
            if key in own:
                lam = lambdas.get(layer_of(key), 0.0)
                # (g + (1−λ)·a_g) + λ·a: at λ ∈ {0, 1} one term is an exact zero, hence the bit-exact limits.
                out[key] = ref64.add_(own[key], alpha=1.0 - lam).add_(every[key], alpha=lam).to(reference.dtype)
            elif key in every:
                out[key] = ref64.add_(every[key]).to(reference.dtype)
            else:
                out[key] = reference.clone()
        return out, {"mix": "auto" if self.mix == "auto" else float(self.mix),
                     "lambda": {str(layer): lam for layer, lam in sorted(lambdas.items(), key=_layer_order)}}


def _layer_order(item: tuple[int | None, float]) -> int:
    return -1 if item[0] is None else item[0]
