"""The one list of aggregation modes (shared by `prufed aggregate`, `prufed aggregator serve` and `prufed simulate`),
and the factory of the per-group aggregators.

    heteagg       one global; each key averaged over the updates that hold it (aggregator/core/heteagg.py)
    fedavg        one global; every update must hold the same keys
    fedavg-group  one global per depth group g (its kept-layer list); FedAvg within g (fedavg_group.py)
    mixed         per-group globals; (1 − λ)·own mean + λ·every holder's mean (mixed.py; --mix X in [0, 1] | auto)
    additive      per-group globals; own mean + μ·the other holders' mean (additive.py; --mix X >= 0 | auto)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prufed.common.errors import ConfigError

if TYPE_CHECKING:  # torch stays unimported for callers that only check a mode name (configs, --help)
    import torch

    from aggregator.core.fedavg_group import Group, GroupAggregator, Mix
    from aggregator.core.heteagg import AggregationConfig

SINGLE_MODES: tuple[str, ...] = ("heteagg", "fedavg")
"""Modes that keep one global (aggregator/core/heteagg.py)."""
GROUP_MODES: tuple[str, ...] = ("fedavg-group", "mixed", "additive")
"""Modes that keep one global per depth group."""
MODES: tuple[str, ...] = (*SINGLE_MODES, *GROUP_MODES)
"""Every aggregation mode, in the order `--help` lists them."""
MIX_UPPER: dict[str, float | None] = {"mixed": 1.0, "additive": None}
"""Modes that take `--mix`, with the largest fixed value each accepts (None: no upper bound)."""
MODE_HELP = ("heteagg: one global, each tensor averaged over its holders; fedavg: one global, identical key sets "
             "required; fedavg-group: one global per depth group (kept-layer list), FedAvg within it; mixed: per-group "
             "globals blending the group's own mean with every holder's (--mix); additive: per-group globals, own "
             "mean plus --mix times the other groups' mean")
MIX_HELP = ("mixed: λ in [0, 1] (0 = fedavg-group, 1 = heteagg); additive: μ >= 0 (0 = fedavg-group); 'auto' sets "
            "it per layer from how well the group's update agrees with the others' (default: auto)")


def is_group_mode(mode: str) -> bool:
    return mode in GROUP_MODES


def parse_mix(value: str | float, *, upper: float | None) -> Mix:
    """`--mix X|auto`: "auto", or a finite X >= 0 (and <= upper when given); raises ConfigError naming --mix."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError("--mix", f"must be a number or 'auto', got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (upper is not None and number > upper):
        bound = f"[0, {upper:g}]" if upper is not None else ">= 0"
        raise ConfigError("--mix", f"must be 'auto' or a number in {bound}, got {value!r}")
    return number


def check_mode(mode: str, mix: str | float | None = None) -> Mix | None:
    """Validate `--mode` and `--mix` together; returns the parsed mix (None where the mode takes none).

    Raises ConfigError naming --mode or --mix."""
    if mode not in MODES:
        raise ConfigError("--mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode not in MIX_UPPER:
        if mix is not None:
            raise ConfigError("--mix", f"applies to --mode mixed|additive only, not --mode {mode}")
        return None
    return parse_mix("auto" if mix is None else mix, upper=MIX_UPPER[mode])


def group_aggregator(mode: str, globals_: Mapping[Group, Mapping[str, torch.Tensor]], config: AggregationConfig,
                     initial: Mapping[str, torch.Tensor] | None = None, mix: Mix | None = None) -> GroupAggregator:
    """The streaming aggregator of a per-group mode (see each class); `initial` starts a group without a global."""
    from aggregator.core.additive import AdditiveAggregator
    from aggregator.core.fedavg_group import FedAvgGroupAggregator
    from aggregator.core.mixed import MixedAggregator

    classes: dict[str, type[GroupAggregator]] = {
        "fedavg-group": FedAvgGroupAggregator, "mixed": MixedAggregator, "additive": AdditiveAggregator}
    if mode not in classes:
        raise ConfigError("--mode", f"{mode!r} keeps no per-group globals (per-group modes: {', '.join(GROUP_MODES)})")
    if mode in MIX_UPPER:
        parsed = check_mode(mode, mix)
        assert parsed is not None  # check_mode returns a mix for every mode in MIX_UPPER
        return classes[mode](globals_, config, initial, mix=parsed)  # type: ignore[call-arg]
    return classes[mode](globals_, config, initial)
