"""`prufed simulate --engine flower`: the same federation on Flower's simulation engine (Ray backend).

Same clients, depths (or profiles), data shards, seeds, local steps and round-0 adapter as `--engine prufed`; the
PruFed ServerApp (PruFedStrategy) and ClientApp run in this process and in Ray actors instead of an aggregator
process and agent processes. Every round's global adapter is evaluated per depth and saved like the PruFed
engine's, and the report has the same rows. Differences: bytes are the ArrayRecords' payloads (no gRPC
framing), round seconds are the strategy's configure -> aggregate time.

Loopback only: Ray is started as a single-machine cluster whose node IP is 127.0.0.1
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when `ray` is imported), so its GCS, raylet, workers and agents listen
on 127.0.0.1 only; no dashboard. The Flower simulation runtime itself is in-process (no SuperLink, no sockets).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prufed.common.errors import ConfigError, PrufedError
from prufed.simulation.run import ClientSpec, DepthEvaluator, FederationRun, SimulationConfig, _evaluate, save_global

#: Ray reads this at import: 0 = a local-only cluster whose node IP is 127.0.0.1 (Ray's default on macOS/Windows).
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _emulation(spec: ClientSpec) -> tuple[str, str]:
    """(depth, profile) of a client from its `prufed edge run` flags: ("8", "") or ("auto", "jetson-...")."""
    args = dict(zip(spec.args[::2], spec.args[1::2]))
    return args.get("--depth", "auto"), args.get("--profile", "")


def run_configs(config: SimulationConfig, model: str, clients: Sequence[ClientSpec], mode: str) -> tuple[dict, dict]:
    """(ServerApp run config, ClientApp run config) for this federation; partition p is client clients[p]."""
    server = {"model": model, "num-server-rounds": config.rounds, "mode": mode, "pruning-strategy": config.strategy,
              "local-steps": config.local_steps, "lr": config.lr, "batch-size": config.batch_size,
              "seq-len": config.seq_len, "lora-r": config.lora_r, "lora-alpha": config.lora_alpha,
              "lora-targets": "q_proj,v_proj", "seed": config.seed, "min-nodes": len(clients),
              "round-timeout": config.deadline_s}
    emulation = [_emulation(spec) for spec in clients]
    client = {"model": model, "pruning-strategy": config.strategy, "quant": config.quant, "seed": config.seed,
              "depths": ",".join(depth for depth, _ in emulation),
              "profiles": ",".join(profile for _, profile in emulation),
              "client-ids": ",".join(str(spec.index) for spec in clients),
              "data-dir": str(clients[0].data_path.parent.parent), "eval-examples": config.eval_examples,
              "gradient-checkpointing": config.gradient_checkpointing, "threads": config.child_threads}
    return server, client


def _row(record: dict, clients: Sequence[ClientSpec], heldout: dict[int, float]) -> dict:
    """One report row (the PruFed engine's fields) from the strategy's record of a round."""
    entries = record["clients"]
    per_depth: dict[int, list[float]] = {}
    for entry in entries:
        per_depth.setdefault(len(entry["kept_layers"]), []).append(float(entry["metrics"]["train-loss"]))
    evals: dict[int, list[tuple[int, float]]] = {}
    for entry in entries:
        if int(entry["metrics"]["eval-examples"]) > 0:
            evals.setdefault(len(entry["kept_layers"]), []).append(
                (int(entry["metrics"]["eval-examples"]), float(entry["metrics"]["eval-loss"])))
    evals = dict(sorted(evals.items(), reverse=True))
    seconds = float(record["closed"] - record["started"])
    slowest = max((float(e["metrics"]["train-wall-s"]) for e in entries), default=0.0)
    losses = [float(e["metrics"]["train-loss"]) for e in entries]
    return {
        "round": record["round"],
        "clients_per_depth": {d: len(v) for d, v in sorted(per_depth.items(), reverse=True)},
        "train_loss": sum(losses) / len(losses) if losses else None,
        "train_loss_per_depth": {d: sum(v) / len(v) for d, v in sorted(per_depth.items(), reverse=True)},
        "heldout_loss": dict(heldout),
        "bytes_up": sum(int(e["bytes_up"]) for e in entries), "bytes_down": sum(int(e["bytes_down"]) for e in entries),
        "seconds": seconds, "slowest_train_s": slowest,
        "slowest_step_s": max((float(e["metrics"]["train-seconds"]) for e in entries), default=0.0),
        "overhead": (seconds - slowest) / seconds if seconds > 0 else None,
        "updates": len(entries), "examples": sum(int(e["num_examples"]) for e in entries),
        # the clients' own held-out loss of the global the round started from, example-weighted per depth
        "federated_eval": {d: sum(n * loss for n, loss in v) / sum(n for n, _ in v) for d, v in evals.items()},
        "federated_eval_examples": {d: sum(n for n, _ in v) for d, v in evals.items()},
        "groups": [],
    }


def _start_loopback_ray_env() -> None:
    """Make Ray (imported next) a 127.0.0.1-only cluster; refuse if it was imported without that."""
    os.environ.update(RAY_LOOPBACK_ENV)
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise PrufedError("ray was imported before the Flower engine could make it bind 127.0.0.1 only; set "
                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment")


def run_flower_federation(name: str, config: SimulationConfig, model: str, clients: Sequence[ClientSpec], out: Path,
                          evaluator: DepthEvaluator, *, mode: str,
                          on_row: Callable[[dict], None] | None = None) -> FederationRun:
    """Run the rounds on Flower's Ray engine, evaluate and save every global version, return the rows."""
    _start_loopback_ray_env()
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise ConfigError("--engine", f"flower needs the Flower extra ({exc.name} is missing): "
                                      "pip install 'prufed[flower]'") from None

    from prufed.flower.client_app import make_client_app
    from prufed.flower.records import to_state
    from prufed.flower.server_app import make_server_app
    from prufed.flower.strategy import PruFedStrategy

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "globals", ignore_errors=True)  # a previous run's rounds must not pass for this run's
    run = FederationRun(name)
    server_config, client_config = run_configs(config, model, clients, mode)
    holder: dict[str, PruFedStrategy] = {}
    pending: list[tuple[int, dict]] = []  # global versions waiting for the clients' plans (known after round 1)

    def evaluate(round_id: int, arrays) -> Any:
        state = to_state(arrays)
        save_global(out, round_id, state)
        strategy = holder["strategy"]
        if round_id > 0:
            record = strategy.history[round_id - 1]
            if record.get("failed") or record.get("refused") or len(record["clients"]) != len(clients):
                raise PrufedError(f"round {round_id}: {len(record['clients'])} of {len(clients)} clients "
                                  f"contributed; failed {record.get('failed')}, refused {record.get('refused')}")
            for entry in record["clients"]:
                spec = clients[entry["partition_id"]]
                spec.plan = spec.plan or json.loads(entry["plan"])
        pending.append((round_id, state))
        if any(spec.plan is None for spec in clients):
            return None
        while pending:
            done, global_state = pending.pop(0)
            losses = _evaluate(evaluator, clients, lambda _group, state=global_state: state)
            if done == 0:
                run.eval_round0 = losses
                row = {"round": 0, "heldout_loss": losses}
            else:
                row = _row(strategy.history[done - 1], clients, losses)
                run.rows.append(row)
            if on_row:
                on_row(row)
        return None

    started = time.perf_counter()
    server_app = make_server_app(server_config, evaluate_fn=evaluate,
                                 on_strategy=lambda strategy: holder.__setitem__("strategy", strategy))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(len(clients), os.cpu_count() or 1)), "include_dashboard": False,
                             "_node_ip_address": "127.0.0.1", "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=make_client_app(client_config), num_supernodes=len(clients),
                   backend_name="ray", backend_config=backend)
    if len(run.rows) != config.rounds:
        raise PrufedError(f"the Flower run ended after {len(run.rows)} of {config.rounds} rounds; see the log above")
    run.wall_s = time.perf_counter() - started
    run.aggregator_totals = {"bytes_up": sum(r["bytes_up"] for r in run.rows),
                             "bytes_down": sum(r["bytes_down"] for r in run.rows)}
    run.clients = [{"index": s.index, "depth": len(s.plan["kept_layers"]), "kept_layers": s.plan["kept_layers"],
                    "emulation": " ".join(s.args), "num_examples": s.num_examples, "categories": s.categories}
                   for s in clients if s.plan is not None]
    return run
