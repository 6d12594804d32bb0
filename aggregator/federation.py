"""The federation: clients, uploads, rounds and global versions over one store, plus its status.

The process holds nothing that is not in the database (caches are keyed by immutable global versions), so any
replica can serve any call and a restart resumes where the DB stands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.clients import Clients
from aggregator.config import AggregatorConfig
from aggregator.globals import Globals
from aggregator.rounds import Rounds
from aggregator.state import CLOSED, FAILED, Store
from aggregator.uploads import Uploads

log = logging.getLogger("prufed.aggregator")


class Federation:
    """One object per server process: the role modules, sharing a store, a config and a clock."""

    def __init__(self, store: Store, config: AggregatorConfig, *, clock: Callable[[], float] = time.time,
                 replica: str | None = None):
        self.store = store
        self.config = config
        self.clock = clock
        self.globals = Globals(store, config, clock)
        self.clients = Clients(store, config, clock)
        self.rounds = Rounds(store, config, self.globals, clock, replica)
        self.uploads = Uploads(store, config, self.globals, clock)

    def initialize(self, model_dir: Path) -> int:
        """Write global version 0 if absent, sweep partial uploads of dead processes and unreferenced blobs; returns
        the latest version."""
        version = self.globals.initialize(model_dir)
        self.store.blobs.sweep_partials()
        self.sweep_blobs()
        return version

    def sweep_blobs(self) -> int:
        """Delete blobs no row references (older than `blob_sweep_grace_s`); returns how many were removed."""
        with self.store.read() as tx:
            referenced = tx.referenced_blobs()
        removed = self.store.blobs.sweep_orphans(referenced, self.config.blob_sweep_grace_s)
        if removed:
            log.warning("swept unreferenced blobs", extra={"removed": removed})
        return removed

    def tick(self) -> list[int]:
        return self.rounds.tick()

    def global_state(self, version: int | None = None) -> dict:
        return self.globals.state(version)

    def status(self) -> dict:
        return read_status(self.store, self.config.rounds, self.config.mode)


def read_status(store: Store, rounds_total: int | None = None, mode: str | None = None) -> dict:
    """Federation state straight from the database (no server needed).

    Per round, "eval" is the federated evaluation of the global the round started from (version "base_version"):
    {"<depth>": {"loss", "examples", "clients", "groups"}}, example-weighted over the clients that reported one
    (aggregator/groups.py); live while the round is open. "groups" lists the latest version's per-group globals."""
    from aggregator.groups import eval_means, group_summary

    with store.read() as tx:
        meta = tx.meta()
        created = json.loads(meta.get("config", "{}"))
        if rounds_total is None:
            rounds_total = int(created.get("rounds", 0))
        version = tx.latest_version()
        counts = tx.upload_counts()
        round_rows = tx.all_rounds()
        depths = tx.depth_counts()
        evals = eval_means(tx.upload_evals())
    closed = [r for r in round_rows if r.state == CLOSED]
    finished = sum(r.state in (CLOSED, FAILED) for r in round_rows)
    return {
        "base_model": meta.get("base_model", ""),
        "num_layers": int(meta.get("num_layers", 0)),
        "global_version": version,
        "rounds_total": rounds_total,
        "rounds_closed": len(closed),
        "done": bool(rounds_total) and finished >= rounds_total and round_rows[-1].id >= rounds_total,
        "rounds": [{"round": r.id, "state": r.state, "sampled": len(json.loads(r.sampled)),
                    "uploads": counts.get(r.id, 0), "deadline": r.deadline, "extensions": r.extensions,
                    "reason": r.reason, "metrics": json.loads(r.metrics), "base_version": r.base_version,
                    "eval": {str(d): e for d, e in evals.get(r.id, {}).items()}} for r in round_rows],
        "clients_per_depth": depths,
        "last_metrics": json.loads(closed[-1].metrics) if closed else {},
        "mode": mode or created.get("mode", "heteagg"),
        "groups": group_summary(store, version),
    }
