"""Global adapter versions: write version 0, store each new version as a blob, serve full states and slices.

A version's bytes never change, so the process caches them in bounded LRUs keyed by sha256 and stays stateless.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.state import Store
from prufed.common.errors import ConfigError
from prufed.common.refusals import RefusalCode, Refused
from prufed.common.wire import canonical_safetensors

log = logging.getLogger("prufed.aggregator")


@dataclass
class _LRU:
    """Bounded LRU for immutable values."""

    capacity: int = 4
    items: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
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


def _per_group(mode: str) -> bool:
    from aggregator.core.modes import is_group_mode

    return is_group_mode(mode)


class Globals:
    """The federation's global adapter versions over the store."""

    def __init__(self, store: Store, config: AggregatorConfig, clock: Callable[[], float]):
        self.store = store
        self.config = config
        self.clock = clock
        self._states = _LRU()
        self._slices = _LRU(capacity=16)

    def initialize(self, model_dir: Path) -> int:
        """Record the base model and write global version 0 if absent (idempotent). Returns the latest version."""
        from prufed.common.models import fingerprint_model_dir, read_model_config

        model_config = read_model_config(Path(model_dir))
        fingerprint = fingerprint_model_dir(Path(model_dir))
        num_layers = int(model_config["num_hidden_layers"])
        lora = json.dumps(self.config.lora(), sort_keys=True)
        with self.store.read() as tx:
            meta = tx.meta()
            has_v0 = tx.version_row(0) is not None
        if meta.get("base_model") not in (None, fingerprint):
            raise ConfigError("--model", f"the database was created for base model {meta['base_model']}, "
                                         f"this model is {fingerprint}")
        created_mode = json.loads(meta.get("config", "{}")).get("mode", "heteagg")
        if meta and _per_group(created_mode) != self.config.per_group:
            # the shared global of a per-group version is only the start of new groups, not a trained model
            raise ConfigError("--mode", f"the database was created with mode {created_mode}, this server asks "
                                        f"{self.config.mode}: one-global and per-group modes do not share a database")
        if meta.get("lora") not in (None, lora):
            raise ConfigError("lora_r", f"the database was created with LoRA {meta['lora']}, config asks "
                                        f"{self.config.lora()}")
        blob = None
        if not has_v0:
            from aggregator.core.init_adapter import initial_global_adapter

            state = initial_global_adapter(model_config, self.config.lora_r, self.config.lora_alpha,
                                           tuple(self.config.lora_targets), self.config.seed)
            blob = self.put(state, num_layers, fingerprint, round_id=0)
        with self.store.write() as tx:
            if not tx.meta():
                tx.insert_meta({"base_model": fingerprint, "num_layers": str(num_layers), "lora": lora,
                                "config": json.dumps(self.config.to_dict(), sort_keys=True)})
            if blob and tx.version_row(0) is None:
                tx.insert_version(0, 0, blob, self.clock())
                log.info("wrote initial global adapter", extra={"version": 0, "sha256": blob})
        return self.latest_version()

    def params(self) -> dict:
        """{"base_model": fingerprint, "num_layers": n} of the federation."""
        with self.store.read() as tx:
            meta = tx.meta()
        return {"base_model": meta.get("base_model", ""), "num_layers": int(meta.get("num_layers", 0))}

    def put(self, state: Mapping, num_layers: int, base_model: str, round_id: int) -> str:
        """Write a full global state as a canonical safetensors blob; returns its ref (sha256)."""
        from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta

        meta = AdapterMeta(GLOBAL_FORMAT, tuple(range(num_layers)), base_model, round_id, lora=self.config.lora())
        return self.store.blobs.put_bytes(canonical_safetensors(state, meta.to_strings()))

    def latest_version(self) -> int:
        with self.store.read() as tx:
            return tx.latest_version()

    def version_row(self, version: int | None = None) -> Any:
        """The global_versions row of `version` (None: latest), or `no_version`."""
        with self.store.read() as tx:
            row = tx.version_row(version)
        if row is None:
            raise Refused(RefusalCode.NO_VERSION, f"global version {version} does not exist")
        return row

    def state(self, version: int | None = None, group: Sequence[int] | None = None) -> dict:
        """The full global adapter of `version` (None: latest), ORIGINAL keys. With `group` (a kept-layer list) in
        a per-group mode: that group's global (the version's shared global while the group has none)."""
        row = self.version_row(version)
        return self.blob_state(self.group_blob(row.version, group) or row.blob)

    def blob_state(self, blob: str) -> dict:
        """The tensors of a global blob (cached: a blob's bytes never change)."""
        return self._states.get(blob, lambda: self.store.blobs.load(blob)[0])

    def group_blob(self, version: int, group: Sequence[int] | None) -> str | None:
        """The blob of `group`'s own global at `version` (per-group modes), or None."""
        if group is None or not self.config.per_group:
            return None
        with self.store.read() as tx:
            return tx.group_global(version, group)

    def slice(self, kept_layers: Sequence[int], version: int | None = None) -> tuple[int, int, bytes]:
        """(version, round, safetensors bytes) of global `version` restricted to `kept_layers` (ORIGINAL keys)."""
        from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta
        from prufed.common.adapter_keys import keys_for_layers

        row = self.version_row(version)
        kept = tuple(int(i) for i in kept_layers)
        blob = self.group_blob(row.version, kept) or row.blob  # per-group modes: the caller's group's global

        def build() -> bytes:
            state = self.blob_state(blob)
            meta = AdapterMeta(GLOBAL_FORMAT, kept, self.params()["base_model"], row.round, lora=self.config.lora())
            return canonical_safetensors({k: state[k] for k in keys_for_layers(state, kept)}, meta.to_strings())

        return row.version, row.round, self._slices.get((blob, kept), build)
