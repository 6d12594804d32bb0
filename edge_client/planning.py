"""The one planning module: which device, which weight precision (`--quant auto`) and how deep (`--depth auto`).

`prufed plan`, `prufed train --depth auto`, `prufed edge run` (and through it `prufed simulate --profiles`) all
call `plan_training`, so one device and one training setup always get one answer. The maths (bytes per
component, deepest fitting depth) is `edge_client.core.memory`; this module only decides its inputs:

  device   `device_spec(profile, budget_gib)`: a hardware profile (emulated), else this machine's probe; an explicit
           budget replaces the memory figure (budget = budget_gib, fraction 1) and keeps the accelerator.
  quant    explicit: as given. `auto`:
             an emulated profile          -> the profile's `default_quant` (device data, see hardware_profiles/)
             this machine, CUDA           -> nf4 when bitsandbytes works, else bf16 (memory is the constraint)
             this machine, CPU            -> the FASTEST precision that fits (see CPU_SPEED_ORDER): among the
                                             candidates, the deepest planned depth wins, ties go to the faster one
  depth    `auto`: the deepest depth whose predicted peak fits the budget at that precision; a fixed depth is
           only checked against the model's layer count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from edge_client.core.hardware import GIB, HardwareSpec, spec_from_profile
from edge_client.core.memory import (
    QUANT_CHOICES,
    QUANT_MODES,
    BudgetTooSmall,
    DepthPlan,
    MemoryBreakdown,
    TrainingSetup,
    estimate_memory,
    plan_depth,
)
from prufed.common.errors import ConfigError

__all__ = ["QUANT_CHOICES", "QUANT_MODES", "CPU_SPEED_ORDER", "TrainingPlan", "auto_quant_candidates",
           "device_spec", "plan_training", "quant_description"]

#: CPU precisions, fastest first, measured on this repository's CPU (AMX; torch 2.13.0, bitsandbytes 0.50.2):
#: SmolLM2-135M LoRA step with gradient checkpointing, depth 10, seq 128, batch 2, 1 thread, median of 3 steps:
#: bf16 0.62 s, fp32 1.17 s, nf4 1.69 s, int8 2.48 s (bitsandbytes' CPU kernels dequantize every weight on every
#: call). docs/architecture.md has the same order at seq 160, batch 4, 2 threads (bf16 1.45 s vs fp32 2.24 s).
#: bf16 is a candidate only where the CPU multiplies bf16 natively (HardwareSpec.cpu_bf16): elsewhere torch
#: emulates it through fp32 with extra conversions.
CPU_SPEED_ORDER = ("bf16", "fp32", "nf4", "int8")

QUANT_DETAIL = {"nf4": "bitsandbytes 4-bit NF4, double quantization", "int8": "bitsandbytes LLM.int8",
                "bf16": "bfloat16 base weights, fp32 LoRA and optimizer state", "fp32": "float32 weights"}


def quant_description(quant: str) -> str:
    """One line saying what a precision means for the weights, the adapter and the optimizer."""
    return QUANT_DETAIL[quant]


def device_spec(profile: str | None = None, budget_gib: float | None = None) -> HardwareSpec:
    """The device as the planner sees it: `profile` emulated, else this machine probed; `budget_gib` replaces the
    memory budget (fraction 1) and keeps everything else, so `--profile P --budget-gib B` is P with B GiB."""
    if profile is not None:
        from edge_client.hardware_profiles import get_profile

        spec = spec_from_profile(get_profile(profile))
    else:
        from edge_client.profiling import profile_device

        spec = profile_device()
    if budget_gib is not None:
        spec = replace(spec, available_memory_bytes=int(budget_gib * GIB), budget_fraction=1.0,
                       source=f"{spec.source}+budget:{budget_gib}GiB")
    return spec


def budget_label(profile: str | None, budget_gib: float | None) -> str:
    """Where the budget came from, in flag terms (recorded as `budget_source`)."""
    if budget_gib is not None:
        return f"--budget-gib {budget_gib}" + (f" on --profile {profile}" if profile is not None else "")
    return f"--profile {profile}" if profile is not None else "this device"


def _emulated(spec: HardwareSpec) -> bool:
    return spec.source.startswith("profile:")


def auto_quant_candidates(spec: HardwareSpec) -> tuple[str, ...]:
    """The precisions `--quant auto` chooses among on `spec`, fastest first (a single one where no choice is made)."""
    if _emulated(spec):
        return (spec.default_quant,)
    if spec.accelerator == "cuda":
        return ("nf4",) if spec.bnb_4bit else ("bf16",)
    allowed = {"fp32"} | ({"bf16"} if spec.cpu_bf16 else set()) | ({"nf4", "int8"} if spec.bnb_4bit else set())
    return tuple(q for q in CPU_SPEED_ORDER if q in allowed)


@dataclass(frozen=True)
class TrainingPlan:
    """What the planner chose: precision, depth and, when the budget decided either, the predicted peak."""

    quant: str
    depth: int
    num_layers: int
    breakdown: MemoryBreakdown  #: predicted peak at `depth` with `quant`
    budget_bytes: int
    depth_plan: DepthPlan | None  #: the budget search (None for a fixed depth)
    quant_source: str  #: "flag" | "profile default" | "fastest that fits on this cpu" | "this gpu's default"
    budget_source: str

    @property
    def fits(self) -> bool:
        return self.breakdown.total_bytes <= self.budget_bytes

    def choice(self, depth_mode: str) -> dict[str, Any]:
        """The `depth_choice` record of metrics.json / state.json (fields only ever added)."""
        record: dict[str, Any] = {"mode": depth_mode, "quant": self.quant, "quant_source": self.quant_source}
        if depth_mode == "auto":
            record.update(budget_bytes=self.budget_bytes, budget_source=self.budget_source,
                          predicted_bytes=self.breakdown.total_bytes)
        return record


def _quant_source(spec: HardwareSpec, requested: str) -> str:
    if requested != "auto":
        return "flag"
    if _emulated(spec):
        return "profile default"
    return "this gpu's default" if spec.accelerator == "cuda" else "fastest that fits on this cpu"


def plan_training(model_config: Mapping[str, Any], spec: HardwareSpec, setup: TrainingSetup, *,
                  quant: str = "auto", depth: int | str = "auto", budget_source: str = "") -> TrainingPlan:
    """Precision and depth for training `model_config` on `spec` (the module docstring has the rules).

    setup: everything but the device and the precision (its accelerator, unified_memory and quant are replaced by
    the device's and the chosen one). depth: "auto" or a layer count. Raises `BudgetTooSmall` when depth is auto and
    not even one layer fits at any candidate precision.
    """
    if quant not in QUANT_CHOICES:
        raise ConfigError("--quant", f"must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    num_layers = int(model_config["num_hidden_layers"])
    if depth != "auto" and not (isinstance(depth, int) and 1 <= depth <= num_layers):
        raise ConfigError("--depth", f"must be between 1 and {num_layers} (the model's layer count), got {depth}")
    budget = spec.budget_bytes
    base = replace(setup, accelerator=spec.accelerator, unified_memory=spec.unified_memory)
    candidates = auto_quant_candidates(spec) if quant == "auto" else (quant,)
    source = budget_source or spec.source
    best: TrainingPlan | None = None
    smallest_miss: BudgetTooSmall | None = None
    for candidate in candidates:  # fastest first: a later one must be strictly deeper (or the first to fit)
        candidate_setup = replace(base, quant=candidate)
        if depth == "auto":
            try:
                search = plan_depth(model_config, budget, candidate_setup)
            except BudgetTooSmall as exc:
                if smallest_miss is None or exc.needed_bytes < smallest_miss.needed_bytes:
                    smallest_miss = exc
                continue
            plan = TrainingPlan(candidate, search.depth, num_layers, search.breakdown, budget, search,
                                _quant_source(spec, quant), source)
            if best is None or plan.depth > best.depth:
                best = plan
        else:
            assert isinstance(depth, int)
            breakdown = estimate_memory(model_config, depth, candidate_setup)
            plan = TrainingPlan(candidate, depth, num_layers, breakdown, budget, None, _quant_source(spec, quant),
                                source)
            # the fastest precision that fits; when none fits, the one needing the least memory
            if best is None or (plan.fits and not best.fits) or (
                    not plan.fits and not best.fits and breakdown.total_bytes < best.breakdown.total_bytes):
                best = plan
            if best.fits:
                break
    if best is None:
        assert smallest_miss is not None
        raise smallest_miss
    return best
