"""The round state machine: open (sample), quorum, deadline (extend | fail), close into global version v+1.

Round life: open (sampled clients, deadline) -> closing (claimed by one replica with a lease) -> closed (global
version v+1 written) | failed (deadline passed without `min_updates` after `max_extensions`). A replica that dies
while closing leaves the lease to expire; the next `tick()` anywhere re-runs the close, and because aggregation is
a pure function of (global v, uploads sorted by sha256), the result is byte-identical.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aggregator.config import AggregatorConfig
from aggregator.faults import fault_point
from aggregator.globals import Globals
from aggregator.state import CLOSED, CLOSING, FAILED, OPEN, Store, Tx
from prufed.common.refusals import RefusalCode, Refused

log = logging.getLogger("prufed.aggregator")

TASK, WAIT, DONE = "task", "wait", "done"


@dataclass(frozen=True)
class TaskInfo:
    kind: str
    round: int = 0
    global_version: int = 0
    deadline: float = 0.0
    retry_after_s: float = 0.0
    reason: str = ""


def sample_clients(active: Sequence[str], count: int, seed: int, round_id: int) -> list[str]:
    """Deterministic sample: the same (active set, seed, round) gives the same clients on every replica."""
    rng = random.Random(f"prufed:{seed}:{round_id}")
    return sorted(rng.sample(sorted(active), count))


def open_round_for(tx: Tx, client_id: str, round_id: int):
    """The round row if `round_id` is open and `client_id` was sampled for it, else the refusal."""
    row = tx.round(round_id)
    if row is None:
        raise Refused(RefusalCode.STALE_ROUND, f"round {round_id} does not exist (current round is "
                                               f"{tx.current_round_id()})")
    if row.state != OPEN:
        raise Refused(RefusalCode.STALE_ROUND, f"round {round_id} is {row.state}, no longer accepting updates")
    if client_id not in json.loads(row.sampled):
        raise Refused(RefusalCode.NOT_SAMPLED, f"client {client_id} was not sampled for round {round_id}")
    return row


class Rounds:
    """Open, extend, fail and close rounds; answer PullTask. Every state change is one store transaction."""

    def __init__(self, store: Store, config: AggregatorConfig, globals_: Globals, clock: Callable[[], float],
                 replica: str | None = None):
        self.store = store
        self.config = config
        self.globals = globals_
        self.clock = clock
        self.replica = replica or f"{os.uname().nodename}:{os.getpid()}"
        self.on_round_closed: Callable[[int, dict], None] | None = None

    def pull_task(self, client_id: str) -> TaskInfo:
        now = self.clock()
        with self.store.write() as tx:
            tx.touch_client(client_id, now)
        retry = self.config.retry_after_s
        with self.store.read() as tx:
            latest = tx.latest_round()
            if latest is None:
                return TaskInfo(WAIT, retry_after_s=retry, reason="waiting for enough clients to open round 1")
            if latest.state in (CLOSED, FAILED):
                if latest.id >= self.config.rounds:
                    return TaskInfo(DONE, round=latest.id, global_version=tx.latest_version(),
                                    reason=f"all {self.config.rounds} rounds finished")
                return TaskInfo(WAIT, retry_after_s=retry, reason=f"round {latest.id + 1} not open yet")
            if latest.state == CLOSING:
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry, reason=f"round {latest.id} is closing")
            if client_id not in json.loads(latest.sampled):
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry,
                                reason=f"not sampled for round {latest.id}")
            if tx.upload_of(latest.id, client_id) is not None:
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry,
                                reason=f"update for round {latest.id} already accepted")
            return TaskInfo(TASK, round=latest.id, global_version=latest.base_version, deadline=latest.deadline)

    def tick(self) -> list[int]:
        """Advance the state machine once; returns the ids of rounds this replica closed."""
        claimed = self._advance()
        closed = []
        for round_id in claimed:
            if self._close(round_id):
                closed.append(round_id)
        if closed:
            self._advance()  # open the next round now rather than one tick later
        return closed

    def _advance(self) -> list[int]:
        now = self.clock()
        cfg = self.config
        with self.store.write() as tx:
            latest = tx.latest_round()
            if latest is None or latest.state in (CLOSED, FAILED):
                next_id = 1 if latest is None else latest.id + 1
                if next_id > cfg.rounds:
                    return []
                active = tx.active_clients(now - cfg.active_window_s)
                if len(active) < cfg.min_clients:
                    return []
                sampled = sample_clients(active, cfg.sample_size(len(active)), cfg.seed, next_id)
                tx.open_round(next_id, tx.latest_version(), sampled, now + cfg.deadline_s, now)
                log.info("opened round", extra={"round": next_id, "sampled": len(sampled), "active": len(active)})
                return []
            if latest.state == CLOSING:
                if latest.lease_until is not None and latest.lease_until < now and self.claim(tx, latest.id, now):
                    log.warning("re-running an abandoned close", extra={"round": latest.id})
                    return [latest.id]
                return []
            count = tx.count_uploads(latest.id)
            sampled_count = len(json.loads(latest.sampled))
            if count >= cfg.quorum(sampled_count):
                return [latest.id] if self.claim(tx, latest.id, now) else []
            if now < latest.deadline:
                return []
            if count >= cfg.min_updates:
                return [latest.id] if self.claim(tx, latest.id, now) else []
            if latest.extensions < cfg.max_extensions:
                tx.extend_round(latest.id, latest.deadline + cfg.deadline_s, latest.extensions + 1)
                log.warning("extended round deadline", extra={"round": latest.id, "updates": count,
                                                              "min_updates": cfg.min_updates,
                                                              "extension": latest.extensions + 1})
                return []
            reason = (f"deadline passed with {count} of {cfg.min_updates} required updates after "
                      f"{latest.extensions} extensions")
            tx.fail_round(latest.id, now, reason)
            log.error("round failed", extra={"round": latest.id, "reason": reason})
            return []

    def claim(self, tx: Tx, round_id: int, now: float) -> bool:
        """Take the close of `round_id` for `close_lease_s` (exactly one replica wins)."""
        return tx.claim_round(round_id, now, self.config.close_lease_s)

    def _close(self, round_id: int) -> bool:
        """Aggregate the round's uploads into global version base+1 and mark the round closed (idempotent).

        Poisoning defences (aggregator/core/poisoning.py): per-client weights capped at `max_client_share`,
        updates clipped to `adaptive_clip` × the round's lower-median norm, and a result that is not finite or moved
        more than `max_step_ratio` × max(‖G‖₂, 1) fails the round, leaving the previous global the latest.
        """
        from aggregator.core.heteagg import HeteAggregator
        from aggregator.core.poisoning import adaptive_clip_scales, capped_weights, result_problem
        from aggregator.core.robust import update_norm

        cfg = self.config
        started = time.perf_counter()
        with self.store.read() as tx:
            row = tx.round(round_id)
            ups = tx.round_uploads(round_id)
            params = tx.meta()
        raw = [float(up.num_examples) if cfg.weighting == "examples" else 1.0 for up in ups]
        weights = capped_weights(raw, cfg.max_client_share)
        norms = [up.norm if up.norm is not None else update_norm(self.store.blobs.load(up.blob)[0])
                 for up in ups]  # rows from before norms were stored
        scales = adaptive_clip_scales(norms, cfg.adaptive_clip)
        bounds = {up.client_id: (weight, scale) for up, weight, scale in zip(ups, weights, scales)}
        groups: list[dict] = []
        if cfg.per_group:  # one global per depth group (aggregator/groups.py)
            from aggregator.groups import close_groups

            closed = close_groups(self.store, self.globals, cfg, row.base_version, round_id, ups,
                                  int(params["num_layers"]), params["base_model"], bounds=bounds,
                                  check_result=lambda state, base: result_problem(state, base, cfg.max_step_ratio))
            if closed.problem is not None:
                return self._fail_close(round_id, closed.problem)
            blob, groups, report, examples, held = (closed.shared_blob, closed.groups, closed.report,
                                                    closed.examples, closed.keys_held)
        else:
            base = self.globals.state(row.base_version)
            aggregator = HeteAggregator(base, cfg.aggregation_config())
            examples = 0
            for up in ups:  # one upload in memory at a time
                tensors, _meta = self.store.blobs.load(up.blob)
                weight, scale = bounds[up.client_id]
                if scale < 1.0:
                    for value in tensors.values():
                        value.mul_(scale)
                aggregator.add(tensors, up.num_examples, name=up.client_id, weight=weight)
                examples += up.num_examples
                del tensors
            result = aggregator.finish()
            problem = result_problem(result.state, base, cfg.max_step_ratio)
            if problem is not None:
                return self._fail_close(round_id, problem)
            report, held = result.report, len(result.holders)
            blob = self.globals.put(result.state, int(params["num_layers"]), params["base_model"], round_id)
        fault_point("mid_close")
        new_version = row.base_version + 1
        metrics = {"updates": len(ups), "examples": examples, "global_version": new_version, "sha256": blob,
                   "aggregation_s": round(time.perf_counter() - started, 4), "closed_by": self.replica,
                   "report": _jsonable(report), "layers_held": held,
                   "clipped": sum(s < 1.0 for s in scales), "weights_capped": sum(w < r for w, r in zip(weights, raw))}
        now = self.clock()
        with self.store.write() as tx:
            if tx.round(round_id).state != CLOSING:
                return False  # another replica finished it first (after our lease expired)
            if tx.version_row(new_version) is not None:
                log.warning("global version already written", extra={"round": round_id, "version": new_version})
            else:
                tx.insert_version(new_version, round_id, blob, now)
                if groups:
                    tx.insert_group_globals(new_version, groups)
            metrics["eval"] = round_eval(tx, round_id)
            metrics["duration_s"] = round(now - row.created_at, 3)
            tx.close_round(round_id, now, metrics)
        log.info("closed round", extra={"round": round_id, "version": new_version, "updates": len(ups),
                                        "sha256": blob})
        if self.on_round_closed:
            self.on_round_closed(round_id, metrics)
        return True

    def _fail_close(self, round_id: int, problem: str) -> bool:
        """Mark a claimed round failed because its result must not be published; the previous global stays."""
        reason = f"result refused: {problem}"
        with self.store.write() as tx:
            tx.fail_round(round_id, self.clock(), reason, from_state=CLOSING)
        log.error("round failed", extra={"round": round_id, "reason": reason})
        return False


def round_eval(tx: Tx, round_id: int) -> dict:
    """The round's federated evaluation, {"<depth>": {"loss", "examples", "clients", "groups"}} (JSON keys)."""
    from aggregator.groups import eval_means

    return {str(depth): entry for depth, entry in eval_means(tx.upload_evals(round_id)).get(round_id, {}).items()}


def _jsonable(value):
    """Reports may hold tensors or tuples; keep what JSON can carry."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (TypeError, ValueError):
        return str(value)
