"""Per-group globals in the server (modes fedavg-group, mixed, additive), and the federated-evaluation means.

A depth group is the set of clients with the same kept-layer list. In a per-group mode, global version v is one
adapter per group, stored as rows of `group_globals` (version, kept_layers, blob) written in the same transaction as
the version's `global_versions` row. That row's own blob is the version's shared global: the starting point of a
group that has no global of its own yet (the initial adapter: a database keeps the kind of mode it was created
with). A round close is a pure function of (the base version's group globals, the uploads
in content order), so a replica that re-runs an abandoned close writes byte-identical blobs, and a restart loses
nothing: every group global is in the database and the blob store.

Federated evaluation: each upload may carry the client's loss on its own held-out examples for the global it
downloaded (the round's base version), with the number of examples scored. Means are example-weighted:

    loss_d = Σ_k n_k·loss_k / Σ_k n_k     over the clients k of depth d (or of group g) that reported one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.globals import Globals
from aggregator.state import Store

log = logging.getLogger("prufed.aggregator")


@dataclass(frozen=True)
class GroupClose:
    """What a per-group close writes: the version's shared blob, the group rows and the round's report."""

    shared_blob: str
    groups: list[dict[str, Any]]  # {"kept_layers", "blob", "clients", "examples"} per group
    report: dict[str, Any]
    examples: int
    keys_held: int
    problem: str | None = None  # set: a group's result failed the publish check; nothing was written


def close_groups(store: Store, globals_: Globals, config: AggregatorConfig, base_version: int, round_id: int,
                 uploads: Sequence[Any], num_layers: int, base_model: str,
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 check_result: Callable[[dict, dict], str | None] | None = None) -> GroupClose:
    """Fold a round's uploads (content order, one in memory at a time) into version base+1 of every group.

    Groups carried from the base version get a new global too (mixed/additive move them by the other groups'
    steps; fedavg-group copies them bit for bit). A group new this round starts from the base version's shared
    global. `bounds[client_id] = (weight, clip_scale)` applies the server's poisoning defences to each update;
    `check_result(new_state, old_state)` returning a reason refuses the whole close before any blob is written.
    """
    from aggregator.core.modes import group_aggregator

    base_row = globals_.version_row(base_version)
    with store.read() as tx:
        existing = tx.group_globals(base_version)
        layers = {up.client_id: tx.client_layers(up.client_id) for up in uploads}
    group_states = {tuple(g["kept_layers"]): globals_.blob_state(g["blob"]) for g in existing}
    aggregator = group_aggregator(config.mode, group_states, config.aggregation_config(),
                                  initial=globals_.blob_state(base_row.blob), mix=config.mix)
    examples = 0
    for up in uploads:
        tensors, _meta = store.blobs.load(up.blob)
        weight, scale = bounds.get(up.client_id, (None, 1.0)) if bounds else (None, 1.0)
        if scale < 1.0:
            for value in tensors.values():
                value.mul_(scale)
        aggregator.add(layers[up.client_id] or (), tensors, up.num_examples, name=up.client_id, weight=weight)
        examples += up.num_examples
        del tensors
    results = aggregator.finish()
    if check_result is not None:
        for group, result in sorted(results.items()):
            base = group_states.get(group) or globals_.blob_state(base_row.blob)
            problem = check_result(result.state, base)
            if problem is not None:
                return GroupClose(base_row.blob, [], {}, examples, 0, f"group {list(group)}: {problem}")
    groups, reports, held = [], [], set()
    for group, result in sorted(results.items()):
        blob = globals_.put(result.state, num_layers, base_model, round_id)
        groups.append({"kept_layers": list(group), "blob": blob, "clients": int(result.report["clients"]),
                       "examples": int(result.report["examples"])})
        reports.append(dict(result.report, sha256=blob))
        held.update(result.holders)
    report = {"mode": config.mode, "mix": config.mix, "groups": reports}
    return GroupClose(base_row.blob, groups, report, examples, len(held))


def group_summary(store: Store, version: int) -> list[dict[str, Any]]:
    """The groups of `version` for status: kept layers, depth, sha256, and the clients/examples folded into it."""
    with store.read() as tx:
        rows = tx.group_globals(version)
    return [{"kept_layers": g["kept_layers"], "depth": len(g["kept_layers"]), "version": version,
             "sha256": g["blob"], "clients": g["clients"], "examples": g["examples"]} for g in rows]


def eval_means(rows: Iterable[Any]) -> dict[int, dict[int, dict[str, Any]]]:
    """{round: {depth: {"loss", "examples", "clients", "groups"}}} from `Tx.upload_evals` rows (example-weighted).

    "groups" splits a depth by kept-layer list: [{"kept_layers", "loss", "examples", "clients"}] (one entry unless
    clients of the same depth kept different layers)."""
    sums: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        group = json.dumps(json.loads(row.kept_layers), separators=(",", ":"))
        acc = sums.setdefault(int(row.round), {}).setdefault(group, [0.0, 0.0, 0.0])
        acc[0] += float(row.loss) * int(row.examples)
        acc[1] += int(row.examples)
        acc[2] += 1
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for round_id, per_group in sorted(sums.items()):
        depths: dict[int, dict[str, Any]] = {}
        for group, (weighted, examples, clients) in sorted(per_group.items()):
            kept = json.loads(group)
            entry = depths.setdefault(len(kept), {"loss": 0.0, "examples": 0, "clients": 0, "groups": []})
            entry["loss"] += weighted  # Σ n·loss until divided below
            entry["examples"] += int(examples)
            entry["clients"] += int(clients)
            entry["groups"].append({"kept_layers": kept, "loss": weighted / examples, "examples": int(examples),
                                    "clients": int(clients)})
        for entry in depths.values():
            entry["loss"] /= entry["examples"]
        out[round_id] = dict(sorted(depths.items(), reverse=True))
    return out
