"""Client registration and bearer-token authentication.

A client registers once with an enrolment token and gets `<client_id>.<secret>`; only sha256(salt:secret) is
stored, and later calls are checked by a constant-time comparison of salted hashes. Registration is bounded:
token-bucket rate limits per enrolment token and per peer address, a cap on the number of clients, and size /
depth caps on the name and profile. Under mTLS the client certificate's sha256 is bound to the client id at
registration and every later call must present the same certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from aggregator.config import AggregatorConfig
from aggregator.state import Store, Tx
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import loads_bounded

log = logging.getLogger("prufed.aggregator")


def _hash_token(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


class RateLimiter:
    """Token buckets by key: `burst` calls at once, refilled at `per_min` per minute."""

    def __init__(self, burst: int, per_min: float, clock: Callable[[], float]):
        self.burst = burst
        self.rate = per_min / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # full buckets carry no state: forget them
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
            return True


@dataclass(frozen=True)
class Enrolment:
    """A decoded Register call."""

    kept_layers: tuple[int, ...]
    profile_json: str
    summary: dict
    name: str = ""
    base_model: str = ""
    enroll_token: str = ""
    peer: str = ""
    cert_sha256: str | None = None


def peer_host(peer: str) -> str:
    """gRPC's peer string without the port: 'ipv4:127.0.0.1:5555' -> 'ipv4:127.0.0.1'."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class Clients:
    """Register, authenticate and look up clients."""

    def __init__(self, store: Store, config: AggregatorConfig, clock: Callable[[], float]):
        self.store = store
        self.config = config
        self.clock = clock
        self._limiter = RateLimiter(config.register_burst, config.register_per_min, clock)

    def enrol(self, request: Enrolment) -> tuple[str, str]:
        """A Register call: rate limits, size and shape checks of the profile, then `register`."""
        cfg = self.config
        token_key = "token:" + hashlib.sha256(request.enroll_token.encode()).hexdigest()[:16]
        for key, what in ((token_key, "enrolment token"), ("peer:" + peer_host(request.peer), "peer address")):
            if not self._limiter.allow(key):
                raise Refused(RefusalCode.RATE_LIMITED, f"too many Register calls from this {what} (register_burst "
                                                        f"{cfg.register_burst}, register_per_min "
                                                        f"{cfg.register_per_min:g}); retry later")
        if len(request.name) > cfg.max_name_chars:
            raise Refused(RefusalCode.BAD_PROFILE, f"name has {len(request.name)} characters, more than "
                                                   f"max_name_chars ({cfg.max_name_chars})")
        size = len(request.profile_json.encode())
        if size > cfg.max_profile_bytes:
            raise Refused(RefusalCode.BAD_PROFILE, f"hardware.profile_json has {size} bytes, more than "
                                                   f"max_profile_bytes ({cfg.max_profile_bytes})")
        try:
            profile = loads_bounded(request.profile_json, cfg.max_profile_depth) if request.profile_json else {}
        except ValueError as exc:
            raise Refused(RefusalCode.BAD_PROFILE, f"hardware.profile_json is not valid JSON: "
                                                   f"{str(exc)[:200]}") from None
        if not isinstance(profile, dict):
            raise Refused(RefusalCode.BAD_PROFILE, f"hardware.profile_json must be a JSON object, got a "
                                                   f"{type(profile).__name__}")
        profile.setdefault("summary", request.summary)
        return self.register(request.kept_layers, profile, name=request.name, base_model=request.base_model,
                             cert_sha256=request.cert_sha256)

    def register(self, kept_layers: Sequence[int], profile: Mapping, *, name: str = "", base_model: str = "",
                 cert_sha256: str | None = None) -> tuple[str, str]:
        """Store a new client; returns (client_id, bearer token). Only the token's salted hash is kept."""
        with self.store.read() as tx:
            meta = tx.meta()
        fed_model, num_layers = meta.get("base_model", ""), int(meta.get("num_layers", 0))
        if base_model and base_model != fed_model:
            raise Refused(RefusalCode.BASE_MODEL_MISMATCH,
                          f"base_model {base_model} differs from the federation's {fed_model}")
        kept = [int(i) for i in kept_layers]
        if not kept:
            raise Refused(RefusalCode.BAD_KEPT_LAYERS, "kept_layers is empty")
        if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= num_layers:
            raise Refused(RefusalCode.BAD_KEPT_LAYERS, f"kept_layers must be strictly increasing indices in "
                                                       f"[0, {num_layers}), got {kept}")
        client_id = uuid.uuid4().hex[:16]
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self.store.write() as tx:
            if tx.count_clients() >= self.config.max_clients:
                raise Refused(RefusalCode.TOO_MANY_CLIENTS, f"the federation already has max_clients "
                                                            f"({self.config.max_clients}) registered clients")
            tx.insert_client(client_id, salt, _hash_token(salt, secret), kept,
                             json.dumps(dict(profile), sort_keys=True), name, self.clock(), cert_sha256)
        log.info("registered client", extra={"client": client_id, "depth": len(kept), "client_name": name})
        return client_id, f"{client_id}.{secret}"

    def authenticate(self, token: str) -> str | None:
        """The client id a bearer token belongs to, or None (constant-time comparison of salted hashes)."""
        client_id, _, secret = token.partition(".")
        if not client_id or not secret:
            return None
        with self.store.read() as tx:
            row = tx.client_credentials(client_id)
        if row is None or not hmac.compare_digest(row.token_hash, _hash_token(row.token_salt, secret)):
            return None
        return client_id

    def check_cert(self, client_id: str, cert_sha256: str | None) -> None:
        """Under mTLS: the presented certificate must be the one the client registered with."""
        with self.store.read() as tx:
            bound = tx.client_cert(client_id)
        if bound is None or cert_sha256 is None or not hmac.compare_digest(bound, cert_sha256):
            shown = cert_sha256[:16] + "…" if cert_sha256 else "none"
            raise Refused(RefusalCode.CERT_MISMATCH, f"the client certificate (sha256 {shown}) is not the one "
                                                     f"client {client_id} registered with")

    @staticmethod
    def layers(tx: Tx, client_id: str) -> tuple[int, ...]:
        """The kept layers a client registered, or `unknown_client`."""
        kept = tx.client_layers(client_id)
        if kept is None:
            raise Refused(RefusalCode.UNKNOWN_CLIENT, f"client {client_id} is not registered")
        return kept
