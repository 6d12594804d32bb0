"""FedAvg within each depth group (pure), and the per-group machinery that `mixed` and `additive` build on.

A group is the set of clients with the same kept-layer list (`Group`: that tuple of ORIGINAL layer indices); each
group g has its own global adapter global_g (every group's global holds every key). With w_k, s_k as in HeteAgg
(examples or 1; clip scale) and lr the server learning rate, the float64 per-key steps are

    a_g[x] = lr · Σ_{k∈g, x∈k} w_k·s_k·Δ_k[x] / Σ_{k∈g, x∈k} w_k        g's own mean step
    a[x]   = lr · Σ_{k: x∈k}   w_k·s_k·Δ_k[x] / Σ_{k: x∈k}   w_k        every holder's mean step (HeteAgg's)
    b_g[x] = lr · Σ_{k∉g, x∈k} w_k·s_k·Δ_k[x] / Σ_{k∉g, x∈k} w_k        the other holders' mean step

fedavg-group:  global_g'[x] = global_g[x] + a_g[x] where g holds x, else global_g[x] (bit for bit).

Streaming: each group's sums are a `HeteAggregator` in mode "fedavg" (the server's weighting, clipping, key/shape
validation and float64 accumulation; an update whose keys differ from its group's is refused), and the all-holder
sums (needed by mixed/additive only) one more in mode "heteagg", so that a[x] is accumulated in arrival order exactly
as HeteAgg does. Memory: (groups + 1) float64 adapters, for any number of clients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from aggregator.core.heteagg import AggregationConfig, AggregationError, AggregationResult, HeteAggregator, mean_step
from prufed.common.adapter_keys import layer_of
from prufed.common.errors import ConfigError

#: A depth group: the kept-layer list (ORIGINAL indices) its clients declared.
Group = tuple[int, ...]
#: A fixed mixing coefficient, or "auto" (chosen per layer by the mode's rule).
Mix = float | str
Sums = dict[str, tuple[torch.Tensor, float]]


def layer_agreement(own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]
                    ) -> dict[int | None, tuple[float, float, float]]:
    """Per layer (None = keys outside the decoder layers): (cos, ‖own‖₂, ‖other‖₂) of the layer's concatenated
    tensors (lora_A and lora_B of every module), over the keys present in both; cos = 0 where a norm is 0."""
    parts: dict[int | None, list[float]] = {}
    for key, u in own.items():
        v = other.get(key)
        if v is None:
            continue
        acc = parts.setdefault(layer_of(key), [0.0, 0.0, 0.0])
        acc[0] += float((u * v).sum())
        acc[1] += float((u * u).sum())
        acc[2] += float((v * v).sum())
    out = {}
    for layer, (dot, uu, vv) in parts.items():
        nu, nv = math.sqrt(uu), math.sqrt(vv)
        out[layer] = (dot / (nu * nv) if nu > 0 and nv > 0 else 0.0, nu, nv)
    return out


class GroupAggregator:
    """Streaming per-group aggregation: `add(group, update, n)` for each client, then `finish()` once.

    `globals_` maps each known group to its current global; a group not in it starts from `initial`. This base
    class is fedavg-group; `mixed` and `additive` override `_combine`.
    """

    mode = "fedavg-group"
    needs_total = False

    def __init__(self, globals_: Mapping[Group, Mapping[str, torch.Tensor]], config: AggregationConfig | None = None,
                 initial: Mapping[str, torch.Tensor] | None = None):
        config = config or AggregationConfig()
        if config.space != "factors":
            raise ConfigError("--space", f"--mode {self.mode} averages factors only, got --space {config.space}")
        if config.trim_fraction > 0:
            raise ConfigError("--trim-fraction", f"is not supported with --mode {self.mode}")
        self.config = config
        self._globals = {tuple(g): dict(state) for g, state in globals_.items()}
        self._initial = dict(initial) if initial is not None else None
        reference = self._initial if self._initial is not None else next(iter(self._globals.values()), None)
        if reference is None:
            raise AggregationError("no global adapter given (neither a per-group global nor an initial one)")
        shapes = {k: v.shape for k, v in reference.items()}
        for group, state in self._globals.items():
            if {k: v.shape for k, v in state.items()} != shapes:
                raise AggregationError(f"the global of group {list(group)} has other keys or shapes than the rest")
        self._reference = reference
        # Inner aggregators: no product-error report (dense products would cost time and memory per group).
        self._inner = dataclasses.replace(config, mode="fedavg", product_report_mib=0.0)
        self._groups: dict[Group, HeteAggregator] = {}
        self._counts: dict[Group, list[int]] = {}
        self._total = (HeteAggregator(reference, dataclasses.replace(config, mode="heteagg", product_report_mib=0.0))
                       if self.needs_total else None)
        self._finished = False

    def global_of(self, group: Group) -> dict[str, torch.Tensor]:
        state = self._globals.get(group, self._initial)
        if state is None:
            raise AggregationError(f"no global for group {list(group)} and no initial global to start it from")
        return dict(state)

    def add(self, group: Group, update: Mapping[str, torch.Tensor], num_examples: int, name: str = "",
            weight: float | None = None) -> None:
        """Fold one client's update Δ_k into its group's sums (and the all-holder sums); all-or-nothing.

        `weight` overrides w_k as in `HeteAggregator.add` (the server's per-client share cap)."""
        if self._finished:
            raise AggregationError("finish() was already called; start a new aggregator")
        group = tuple(group)
        aggregator = self._groups.get(group)
        if aggregator is None:
            aggregator = HeteAggregator(self.global_of(group), self._inner)
        # The group check runs first: a refused update leaves every sum unchanged.
        aggregator.add(update, num_examples, name, weight)
        if self._total is not None:
            try:
                self._total.add(update, num_examples, name, weight)
            except AggregationError as exc:  # cannot happen after the group's own identical checks
                raise AggregationError(f"inconsistent update {name}: {exc}") from exc
        self._groups[group] = aggregator
        count = self._counts.setdefault(group, [0, 0])
        count[0] += 1
        count[1] += num_examples

    def finish(self) -> dict[Group, AggregationResult]:
        """One result per group (every group given in `globals_` plus every group that sent an update)."""
        if self._finished:
            raise AggregationError("finish() was already called")
        self._finished = True
        lr = float(self.config.server_lr)
        total = self._total.take_sums() if self._total is not None else {}
        own = {group: aggregator.take_sums() for group, aggregator in self._groups.items()}
        # b_g needs the raw sums, so it comes first; mean_step then turns each sum into its step in place.
        others = {group: self._others(sums, total) for group, sums in own.items()} if total else {}
        own_steps = {group: {key: mean_step(acc, weight, lr) for key, (acc, weight) in sums.items()}
                     for group, sums in own.items()}
        all_steps = {key: mean_step(acc, weight, lr) for key, (acc, weight) in total.items()}
        results = {}
        for group in dict.fromkeys([*self._globals, *own]):
            steps = own_steps.get(group, {})
            clients, examples = self._counts.get(group, [0, 0])
            holders = dict.fromkeys(steps, clients)
            state, report = self._combine(self.global_of(group), steps, others.get(group, {}), all_steps)
            report = {"mode": self.mode, "group": list(group), "clients": clients, "examples": examples,
                      "server_lr": lr, "weighting": self.config.weighting, "accumulation": "float64",
                      "keys_total": len(state), "keys_held": len(steps), **report}
            results[group] = AggregationResult(state, holders, report)
        return results

    def _others(self, own: Sums, total: Sums) -> dict[str, torch.Tensor]:
        """b_g: lr · (S − S_g) / (W − W_g) on the keys g holds that someone outside g holds too (float64)."""
        lr = float(self.config.server_lr)
        out = {}
        for key, (acc, weight) in own.items():
            all_acc, all_weight = total[key]
            if all_weight > weight:
                out[key] = (all_acc - acc).mul_(lr / (all_weight - weight))
        return out

    def _combine(self, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                 others: Mapping[str, torch.Tensor], every: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The group's new global from its float64 steps a_g (`own`), b_g (`others`) and a (`every`), plus report
        fields. fedavg-group: global_g + a_g on g's keys, every other key copied bit for bit."""
        out = {}
        for key, reference in state.items():
            step = own.get(key)
            out[key] = reference.clone() if step is None else (step + reference.to(torch.float64)).to(reference.dtype)
        return out, {}


class FedAvgGroupAggregator(GroupAggregator):
    """FedAvg within each depth group: global_g' = global_g + a_g on the keys g holds (see the module docstring)."""
