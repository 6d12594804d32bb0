"""The federation state machine over the store: register, sample, accept uploads, close rounds into new globals.

The process holds nothing that is not in the database (caches are keyed by immutable global versions), so any
replica can serve any call and a restart resumes where the DB stands.

Round life: open (sampled clients, deadline) -> closing (claimed by one replica with a lease) -> closed (global
version v+1 written) | failed (deadline passed without `min_updates` after `max_extensions`). A replica that dies
while closing leaves the lease to expire; the next `tick()` anywhere re-runs the close, and because aggregation is
a pure function of (global v, uploads sorted by sha256), the result is byte-identical.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from aggregator.config import AggregatorConfig
from aggregator.store import Store, clients, federation, global_versions, rounds, uploads
from prufed.common.errors import ConfigError, PrufedError
from prufed.common.wire import SafetensorsHeaderError, canonical_safetensors, safetensors_index

log = logging.getLogger("prufed.aggregator")

TASK, WAIT, DONE = "task", "wait", "done"
OPEN, CLOSING, CLOSED, FAILED = "open", "closing", "closed", "failed"
FAULT_ENV = "PRUFED_FAULT"


class FederationError(PrufedError):
    """A refused call. `code` picks the gRPC status in the servicer; the message names the fault."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def fault_point(name: str) -> None:
    """Test hook: `PRUFED_FAULT=<name>` makes the process SIGKILL itself here (no cleanup, like a power cut)."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: killing self", extra={"fault": name})
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class TaskInfo:
    kind: str
    round: int = 0
    global_version: int = 0
    deadline: float = 0.0
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class UploadReceipt:
    upload_id: str
    sha256: str
    round: int
    duplicate: bool = False
    accepted: bool = True


@dataclass(frozen=True)
class UploadHeaderInfo:
    """What an uploader declares before sending bytes (decoded from the wire header)."""

    round: int
    total_bytes: int
    num_examples: int
    kept_layers: tuple[int, ...]
    tensors: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (name, shape, safetensors dtype tag)


@dataclass
class _GlobalCache:
    """Immutable global versions, bounded LRU (a version's bytes never change, so caching keeps us stateless)."""

    capacity: int = 4
    items: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key, build: Callable):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = build()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return value


