"""Aggregator configuration: one frozen dataclass, loaded from `--config aggregator.yaml` plus CLI overrides.

Every field is validated in `__post_init__`; a bad value raises `ConfigError` naming the YAML field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prufed.common.errors import ConfigError
from prufed.common.wire import CHUNK_CAP_BYTES, DEFAULT_CHUNK_BYTES

NULLABLE = frozenset({"clip_norm", "adaptive_clip"})
"""Fields whose YAML value may be null (off)."""


@dataclass(frozen=True)
class AggregatorConfig:
    """Federation parameters. Times are seconds, sizes bytes unless the name says MiB."""

    rounds: int = 3
    """Number of federated rounds; after the last one PullTask answers DONE."""
    clients_fraction: float = 1.0
    """Fraction of active clients sampled per round (ceil), never fewer than `min_clients`."""
    min_clients: int = 2
    """A round opens only when this many clients are active, and samples at least this many."""
    quorum_fraction: float = 1.0
    """The round closes as soon as ceil(quorum_fraction × sampled) updates are accepted."""
    min_updates: int = 1
    """At the deadline the round closes if it holds at least this many updates, else it is extended or failed."""
    deadline_s: float = 600.0
    """Seconds from opening to the deadline (each extension adds the same again)."""
    max_extensions: int = 2
    """Deadline extensions before a round without `min_updates` is marked failed."""
    active_window_s: float = 300.0
    """Liveness window: rounds sample only clients that called (Register, PullTask, ...) within this many seconds,
    so clients that never come back do not stall a round. Waiting agents poll every `retry_after_s`."""
    seed: int = 0
    """Federation seed: client sampling (with the round id) and the initial adapter."""
    close_lease_s: float = 60.0
    """A replica that claimed a round close owns it this long; after that a restarted replica re-runs it."""
    retry_after_s: float = 2.0
    """WAIT answers ask clients to come back after this many seconds."""
    weighting: str = "examples"
    mode: str = "heteagg"
    """Aggregation mode (aggregator/core/modes.py): heteagg | fedavg (one global) or fedavg-group | mixed | additive
    (one global per depth group: clients with the same kept-layer list)."""
    mix: float | str | None = None
    """mixed: λ in [0, 1]; additive: μ >= 0; or "auto" (the default for those modes). Other modes take none."""
    space: str = "factors"
    server_lr: float = 1.0
    clip_norm: float | None = None
    trim_fraction: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    max_steps: int = 20
    """Local optimiser steps per round, handed to clients in PullTask."""
    lr: float = 2e-4
    batch_size: int = 2
    seq_len: int = 256
    chunk_size: int = DEFAULT_CHUNK_BYTES
    """Bytes per DownloadGlobal chunk (and the size suggested to uploaders); at most 4 MiB."""
    max_upload_mib: float = 256.0
    """Largest declared upload accepted, checked before any byte is buffered."""
    # ---- poisoning (F1): see aggregator/core/poisoning.py for the formulas ----
    max_num_examples: int = 1_000_000
    """Largest num_examples an upload may declare (at most 2^31 − 1, the portable SQL INTEGER range)."""
    max_client_share: float = 0.5
    """No client carries more than this share of a round's total weight (water-filling cap)."""
    adaptive_clip: float | None = 3.0
    """Each update's L2 norm is clipped to adaptive_clip × the round's lower-median update norm (null: off)."""
    max_step_ratio: float = 10.0
    """A round's result is published only if finite and ‖G' − G‖₂ ≤ max_step_ratio × max(‖G‖₂, 1)."""
    # ---- blobs (F2) ----
    blob_sweep_interval_s: float = 600.0
    """Every this many seconds (and at start-up) blobs that no row references are deleted."""
    blob_sweep_grace_s: float = 300.0
    """Blobs younger than this are never swept (an upload may be between its blob rename and its row insert)."""
    # ---- resources (F3) ----
    max_concurrent_uploads: int = 16
    """UploadUpdate streams open at once on this server; more are refused UNAVAILABLE (retry later)."""
    max_uploads_per_client: int = 2
    """UploadUpdate streams one client may have open at once; more are refused RESOURCE_EXHAUSTED."""
    control_workers: int = 16
    """RPC threads kept beyond max_concurrent_uploads, so PullTask/Health/Register/DownloadGlobal always run."""
    stream_idle_s: float = 30.0
    """An upload stream that sends nothing for this long is cancelled (DEADLINE_EXCEEDED), its partial file removed."""
    upload_deadline_s: float = 600.0
    """Overall time limit of one upload stream, from its first message."""
    keepalive_time_s: float = 60.0
    """The server pings an idle connection this often to detect dead peers."""
    keepalive_timeout_s: float = 20.0
    """A connection whose keepalive ping is unanswered for this long is closed."""
    max_connection_idle_s: float = 900.0
    """A connection with no RPC for this long is closed (clients reconnect transparently)."""
    max_connection_age_s: float = 3600.0
    """Connections are recycled after this long (in-flight calls get upload_deadline_s of grace)."""
    # ---- registration (F5) ----
    max_clients: int = 10_000
    """Registered clients at most; further Register calls are refused RESOURCE_EXHAUSTED."""
    register_burst: int = 20
    """Register calls allowed at once per enrolment token and per peer address (token bucket size)."""
    register_per_min: float = 6.0
    """Sustained Register rate per enrolment token and per peer address (token bucket refill)."""
    max_profile_bytes: int = 65536
    """Largest Register profile_json, in bytes."""
    max_profile_depth: int = 8
    """Deepest nesting of objects/lists allowed in profile_json."""
    max_name_chars: int = 200
    """Longest Register name."""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, problem: str) -> None:
            if not ok:
                raise ConfigError(name, problem)

        need(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        need(0.0 < self.clients_fraction <= 1.0, "clients_fraction", f"must be in (0, 1], got {self.clients_fraction}")
        need(self.min_clients >= 1, "min_clients", f"must be >= 1, got {self.min_clients}")
        need(0.0 < self.quorum_fraction <= 1.0, "quorum_fraction", f"must be in (0, 1], got {self.quorum_fraction}")
        need(self.min_updates >= 1, "min_updates", f"must be >= 1, got {self.min_updates}")
        need(self.deadline_s > 0, "deadline_s", f"must be > 0, got {self.deadline_s}")
        need(self.max_extensions >= 0, "max_extensions", f"must be >= 0, got {self.max_extensions}")
        need(self.active_window_s > 0, "active_window_s", f"must be > 0, got {self.active_window_s}")
        need(self.close_lease_s > 0, "close_lease_s", f"must be > 0, got {self.close_lease_s}")
        need(self.retry_after_s > 0, "retry_after_s", f"must be > 0, got {self.retry_after_s}")
        need(self.weighting in ("examples", "uniform"), "weighting", f"must be examples|uniform, got {self.weighting!r}")
        from aggregator.core.modes import check_mode

        object.__setattr__(self, "mix", check_mode(self.mode, self.mix))
        need(not self.per_group or (self.space == "factors" and self.trim_fraction == 0), "mode",
             f"--mode {self.mode} needs space: factors and trim_fraction: 0 (got {self.space}, {self.trim_fraction})")
        need(self.space in ("factors", "product"), "space", f"must be factors|product, got {self.space!r}")
        need(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        need(self.clip_norm is None or self.clip_norm > 0, "clip_norm", f"must be > 0 or null, got {self.clip_norm}")
        need(0.0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        need(self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        need(len(self.lora_targets) > 0 and all(isinstance(t, str) and t for t in self.lora_targets),
             "lora_targets", f"must be a non-empty list of module names, got {self.lora_targets!r}")
        need(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        need(1024 <= self.chunk_size <= CHUNK_CAP_BYTES, "chunk_size",
             f"must be in [1024, {CHUNK_CAP_BYTES}] bytes, got {self.chunk_size}")
        need(0 < self.max_upload_mib < 2048, "max_upload_mib",
             f"must be in (0, 2048) (the portable SQL INTEGER range), got {self.max_upload_mib}")
        need(1 <= self.max_num_examples <= 2**31 - 1, "max_num_examples",
             f"must be in [1, 2^31 - 1], got {self.max_num_examples}")
        need(0.0 < self.max_client_share <= 1.0, "max_client_share", f"must be in (0, 1], got {self.max_client_share}")
        need(self.adaptive_clip is None or self.adaptive_clip >= 1.0, "adaptive_clip",
             f"must be >= 1 (a multiple of the median norm) or null, got {self.adaptive_clip}")
        need(self.max_step_ratio > 0, "max_step_ratio", f"must be > 0, got {self.max_step_ratio}")
        for name in ("blob_sweep_interval_s", "blob_sweep_grace_s", "stream_idle_s", "upload_deadline_s",
                     "keepalive_time_s", "keepalive_timeout_s", "max_connection_idle_s", "max_connection_age_s",
                     "register_per_min"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_concurrent_uploads", "max_uploads_per_client", "control_workers", "max_clients",
                     "register_burst", "max_profile_bytes", "max_profile_depth", "max_name_chars"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(self.max_name_chars <= 200, "max_name_chars", f"must be <= 200 (the column size), got {self.max_name_chars}")
        need(self.max_uploads_per_client <= self.max_concurrent_uploads, "max_uploads_per_client",
             f"must be <= max_concurrent_uploads ({self.max_concurrent_uploads}), got {self.max_uploads_per_client}")

    @property
    def per_group(self) -> bool:
        """True when the mode keeps one global per depth group."""
        from aggregator.core.modes import is_group_mode

        return is_group_mode(self.mode)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mib * 1024 * 1024)

    def sample_size(self, active: int) -> int:
        """Clients sampled from `active`: max(min_clients, ceil(fraction × active)), capped at `active`."""
        return min(active, max(self.min_clients, math.ceil(self.clients_fraction * active)))

    def quorum(self, sampled: int) -> int:
        """Accepted updates that close a round early: ceil(quorum_fraction × sampled), at least 1."""
        return max(1, math.ceil(self.quorum_fraction * sampled))

    def aggregation_config(self):
        """The HeteAgg options as `aggregator.core.heteagg.AggregationConfig`."""
        from aggregator.core.heteagg import AggregationConfig
        from aggregator.core.modes import is_group_mode

        # the per-group aggregators take their mode from their class; their inner sums are HeteAgg's
        mode = "heteagg" if is_group_mode(self.mode) else self.mode
        return AggregationConfig(weighting=self.weighting, mode=mode, space=self.space, server_lr=self.server_lr,
                                 clip_norm=self.clip_norm, trim_fraction=self.trim_fraction)

    def lora(self) -> dict:
        return {"r": self.lora_r, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extra")
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> AggregatorConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field in {source} (known: {', '.join(sorted(known))})")
        values = dict(data)
        if "lora_targets" in values:
            targets = values["lora_targets"]
            values["lora_targets"] = tuple(targets.split(",") if isinstance(targets, str) else targets)
        for name, value in values.items():
            default = getattr(cls, name, None)
            if value is None and name in NULLABLE:
                continue
            if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
                raise ConfigError(name, f"must be a number, got {value!r}")
        return cls(**values)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> AggregatorConfig:
    """Read `aggregator.yaml` (a flat mapping of field: value) and apply CLI overrides (None values ignored)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"{path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{path}: must be a mapping of field: value")
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return AggregatorConfig.from_mapping(data, source=str(path) if path else "config")
