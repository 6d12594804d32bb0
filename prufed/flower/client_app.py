"""PruFed's Flower ClientApp: plan this node's depth from its hardware, train LoRA on the kept layers, reply Δ.

Where the depth comes from (first match wins):
  node config  "depth" (an int, or "auto"); "hardware-profile" (a hardware_profiles/ name) and/or
               "memory-budget-gib" -> the memory planner picks the deepest depth that fits
               (`flower-supernode --node-config "hardware-profile='jetson-orin-nano-8gb'"`)
  run config   "depths" / "profiles": comma lists assigned round-robin by the node's partition-id (simulation,
               where every virtual node has the same node config); "auto" in "depths" defers to "profiles"
  otherwise    this machine's probe (psutil, CUDA) and the memory planner
The plan is made once per node and kept in the node's Context.state, so later rounds reuse it.

Training is the edge agent's (`edge_client.agent.task_train_config` + `edge_client.train.train_local`): same
hyper-parameters from the TRAIN message, same seed (run config "seed" + the client id), same data rotation, so a
node trains exactly as `prufed edge run` would on the same task. Private data: node config "data" (a file on the
node), else run config "data-dir"/<client id>/data.jsonl, else the built-in demo data.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_client.agent import AgentConfig, hardware_spec, load_private_examples, plan_layers, rotate, task_train_config
from edge_client.core.pruning import DEFAULT_STRATEGY, PruningPlan
from prufed.common.errors import ConfigError
from prufed.flower.records import (
    ARRAYS,
    CONFIG,
    KEPT_LAYERS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION,
    PLAN,
    PRUFED,
    task_hyper,
    to_array_record,
    to_state,
)

#: Run-config defaults of the ClientApp (flwr run: [tool.flwr.app.config] overrides them).
CLIENT_DEFAULTS: dict[str, Any] = {"model": "", "pruning-strategy": DEFAULT_STRATEGY, "depths": "", "profiles": "",
                                   "client-ids": "", "quant": "auto", "seed": 0, "data-dir": "", "max-examples": 0,
                                   "eval-examples": 16, "gradient-checkpointing": True, "threads": 0}
STATE_KEY = "prufed-plan"

@dataclass(frozen=True)
class NodeSettings:
    """What one node trains with; built from run config + node config by `node_settings`."""

    client_id: int
    agent: AgentConfig  #: the edge agent's settings (model, depth, profile, budget, quant, data, seed, ...)
    threads: int  #: torch threads (0 = leave torch's default)

def _pick(values: str, index: int) -> str:
    items = [item.strip() for item in str(values).split(",")]
    return items[index % len(items)] if str(values).strip() else ""

def node_settings(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> NodeSettings:
    """Resolve this node's settings (see the module docstring for the order)."""
    config = {**CLIENT_DEFAULTS, **run_config}
    partition = int(node_config.get(PARTITION, 0))
    ids = _pick(config["client-ids"], partition)
    client_id = int(ids) if ids else partition
    profile = node_config.get("hardware-profile") or _pick(config["profiles"], partition) or None
    budget = node_config.get("memory-budget-gib")
    if "depth" in node_config:
        depth: int | str = node_config["depth"]
    elif node_config.get("hardware-profile") or budget is not None:
        depth = "auto"
    else:
        depth = _pick(config["depths"], partition) or "auto"
    if depth != "auto":
        try:
            depth = int(depth)
        except ValueError:
            raise ConfigError("depths", f"must be layer counts or 'auto', got {depth!r}") from None
    data = node_config.get("data")
    if not data and config["data-dir"]:
        data = str(Path(str(config["data-dir"])) / str(client_id) / "data.jsonl")
        if not Path(data).is_file():
            raise ConfigError("data-dir", f"{data}: no such file (one data.jsonl per client id)")
    agent = AgentConfig(
        aggregator="flower", state_dir=Path(tempfile.gettempdir()), model=str(config["model"]) or None,
        data=str(data) if data else None, depth=depth, strategy=str(config["pruning-strategy"]), profile=profile,
        budget_gib=float(budget) if budget is not None else None, quant=str(config["quant"]),
        max_examples=int(config["max-examples"]) or None, seed=int(config["seed"]) + client_id,
        eval_examples=int(config["eval-examples"]),
        gradient_checkpointing=bool(config["gradient-checkpointing"]), verbose=False)
    return NodeSettings(client_id, agent, int(config["threads"]))

def node_plan(settings: NodeSettings, context: Context) -> tuple[PruningPlan, dict]:
    """This node's pruning plan and depth choice (with the precision it planned for): made once (profile ->
    memory planner, or a fixed depth), then read from the node's state."""
    stored = context.state.get(STATE_KEY)
    if stored is not None:
        return PruningPlan.from_json_dict(json.loads(str(stored[PLAN]))), json.loads(str(stored["choice"]))
    plan, choice = plan_layers(settings.agent, hardware_spec(settings.agent))
    context.state[STATE_KEY] = ConfigRecord({PLAN: json.dumps(plan.to_json_dict()), "choice": json.dumps(choice)})
    return plan, choice

def train(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """One TRAIN task: score the received global on the node's held-out examples (federated evaluation, as the
    agent does before training), train on the rest, reply Δ of the kept layers."""
    import torch

    from edge_client.federated_eval import heldout_split, score_global
    from edge_client.train import train_local
    from prufed.common.adapter_format import load_adapter

    settings = node_settings(run_config, context.node_config)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    plan, choice = node_plan(settings, context)
    hyper, lora = task_hyper(msg.content[CONFIG])
    round_id = int(msg.content[CONFIG].get("server-round", 1))
    quant = choice.get("quant", settings.agent.quant)  # the plan's resolved precision (as the agent trains)
    config = task_train_config(settings.agent, plan.kept_layers, hyper, lora, checkpoint_every=0, quant=quant)
    examples, heldout = heldout_split(load_private_examples(settings.agent), settings.agent.eval_examples,
                                      settings.agent.seed)
    global_state = to_state(msg.content[ARRAYS])
    scored = score_global(settings.agent.model, plan, global_state, heldout, seq_len=config.seq_len, lora=lora,
                          quant=quant) if heldout else None
    with tempfile.TemporaryDirectory(prefix="prufed-flower-") as workdir:
        result = train_local(config, workdir, global_adapter=global_state,
                             examples=rotate(examples, round_id, config.max_steps * config.batch_size),
                             round=round_id)
        delta, _meta = load_adapter(result.update_path)
    losses = result.metrics["train_loss"]
    metrics = MetricRecord({NUM_EXAMPLES: result.num_examples, "train-loss": sum(losses) / len(losses),
                            "train-seconds": float(result.metrics["train_seconds"]),
                            "train-wall-s": float(result.metrics["wall_time_s"]), "depth": plan.depth,
                            "eval-loss": scored.loss if scored else 0.0,  # eval-examples 0: nothing scored
                            "eval-examples": scored.examples if scored else 0})
    prufed = ConfigRecord({KEPT_LAYERS: list(plan.kept_layers), PLAN: json.dumps(plan.to_json_dict()),
                           PARTITION: int(context.node_config.get(PARTITION, -1))})
    content = RecordDict({ARRAYS: to_array_record(delta), METRICS: metrics, PRUFED: prufed})
    return Message(content=content, reply_to=msg)

def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to `defaults` (then CLIENT_DEFAULTS) for keys the run omits."""
    base = dict(defaults or {})
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, {**base, **context.run_config})

    return app
