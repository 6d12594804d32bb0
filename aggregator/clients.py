"""Client registration and bearer-token authentication.

A client registers once with an enrolment token and gets `<client_id>.<secret>`; only sha256(salt:secret) is
stored, and later calls are checked by a constant-time comparison of salted hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence

from aggregator.state import Store, Tx
from prufed.common.refusals import RefusalCode, Refused

log = logging.getLogger("prufed.aggregator")


def _hash_token(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


class Clients:
    """Register, authenticate and look up clients."""

    def __init__(self, store: Store, clock: Callable[[], float]):
        self.store = store
        self.clock = clock

    def register(self, kept_layers: Sequence[int], profile: Mapping, *, name: str = "",
                 base_model: str = "") -> tuple[str, str]:
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
            tx.insert_client(client_id, salt, _hash_token(salt, secret), kept,
                             json.dumps(dict(profile), sort_keys=True), name[:200], self.clock())
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

    @staticmethod
    def layers(tx: Tx, client_id: str) -> tuple[int, ...]:
        """The kept layers a client registered, or `unknown_client`."""
        kept = tx.client_layers(client_id)
        if kept is None:
            raise Refused(RefusalCode.UNKNOWN_CLIENT, f"client {client_id} is not registered")
        return kept
