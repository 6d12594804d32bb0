"""HeteAgg (pure): layer-aligned weighted averaging of LoRA deltas from clients of different depths.

For every ORIGINAL-keyed adapter tensor x, with S_x the updates that hold x and w_k = n_k (examples) or 1 (uniform):

    global'[x] = global[x] + server_lr · Σ_{k∈S_x} w_k·s_k·Δ_k[x] / Σ_{k∈S_x} w_k

where s_k = min(1, clip_norm / ‖Δ_k‖₂) (1 without clipping). Keys no update holds stay bit-identical.
mode="fedavg" is the same formula but demands that every update holds the identical key set.

Streaming: `add` folds one update into per-key running sums, so peak memory is the global adapter, the
accumulators and the update being added, for any number of clients.

Precision (chosen from measurement, scripts/bench_aggregation.py and docs/architecture.md): accumulators are float64.
An update's float32 values are staged chunk-wise through a 256 KiB float64 buffer and added (`copy_` + `add_`);
on 200 MB tensors a direct mixed-dtype `acc64.add_(x32)` is 3-4x slower, and float32 Kahan summation needs 7
passes (measured 1.5-3x slower than this). w_k·Δ_k is exact in float64 (24-bit mantissa × integer < 2^29) and the
sum's rounding error is at most (N−1)·2^-53·Σ|w·Δ| (≈1e-13 relative for N = 1000), far below float32's half-ulp
2^-24: the float32 result is the correctly rounded exact formula except in rare near-ties (1 ulp), for any arrival
order (plain float32 summation of 1000 updates was off by up to 5312 ulps in tests/test_heteagg.py). The cost:
2 float32-adapters of accumulator memory, and 20 B of memory traffic per element vs memcpy's 8-12 B, so it runs
at 0.25-0.6x memcpy bandwidth (LLaMA-7B q,v shapes, 2 loaded cores).

space="product" averages each module's exact product B_k'·A_k' of the clients' LOCAL factors (global + s_k·Δ_k)
in a dense float64 [out, in] accumulator per module (memory Σ out·in·8 bytes: fine for small models, 8.6 GB for
LLaMA-7B q,v), applies the server lr to the product, and re-factors to the global rank with a truncated SVD.
trim_fraction > 0 (coordinate-wise trimmed mean) is NOT streaming: it keeps every update until `finish`, bounded
by `buffer_limit_mib`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from aggregator.core.modes import SINGLE_MODES as MODES
from aggregator.core.product import lora_modules, refactor, relative_error
from aggregator.core.robust import clip_scale, trimmed_mean, update_norm
from prufed.common.adapter_keys import layer_of
from prufed.common.errors import ConfigError, PrufedError

WEIGHTINGS = ("examples", "uniform")
SPACES = ("factors", "product")
#: float64 elements staged per chunk: 32768 × 8 B = 256 KiB, small enough to stay in L2.
CHUNK = 32768


class AggregationError(PrufedError):
    """An update the aggregator cannot fold in (fedavg key mismatch, unknown key, shape, buffer limit)."""


@dataclass(frozen=True)
class AggregationConfig:
    """HeteAgg options; each field maps to the `prufed aggregate` flag named in its error messages."""

    weighting: str = "examples"  #: w_k = num_examples ("examples") or 1 ("uniform")
    mode: str = "heteagg"  #: "heteagg" (per-key holder sets) or "fedavg" (identical key sets required)
    space: str = "factors"  #: average lora_A/lora_B separately ("factors") or their products ("product")
    server_lr: float = 1.0  #: global' = global + server_lr · mean delta
    clip_norm: float | None = None  #: scale each update to L2 norm ≤ clip_norm (over all its tensors)
    trim_fraction: float = 0.0  #: drop this fraction of values at each end per coordinate (not streaming)
    buffer_limit_mib: float = 4096.0  #: max MiB of updates buffered when trim_fraction > 0
    product_report_mib: float = 256.0  #: factors mode measures its error vs the exact product if it fits

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError("--weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.mode not in MODES:
            raise ConfigError("--mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.space not in SPACES:
            raise ConfigError("--space", f"must be one of {', '.join(SPACES)}, got {self.space!r}")
        if not (isinstance(self.server_lr, (int, float)) and math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError("--server-lr", f"must be a finite number > 0, got {self.server_lr!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError("--clip-norm", f"must be a finite number > 0, got {self.clip_norm!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError("--trim-fraction", f"must lie in [0, 0.5), got {self.trim_fraction!r}")
        if self.trim_fraction > 0 and self.space == "product":
            raise ConfigError("--trim-fraction", "a trimmed mean is only supported with --space factors")
        if not self.buffer_limit_mib > 0:
            raise ConfigError("buffer_limit_mib", f"must be > 0, got {self.buffer_limit_mib!r}")
        if not self.product_report_mib >= 0:
            raise ConfigError("product_report_mib", f"must be >= 0, got {self.product_report_mib!r}")


@dataclass
class AggregationResult:
    """The new global adapter, the number of updates that held each key (held keys only), and a JSON-able report."""

    state: dict[str, torch.Tensor]
    holders: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)


def _accumulate(acc: torch.Tensor, value: torch.Tensor, alpha: float, stage: torch.Tensor) -> None:
    """acc += alpha · value, with float32 `value` staged chunk-wise into the float64 buffer `stage`."""
    flat_acc, flat = acc.view(-1), value.reshape(-1)
    if flat.dtype == flat_acc.dtype:
        flat_acc.add_(flat, alpha=alpha)
        return
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start:start + CHUNK]
        staged = stage[:chunk.numel()]
        staged.copy_(chunk)
        flat_acc[start:start + chunk.numel()].add_(staged, alpha=alpha)


def mean_step(acc: torch.Tensor, weight: float, server_lr: float) -> torch.Tensor:
    """server_lr · Σ_k w_k·s_k·Δ_k / Σ_k w_k, in place on the float64 sum `acc` (the one place this is computed)."""
    return acc.mul_(server_lr / weight)


def _difference(expected: set[str], actual: set[str]) -> str:
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    return f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, extra {extra[:4]}{' ...' if len(extra) > 4 else ''}"


class HeteAggregator:
    """Streaming HeteAgg over one global adapter: `add` each update, then `finish` once."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], config: AggregationConfig | None = None):
        self.config = config or AggregationConfig()
        self._global = dict(global_state)
        self._sums: dict[str, torch.Tensor] = {}  # key -> float64 Σ w·s·Δ  (factors space)
        self._products: dict[str, torch.Tensor] = {}  # module -> float64 Σ w·B'A'  (product space / report)
        self._weights: dict[str, float] = {}  # key -> Σ w over holders (exact: integers < 2^53)
        self._holders: dict[str, int] = {}
        self._buffer: list[tuple[Mapping[str, torch.Tensor], float, float]] = []  # trimmed mean only
        self._buffered_bytes = 0
        self._names: list[str] = []
        self._examples = 0
        self._scales: dict[str, float] = {}
        self._fedavg_keys: frozenset[str] | None = None
        self._finished = False
        self._stage: torch.Tensor | None = None
        self._modules: dict[str, tuple[str, str]] = {}
        self._product_note = ""
        if self.config.space == "product":
            self._modules = lora_modules(self._global)
        elif self.config.trim_fraction == 0:
            self._modules, self._product_note = self._report_modules()

    def _report_modules(self) -> tuple[dict[str, tuple[str, str]], str]:
        """Modules whose exact product average is tracked for the factors-mode error report, if it fits."""
        try:
            modules = lora_modules(self._global)
        except PrufedError as exc:
            return {}, f"skipped: {exc}"
        need = sum(self._global[b].shape[0] * self._global[a].shape[1] * 8 for a, b in modules.values())
        if need > self.config.product_report_mib * 2**20:
            return {}, f"skipped: dense products need {need / 2**20:.0f} MiB > product_report_mib"
        return modules, ""

    # ---- folding in -------------------------------------------------------------------------------------------
    def add(self, update: Mapping[str, torch.Tensor], num_examples: int, name: str = "",
            weight: float | None = None) -> None:
        """Fold one update Δ_k (ORIGINAL keys ⊆ the global's) with its example count into the running sums.

        `weight` overrides w_k (e.g. after the server's per-client share cap); default: from `weighting`.

        All checks run before anything is folded in, so a refused update leaves the aggregator unchanged.
        In trim mode the update's tensors are kept by reference until `finish`; do not modify them.
        """
        if self._finished:
            raise AggregationError("finish() was already called; start a new HeteAggregator")
        self._check(update, num_examples)
        name = name or f"update{len(self._names)}"
        if weight is None:
            weight = float(num_examples) if self.config.weighting == "examples" else 1.0
        elif not weight > 0:
            raise AggregationError(f"weight must be > 0, got {weight!r}")
        scale = 1.0
        if self.config.clip_norm is not None:
            scale = clip_scale(update_norm(update), self.config.clip_norm)
            self._scales[name] = scale
        if self.config.mode == "fedavg" and self._fedavg_keys is None:
            self._fedavg_keys = frozenset(update)
        if self.config.trim_fraction > 0:
            self._buffer.append((update, weight, scale))
            self._buffered_bytes += sum(v.numel() * v.element_size() for v in update.values())
        elif self.config.space == "factors":
            self._fold_factors(update, weight * scale)
        if self._modules:
            self._fold_products(update, weight, scale)
        for key in update:
            self._weights[key] = self._weights.get(key, 0.0) + weight
            self._holders[key] = self._holders.get(key, 0) + 1
        self._names.append(name)
        self._examples += num_examples

    def _check(self, update: Mapping[str, torch.Tensor], num_examples: int) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise AggregationError(f"num_examples must be an int > 0, got {num_examples!r}")
        if not update:
            raise AggregationError("the update holds no tensors")
        for key, value in update.items():
            reference = self._global.get(key)
            if reference is None:
                raise AggregationError(f"{key} is not a tensor of the global adapter")
            if value.shape != reference.shape:
                raise AggregationError(f"{key} has shape {list(value.shape)}, global has {list(reference.shape)}")
        if self.config.mode == "fedavg" and self._fedavg_keys is not None and set(update) != self._fedavg_keys:
            raise AggregationError("--mode fedavg needs every update to hold the same keys; this one differs from "
                                   f"the first: {_difference(set(self._fedavg_keys), set(update))}")
        if self.config.space == "product":
            for a_key, b_key in self._modules.values():
                if (a_key in update) != (b_key in update):
                    raise AggregationError(f"--space product needs both {a_key} and {b_key} in an update")
        if self.config.trim_fraction > 0:
            size = sum(v.numel() * v.element_size() for v in update.values())
            if self._buffered_bytes + size > self.config.buffer_limit_mib * 2**20:
                raise AggregationError(f"--trim-fraction keeps every update in memory; {len(self._buffer) + 1} "
                                       f"updates exceed buffer_limit_mib={self.config.buffer_limit_mib:g}")

    def _fold_factors(self, update: Mapping[str, torch.Tensor], alpha: float) -> None:
        for key, value in update.items():
            acc = self._sums.get(key)
            if acc is None:
                acc = self._sums[key] = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
            if self._stage is None or self._stage.device != value.device:
                self._stage = torch.empty(CHUNK, dtype=torch.float64, device=value.device)
            _accumulate(acc, value, alpha, self._stage)

    def _fold_products(self, update: Mapping[str, torch.Tensor], weight: float, scale: float) -> None:
        """acc_m += w · (B_g + s·ΔB)(A_g + s·ΔA): the product of the client's LOCAL factors."""
        for module, (a_key, b_key) in self._modules.items():
            if a_key not in update:
                continue
            a = self._global[a_key].to(torch.float64).add_(update[a_key].to(torch.float64), alpha=scale)
            b = self._global[b_key].to(torch.float64).add_(update[b_key].to(torch.float64), alpha=scale)
            acc = self._products.get(module)
            if acc is None:
                acc = self._products[module] = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64, device=a.device)
            acc.addmm_(b, a, alpha=weight)

    # ---- the result -------------------------------------------------------------------------------------------
    def finish(self) -> AggregationResult:
        """global' for every key (untouched keys copied bit for bit), holder counts and the report."""
        if self._finished:
            raise AggregationError("finish() was already called")
        self._finished = True
        report = self._base_report()
        if self.config.space == "product":
            state, errors = self._finish_product()
            report["product_error"] = errors
            report["product_error_max"] = max(errors.values(), default=0.0)
        else:
            state = self._finish_trimmed() if self.config.trim_fraction > 0 else self._finish_factors()
            if self._modules:
                errors = self._factors_errors(state)
                report["factors_error"] = errors
                report["factors_error_max"] = max(errors.values(), default=0.0)
            else:
                report["factors_error"] = self._product_note or "skipped: not measured with a trimmed mean"
        self._products.clear()
        return AggregationResult({key: state[key] for key in self._global}, dict(self._holders), report)

    def take_sums(self) -> dict[str, tuple[torch.Tensor, float]]:
        """Finish by handing over, per held key, (float64 Σ_k w_k·s_k·Δ_k, Σ_k w_k): the building block of the
        per-group modes (fedavg_group.py, mixed.py, additive.py). Factors space without trimming only."""
        if self._finished:
            raise AggregationError("finish() was already called")
        if self.config.space != "factors" or self.config.trim_fraction > 0:
            raise AggregationError("take_sums needs --space factors and no --trim-fraction")
        self._finished = True
        self._products.clear()
        sums, self._sums = self._sums, {}
        return {key: (acc, self._weights[key]) for key, acc in sums.items()}

    def _finish_factors(self) -> dict[str, torch.Tensor]:
        lr = float(self.config.server_lr)
        state = {}
        for key, reference in self._global.items():
            acc = self._sums.pop(key, None)
            if acc is None:
                state[key] = reference.clone()
                continue
            state[key] = mean_step(acc, self._weights[key], lr).add_(reference.to(torch.float64)).to(reference.dtype)
        return state

    def _finish_trimmed(self) -> dict[str, torch.Tensor]:
        lr = float(self.config.server_lr)
        state = {}
        for key, reference in self._global.items():
            held = [(update[key], weight, scale) for update, weight, scale in self._buffer if key in update]
            if not held:
                state[key] = reference.clone()
                continue
            values = torch.stack([value.to(torch.float64) * scale for value, _, scale in held])
            weights = torch.tensor([weight for _, weight, _ in held], dtype=torch.float64)
            mean = trimmed_mean(values, weights, self.config.trim_fraction)
            state[key] = (reference.to(torch.float64) + lr * mean).to(reference.dtype)
        self._buffer.clear()
        return state

    def _target(self, module: str, a_key: str, b_key: str) -> torch.Tensor:
        """The exact aggregated product: P_g + lr·(Σ w B'A' / Σ w − P_g), P_g = B_g·A_g."""
        base = self._global[b_key].to(torch.float64) @ self._global[a_key].to(torch.float64)
        mean = self._products[module] / self._weights[a_key]
        return base.add_(mean - base, alpha=float(self.config.server_lr))

    def _finish_product(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        state, errors = {}, {}
        for module, (a_key, b_key) in self._modules.items():
            a_ref, b_ref = self._global[a_key], self._global[b_key]
            if module not in self._products:
                state[a_key], state[b_key] = a_ref.clone(), b_ref.clone()
                continue
            b, a, errors[module] = refactor(self._target(module, a_key, b_key), rank=a_ref.shape[0])
            state[a_key], state[b_key] = a.to(a_ref.dtype), b.to(b_ref.dtype)
        return state, errors

    def _factors_errors(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per module: ‖exact product average − B̄·Ā‖_F / ‖exact‖_F for the factor-averaged result."""
        errors = {}
        for module, (a_key, b_key) in self._modules.items():
            if module in self._products:
                approx = state[b_key].to(torch.float64) @ state[a_key].to(torch.float64)
                errors[module] = relative_error(self._target(module, a_key, b_key), approx)
        return errors

    def _base_report(self) -> dict[str, Any]:
        layers: dict[int, int] = {}
        for key, count in self._holders.items():
            layer = layer_of(key)
            if layer is not None:
                layers[layer] = max(layers.get(layer, 0), count)
        report = {
            "updates": len(self._names), "names": list(self._names), "examples": self._examples,
            "weighting": self.config.weighting, "mode": self.config.mode, "space": self.config.space,
            "server_lr": float(self.config.server_lr), "accumulation": "float64",
            "keys_total": len(self._global), "keys_updated": len(self._holders),
            "layer_holders": {str(layer): layers[layer] for layer in sorted(layers)},
        }
        if self.config.clip_norm is not None:
            report["clip_norm"] = self.config.clip_norm
            report["clip_scales"] = dict(self._scales)
        if self.config.trim_fraction > 0:
            report["trim_fraction"] = self.config.trim_fraction
        return report


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[tuple[Mapping[str, torch.Tensor], int]],
              config: AggregationConfig | None = None) -> AggregationResult:
    """Fold every (update, num_examples) pair in order and return the result (see `HeteAggregator`)."""
    aggregator = HeteAggregator(global_state, config)
    for update, num_examples in updates:
        aggregator.add(update, num_examples)
    return aggregator.finish()
