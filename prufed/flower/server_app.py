"""PruFed's Flower ServerApp: the round-0 adapter, PruFedStrategy, and the run config that drives them.

Run config ([tool.flwr.app.config] or `flwr run --run-config`), with SERVER_DEFAULTS for what a run omits:
  num-server-rounds  rounds                     mode              heteagg | fedavg (aggregator.core.heteagg.MODES)
  pruning-strategy   how clients drop layers    weighting         examples | uniform;  server-lr
  local-steps lr batch-size seq-len             the clients' task (sent in every TRAIN message)
  lora-r lora-alpha lora-targets seed           the round-0 adapter: PEFT's init, full depth, seeded
  fraction-train min-nodes round-timeout        sampling as in Flower's FedAvg
  output-dir                                    if set: global.safetensors (final adapter) + history.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from aggregator.core.heteagg import MODES, WEIGHTINGS, AggregationConfig
from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from prufed.common.errors import ConfigError
from prufed.flower.records import to_array_record
from prufed.flower.strategy import AggregatorFactory, PruFedStrategy

SERVER_DEFAULTS: dict[str, Any] = {
    "model": "", "num-server-rounds": 3, "mode": "heteagg", "weighting": "examples", "server-lr": 1.0,
    "pruning-strategy": DEFAULT_STRATEGY, "local-steps": 6, "lr": 1e-3, "batch-size": 1, "seq-len": 160,
    "lora-r": 8, "lora-alpha": 16, "lora-targets": "q_proj,v_proj", "seed": 0, "fraction-train": 1.0,
    "min-nodes": 2, "round-timeout": 3600.0, "output-dir": ""}


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's run config, checked; each error names the run-config key."""

    model: str | None
    rounds: int
    mode: str
    weighting: str
    server_lr: float
    pruning_strategy: str
    task: dict[str, Any]  #: the TRAIN ConfigRecord's hyper-parameters (prufed.flower.records.TASK_KEYS)
    seed: int
    fraction_train: float
    min_nodes: int
    round_timeout: float
    output_dir: str

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("num-server-rounds", f"must be >= 1, got {self.rounds}")
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError("weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.pruning_strategy not in STRATEGIES:
            raise ConfigError("pruning-strategy", f"must be one of {', '.join(STRATEGIES)}, "
                                                  f"got {self.pruning_strategy!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train", f"must be in (0, 1], got {self.fraction_train}")
        if self.min_nodes < 1:
            raise ConfigError("min-nodes", f"must be >= 1, got {self.min_nodes}")
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ConfigError("round-timeout", f"must be > 0 seconds, got {self.round_timeout}")
        for key in ("local-steps", "batch-size", "lora-r"):
            if int(self.task[key.replace("local-steps", "max-steps")]) < 1:
                raise ConfigError(key, f"must be >= 1, got {self.task[key.replace('local-steps', 'max-steps')]}")
        if int(self.task["seq-len"]) < 8:
            raise ConfigError("seq-len", f"must be >= 8, got {self.task['seq-len']}")
        if not float(self.task["lr"]) > 0:
            raise ConfigError("lr", f"must be > 0, got {self.task['lr']}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        c = {**SERVER_DEFAULTS, **run_config}
        task = {"max-steps": int(c["local-steps"]), "lr": float(c["lr"]), "batch-size": int(c["batch-size"]),
                "seq-len": int(c["seq-len"]), "lora-r": int(c["lora-r"]), "lora-alpha": float(c["lora-alpha"]),
                "lora-targets": str(c["lora-targets"])}
        return cls(model=str(c["model"]) or None, rounds=int(c["num-server-rounds"]), mode=str(c["mode"]),
                   weighting=str(c["weighting"]), server_lr=float(c["server-lr"]),
                   pruning_strategy=str(c["pruning-strategy"]), task=task, seed=int(c["seed"]),
                   fraction_train=float(c["fraction-train"]), min_nodes=int(c["min-nodes"]),
                   round_timeout=float(c["round-timeout"]), output_dir=str(c["output-dir"]))

    def lora(self) -> dict[str, Any]:
        alpha = float(self.task["lora-alpha"])
        return {"r": int(self.task["lora-r"]), "alpha": int(alpha) if alpha.is_integer() else alpha,
                "targets": [t for t in str(self.task["lora-targets"]).split(",") if t]}


def initial_adapter(settings: ServerSettings):
    """Round-0 global adapter of the base model: PEFT's LoRA init at full depth, seeded (as `prufed aggregator`)."""
    from aggregator.core.init_adapter import initial_global_adapter
    from prufed.common.models import read_model_config, resolve_model

    lora = settings.lora()
    model_config = read_model_config(resolve_model(settings.model))
    return initial_global_adapter(model_config, lora["r"], lora["alpha"], lora["targets"], settings.seed)


def save_outputs(settings: ServerSettings, strategy: PruFedStrategy) -> None:
    """OUTPUT_DIR/global.safetensors (the final global adapter, PEFT-loadable keys) and history.json."""
    from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta, save_adapter
    from prufed.common.adapter_keys import layers_of_keys
    from prufed.common.fsio import atomic_write_json
    from prufed.common.models import fingerprint_model_dir, resolve_model

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = strategy.global_state
    meta = AdapterMeta(GLOBAL_FORMAT, tuple(layers_of_keys(state)), base_model=fingerprint_model_dir(
        resolve_model(settings.model)), round=settings.rounds, lora=settings.lora())
    save_adapter(out / "global.safetensors", state, meta)
    atomic_write_json(out / "history.json", json.loads(json.dumps(strategy.history, default=str)))


def make_server_app(defaults: Mapping[str, Any] | None = None, *,
                    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
                    make_aggregator: AggregatorFactory | None = None,
                    on_strategy: Callable[[PruFedStrategy], None] | None = None) -> ServerApp:
    """A ServerApp over PruFedStrategy; `defaults` fill run-config keys the run omits (then SERVER_DEFAULTS).

    evaluate_fn(round, global arrays) runs after round 0 and every round (server-side evaluation);
    make_aggregator plugs in another aggregation mode; on_strategy sees the strategy before the rounds start.
    """
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        settings = ServerSettings.from_run_config({**base, **context.run_config})
        strategy = PruFedStrategy(
            aggregation=AggregationConfig(mode=settings.mode, weighting=settings.weighting,
                                          server_lr=settings.server_lr),
            make_aggregator=make_aggregator, fraction_train=settings.fraction_train,
            min_train_nodes=settings.min_nodes, min_available_nodes=settings.min_nodes)
        if on_strategy is not None:
            on_strategy(strategy)
        strategy.start(grid=grid, initial_arrays=to_array_record(initial_adapter(settings)),
                       num_rounds=settings.rounds, timeout=settings.round_timeout,
                       train_config=ConfigRecord(dict(settings.task)), evaluate_fn=evaluate_fn)
        if settings.output_dir:
            save_outputs(settings, strategy)

    return app