def _hash_token(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def sample_clients(active: Sequence[str], count: int, seed: int, round_id: int) -> list[str]:
    """Deterministic sample: the same (active set, seed, round) gives the same clients on every replica."""
    rng = random.Random(f"prufed:{seed}:{round_id}")
    return sorted(rng.sample(sorted(active), count))


class Federation:
    """Domain operations; every state change is one store transaction."""

    def __init__(self, store: Store, config: AggregatorConfig, *, clock: Callable[[], float] = time.time,
                 replica: str | None = None):
        self.store = store
        self.config = config
        self.clock = clock
        self.replica = replica or f"{os.uname().nodename}:{os.getpid()}"
        self._globals = _GlobalCache()
        self._slices = _GlobalCache(capacity=16)
        self.on_round_closed: Callable[[int, dict], None] | None = None

    # ---- federation setup -------------------------------------------------------------------------------------
    def initialize(self, model_dir: Path) -> int:
        """Record the base model and write global version 0 if absent (idempotent). Returns the latest version."""
        from prufed.common.models import fingerprint_model_dir, read_model_config

        model_config = read_model_config(Path(model_dir))
        fingerprint = fingerprint_model_dir(Path(model_dir))
        num_layers = int(model_config["num_hidden_layers"])
        with self.store.read() as conn:
            meta = self._meta(conn)
            has_v0 = conn.execute(select(global_versions.c.version).where(global_versions.c.version == 0)).first()
        if meta.get("base_model") not in (None, fingerprint):
            raise ConfigError("--model", f"the database was created for base model {meta['base_model']}, "
                                         f"this model is {fingerprint}")
        if meta.get("lora") not in (None, json.dumps(self.config.lora(), sort_keys=True)):
            raise ConfigError("lora_r", f"the database was created with LoRA {meta['lora']}, config asks "
                                        f"{self.config.lora()}")
        blob = None
        if not has_v0:
            from aggregator.core.init_adapter import initial_global_adapter

            state = initial_global_adapter(model_config, self.config.lora_r, self.config.lora_alpha,
                                           tuple(self.config.lora_targets), self.config.seed)
            blob = self._put_global(state, num_layers, fingerprint, round_id=0)
        with self.store.write() as conn:
            meta = self._meta(conn)
            if not meta:
                conn.execute(insert(federation), [
                    {"key": "base_model", "value": fingerprint},
                    {"key": "num_layers", "value": str(num_layers)},
                    {"key": "lora", "value": json.dumps(self.config.lora(), sort_keys=True)},
                    {"key": "config", "value": json.dumps(self.config.to_dict(), sort_keys=True)},
                ])
            if blob and not conn.execute(select(global_versions.c.version).where(global_versions.c.version == 0)).first():
                conn.execute(insert(global_versions).values(version=0, round=0, blob=blob, sha256=blob,
                                                            created_at=self.clock()))
                log.info("wrote initial global adapter", extra={"version": 0, "sha256": blob})
        self.store.blobs.sweep_partials()
        return self.latest_version()

    def _meta(self, conn: Connection) -> dict[str, str]:
        return {row.key: row.value for row in conn.execute(select(federation))}

    def federation_params(self) -> dict:
        with self.store.read() as conn:
            meta = self._meta(conn)
        return {"base_model": meta.get("base_model", ""), "num_layers": int(meta.get("num_layers", 0))}

    # ---- clients ----------------------------------------------------------------------------------------------
    def register(self, kept_layers: Sequence[int], profile: Mapping, *, name: str = "",
                 base_model: str = "") -> tuple[str, str]:
        """Store a new client; returns (client_id, bearer token). Only the token's salted hash is kept."""
        params = self.federation_params()
        if base_model and base_model != params["base_model"]:
            raise FederationError("base_model_mismatch", f"base_model {base_model} differs from the federation's "
                                                         f"{params['base_model']}")
        kept = [int(i) for i in kept_layers]
        if not kept:
            raise FederationError("bad_layers", "kept_layers is empty")
        if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= params["num_layers"]:
            raise FederationError("bad_layers", f"kept_layers must be strictly increasing indices in "
                                                f"[0, {params['num_layers']}), got {kept}")
        client_id = uuid.uuid4().hex[:16]
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        now = self.clock()
        with self.store.write() as conn:
            conn.execute(insert(clients).values(
                id=client_id, token_salt=salt, token_hash=_hash_token(salt, secret), kept_layers=json.dumps(kept),
                profile=json.dumps(dict(profile), sort_keys=True), name=name[:200], registered_at=now, last_seen=now))
        log.info("registered client", extra={"client": client_id, "depth": len(kept), "client_name": name})
        return client_id, f"{client_id}.{secret}"

    def authenticate(self, token: str) -> str | None:
        """The client id a bearer token belongs to, or None (constant-time comparison of salted hashes)."""
        client_id, _, secret = token.partition(".")
        if not client_id or not secret:
            return None
        with self.store.read() as conn:
            row = conn.execute(select(clients.c.token_salt, clients.c.token_hash)
                               .where(clients.c.id == client_id)).first()
        if row is None or not hmac.compare_digest(row.token_hash, _hash_token(row.token_salt, secret)):
            return None
        return client_id

    def client_layers(self, conn: Connection, client_id: str) -> tuple[int, ...]:
        row = conn.execute(select(clients.c.kept_layers).where(clients.c.id == client_id)).first()
        if row is None:
            raise FederationError("unknown_client", f"client {client_id} is not registered")
        return tuple(json.loads(row.kept_layers))

    # ---- tasks ------------------------------------------------------------------------------------------------
    def pull_task(self, client_id: str) -> TaskInfo:
        now = self.clock()
        with self.store.write() as conn:
            conn.execute(update(clients).where(clients.c.id == client_id).values(last_seen=now))
        retry = self.config.retry_after_s
        with self.store.read() as conn:
            latest = conn.execute(select(rounds).order_by(rounds.c.id.desc()).limit(1)).first()
            if latest is None:
                return TaskInfo(WAIT, retry_after_s=retry, reason="waiting for enough clients to open round 1")
            if latest.state in (CLOSED, FAILED):
                if latest.id >= self.config.rounds:
                    return TaskInfo(DONE, round=latest.id, global_version=self._latest_version(conn),
                                    reason=f"all {self.config.rounds} rounds finished")
                return TaskInfo(WAIT, retry_after_s=retry, reason=f"round {latest.id + 1} not open yet")
            if latest.state == CLOSING:
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry, reason=f"round {latest.id} is closing")
            if client_id not in json.loads(latest.sampled):
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry,
                                reason=f"not sampled for round {latest.id}")
            done = conn.execute(select(uploads.c.id).where(uploads.c.round == latest.id,
                                                           uploads.c.client_id == client_id)).first()
            if done:
                return TaskInfo(WAIT, round=latest.id, retry_after_s=retry,
                                reason=f"update for round {latest.id} already accepted")
            return TaskInfo(TASK, round=latest.id, global_version=latest.base_version, deadline=latest.deadline)

    # ---- uploads ----------------------------------------------------------------------------------------------
    def check_upload(self, client_id: str, header: UploadHeaderInfo) -> None:
        """Cheap checks before any byte is received: the round is open and the client was sampled for it."""
        with self.store.read() as conn:
            registered = self.client_layers(conn, client_id)
            self._check_round(conn, client_id, header.round)
        if tuple(header.kept_layers) != registered:
            raise FederationError("wrong_layers", f"kept_layers {list(header.kept_layers)} differ from the "
                                                  f"registered {list(registered)}")
        if header.num_examples < 1:
            raise FederationError("bad_num_examples", f"num_examples must be >= 1, got {header.num_examples}")

    def _check_round(self, conn: Connection, client_id: str, round_id: int):
        row = conn.execute(select(rounds).where(rounds.c.id == round_id)).first()
        if row is None:
            current = conn.execute(select(func.max(rounds.c.id))).scalar()
            raise FederationError("stale_round", f"round {round_id} does not exist (current round is {current})")
        if row.state != OPEN:
            raise FederationError("stale_round", f"round {round_id} is {row.state}, no longer accepting updates")
        if client_id not in json.loads(row.sampled):
            raise FederationError("not_sampled", f"client {client_id} was not sampled for round {round_id}")
        return row

    def accept_upload(self, client_id: str, header: UploadHeaderInfo, part_path: Path, sha256: str) -> UploadReceipt:
        """Validate a fully received update file and record it (exactly once per client and round).

        The same bytes again return the original receipt; different bytes for the same round are refused.
        """
        upload_id = hashlib.sha256(f"{header.round}:{client_id}:{sha256}".encode()).hexdigest()[:32]
        with self.store.read() as conn:
            existing = conn.execute(select(uploads).where(uploads.c.round == header.round,
                                                          uploads.c.client_id == client_id)).first()
        started = time.perf_counter()
        if existing is None:
            self._validate_file(client_id, header, part_path)
            # rename + directory fsync outside the write lock; if the insert below loses a race the blob is an
            # unreferenced, content-addressed file (harmless)
            blob = self.store.blobs.adopt(part_path, sha256)
        validated = time.perf_counter()
        with self.store.write() as conn:
            existing = conn.execute(select(uploads).where(uploads.c.round == header.round,
                                                          uploads.c.client_id == client_id)).first()
            if existing is not None:
                if existing.sha256 == sha256:
                    return UploadReceipt(existing.id, sha256, header.round, duplicate=True)
                raise FederationError("upload_conflict", f"client {client_id} already uploaded different bytes for "
                                                         f"round {header.round} (sha256 {existing.sha256[:12]}…)")
            self._check_round(conn, client_id, header.round)
            conn.execute(insert(uploads).values(
                id=upload_id, round=header.round, client_id=client_id, sha256=sha256, bytes=header.total_bytes,
                num_examples=header.num_examples, blob=blob, accepted_at=self.clock()))
        log.info("accepted update", extra={"client": client_id, "round": header.round, "sha256": sha256,
                                           "bytes": header.total_bytes, "num_examples": header.num_examples,
                                           "validate_s": round(validated - started, 4),
                                           "commit_s": round(time.perf_counter() - validated, 4)})
        return UploadReceipt(upload_id, sha256, header.round)

    def _validate_file(self, client_id: str, header: UploadHeaderInfo, path: Path) -> None:
        from aggregator.core.validate import UpdateRejected, validate_update
        from prufed.common.adapter_format import DELTA_FORMAT, AdapterFormatError, load_adapter

        try:
            actual = safetensors_index(path)
            tensors, meta = load_adapter(path)
        except (AdapterFormatError, SafetensorsHeaderError) as exc:
            raise FederationError("bad_format", f"update is not a readable adapter file: {exc}") from exc
        declared = tuple(sorted(header.tensors))
        if declared != actual:
            diff = sorted(set(declared) ^ set(actual))[:3]
            raise FederationError("index_mismatch", f"declared tensor index does not match the file, e.g. {diff}")
        if meta.format != DELTA_FORMAT:
            raise FederationError("bad_format", f"update format is {meta.format!r}, expected {DELTA_FORMAT!r}")
        if meta.round != header.round or meta.num_examples != header.num_examples \
                or tuple(meta.kept_layers) != tuple(header.kept_layers):
            raise FederationError("meta_mismatch", "file metadata (round, num_examples, kept_layers) "
                                                   f"{(meta.round, meta.num_examples, list(meta.kept_layers))} differs "
                                                   f"from the upload header")
        with self.store.read() as conn:
            base = conn.execute(select(rounds.c.base_version).where(rounds.c.id == header.round)).scalar_one()
        try:
            validate_update(tensors, kept_layers=header.kept_layers, global_state=self.global_state(base),
                            num_examples=header.num_examples)
        except UpdateRejected as exc:
            raise FederationError(exc.code, str(exc)) from exc

    # ---- rounds -----------------------------------------------------------------------------------------------
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
        with self.store.write() as conn:
            latest = conn.execute(select(rounds).order_by(rounds.c.id.desc()).limit(1)).first()
            if latest is None or latest.state in (CLOSED, FAILED):
                next_id = 1 if latest is None else latest.id + 1
                if next_id > cfg.rounds:
                    return []
                active = [r.id for r in conn.execute(select(clients.c.id)
                                                     .where(clients.c.last_seen >= now - cfg.active_window_s))]
                if len(active) < cfg.min_clients:
                    return []
                sampled = sample_clients(active, cfg.sample_size(len(active)), cfg.seed, next_id)
                conn.execute(insert(rounds).values(
                    id=next_id, state=OPEN, base_version=self._latest_version(conn), sampled=json.dumps(sampled),
                    deadline=now + cfg.deadline_s, extensions=0, created_at=now, reason="", metrics="{}"))
                log.info("opened round", extra={"round": next_id, "sampled": len(sampled), "active": len(active)})
                return []
            if latest.state == CLOSING:
                if latest.lease_until is not None and latest.lease_until < now and self._claim(conn, latest.id, now):
                    log.warning("re-running an abandoned close", extra={"round": latest.id})
                    return [latest.id]
                return []
            count = conn.execute(select(func.count()).select_from(uploads)
                                 .where(uploads.c.round == latest.id)).scalar_one()
            sampled = len(json.loads(latest.sampled))
            if count >= cfg.quorum(sampled):
                return [latest.id] if self._claim(conn, latest.id, now) else []
            if now < latest.deadline:
                return []
            if count >= cfg.min_updates:
                return [latest.id] if self._claim(conn, latest.id, now) else []
            if latest.extensions < cfg.max_extensions:
                conn.execute(update(rounds).where(rounds.c.id == latest.id, rounds.c.state == OPEN).values(
                    deadline=latest.deadline + cfg.deadline_s, extensions=latest.extensions + 1))
                log.warning("extended round deadline", extra={"round": latest.id, "updates": count,
                                                              "min_updates": cfg.min_updates,
                                                              "extension": latest.extensions + 1})
                return []
            reason = (f"deadline passed with {count} of {cfg.min_updates} required updates after "
                      f"{latest.extensions} extensions")
            conn.execute(update(rounds).where(rounds.c.id == latest.id, rounds.c.state == OPEN).values(
                state=FAILED, closed_at=now, reason=reason))
            log.error("round failed", extra={"round": latest.id, "reason": reason})
            return []

    def _claim(self, conn: Connection, round_id: int, now: float) -> bool:
        """Conditional UPDATE open|expired-closing -> closing: exactly one replica wins the close."""
        result = conn.execute(
            update(rounds)
            .where(rounds.c.id == round_id,
                   (rounds.c.state == OPEN) | ((rounds.c.state == CLOSING) & (rounds.c.lease_until < now)))
            .values(state=CLOSING, lease_until=now + self.config.close_lease_s))
        return result.rowcount == 1

    def _close(self, round_id: int) -> bool:
        """Aggregate the round's uploads into global version base+1 and mark the round closed (idempotent)."""
        from aggregator.core.heteagg import HeteAggregator
        from prufed.common.adapter_format import load_adapter

        started = time.perf_counter()
        with self.store.read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.id == round_id)).one()
            # content order (not client ids): the same uploads give the same float sums on any replica or rerun
            ups = conn.execute(select(uploads).where(uploads.c.round == round_id)
                               .order_by(uploads.c.sha256, uploads.c.client_id)).fetchall()
            params = self._meta(conn)
        aggregator = HeteAggregator(self.global_state(row.base_version), self.config.aggregation_config())
        examples = 0
        for up in ups:  # one upload in memory at a time
            tensors, _meta = load_adapter(self.store.blobs.path(up.blob))
            aggregator.add(tensors, up.num_examples, name=up.client_id)
            examples += up.num_examples
            del tensors
        result = aggregator.finish()
        blob = self._put_global(result.state, int(params["num_layers"]), params["base_model"], round_id)
        fault_point("mid_close")
        new_version = row.base_version + 1
        metrics = {"updates": len(ups), "examples": examples, "global_version": new_version, "sha256": blob,
                   "aggregation_s": round(time.perf_counter() - started, 4), "closed_by": self.replica,
                   "report": _jsonable(result.report), "layers_held": len(result.holders)}
        now = self.clock()
        with self.store.write() as conn:
            state = conn.execute(select(rounds.c.state).where(rounds.c.id == round_id)).scalar_one()
            if state != CLOSING:
                return False  # another replica finished it first (after our lease expired)
            if conn.execute(select(global_versions.c.version).where(global_versions.c.version == new_version)).first():
                log.warning("global version already written", extra={"round": round_id, "version": new_version})
            else:
                conn.execute(insert(global_versions).values(version=new_version, round=round_id, blob=blob,
                                                            sha256=blob, created_at=now))
            metrics["duration_s"] = round(now - row.created_at, 3)
            conn.execute(update(rounds).where(rounds.c.id == round_id, rounds.c.state == CLOSING).values(
                state=CLOSED, closed_at=now, lease_until=None, metrics=json.dumps(metrics, sort_keys=True)))
        log.info("closed round", extra={"round": round_id, "version": new_version, "updates": len(ups),
                                        "sha256": blob})
        if self.on_round_closed:
            self.on_round_closed(round_id, metrics)
        return True

    # ---- globals ----------------------------------------------------------------------------------------------
    def _put_global(self, state: Mapping, num_layers: int, base_model: str, round_id: int) -> str:
        from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta

        meta = AdapterMeta(GLOBAL_FORMAT, tuple(range(num_layers)), base_model, round_id, lora=self.config.lora())
        return self.store.blobs.put_bytes(canonical_safetensors(state, meta.to_strings()))

    def _latest_version(self, conn: Connection) -> int:
        return int(conn.execute(select(func.max(global_versions.c.version))).scalar() or 0)

    def latest_version(self) -> int:
        with self.store.read() as conn:
            return self._latest_version(conn)

    def _version_row(self, version: int | None):
        with self.store.read() as conn:
            version = self._latest_version(conn) if version is None else version
            row = conn.execute(select(global_versions).where(global_versions.c.version == version)).first()
        if row is None:
            raise FederationError("no_version", f"global version {version} does not exist")
        return row

    def global_state(self, version: int | None = None) -> dict:
        from prufed.common.adapter_format import load_adapter

        row = self._version_row(version)
        return self._globals.get(row.sha256, lambda: load_adapter(self.store.blobs.path(row.blob))[0])

    def global_slice(self, kept_layers: Sequence[int], version: int | None = None) -> tuple[int, int, bytes]:
        """(version, round, safetensors bytes) of global `version` restricted to `kept_layers` (ORIGINAL keys)."""
        from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta
        from prufed.common.adapter_keys import keys_for_layers

        row = self._version_row(version)
        kept = tuple(int(i) for i in kept_layers)

        def build() -> bytes:
            state = self.global_state(row.version)
            base_model = self.federation_params()["base_model"]
            meta = AdapterMeta(GLOBAL_FORMAT, kept, base_model, row.round, lora=self.config.lora())
            return canonical_safetensors({k: state[k] for k in keys_for_layers(state, kept)}, meta.to_strings())

        return row.version, row.round, self._slices.get((row.sha256, kept), build)

    # ---- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return read_status(self.store, self.config.rounds)


def read_status(store: Store, rounds_total: int | None = None) -> dict:
    """Federation state straight from the database (no server needed)."""
    with store.read() as conn:
        meta = {row.key: row.value for row in conn.execute(select(federation))}
        if rounds_total is None:
            rounds_total = int(json.loads(meta.get("config", "{}")).get("rounds", 0))
        version = int(conn.execute(select(func.max(global_versions.c.version))).scalar() or 0)
        counts = dict(conn.execute(select(uploads.c.round, func.count()).group_by(uploads.c.round)).all())
        round_rows = conn.execute(select(rounds).order_by(rounds.c.id)).fetchall()
        depths: dict[int, int] = {}
        for row in conn.execute(select(clients.c.kept_layers)):
            depth = len(json.loads(row.kept_layers))
            depths[depth] = depths.get(depth, 0) + 1
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
                    "reason": r.reason, "metrics": json.loads(r.metrics)} for r in round_rows],
        "clients_per_depth": dict(sorted(depths.items())),
        "last_metrics": json.loads(closed[-1].metrics) if closed else {},
    }


def _jsonable(value):
    """Reports may hold tensors or tuples; keep what JSON can carry."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (TypeError, ValueError):
        return str(value)
