"""Device descriptions (pure): what the edge agent runs on, probed (`HardwareSpec`) or declared (`HardwareProfile`).

A `HardwareProfile` is one `hardware_profiles/*.yaml` device class, validated here from its parsed mapping so the
checks need no I/O. `spec_from_profile` turns a profile into the `HardwareSpec` a real probe would return on that
device, which is how the simulation emulates a Jetson on a laptop.

Memory budget (bytes) = available_memory_bytes × budget_fraction. For a probe, "available" is what is free now;
for a profile it is `memory_gib` × `available_fraction` (default 1: the profile's `budget_fraction` already leaves
room for the OS and, on unified memory, for the CPU side of the process).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_client.core.memory import QUANT_MODES
from prufed.common.errors import ConfigError

ACCELERATORS = ("cuda", "cpu")
GIB = 2**30
#: Fraction of the *currently free* memory a probed device may use: free memory is already net of the OS.
PROBE_BUDGET_FRACTION = 0.9
#: Every figure in a profile must cite where it came from (`sources:` in the YAML).
PROFILE_FIGURES = ("memory_gib", "unified_memory", "system_ram_gib", "compute_capability", "bnb_4bit",
                   "budget_fraction")
_PROFILE_FIELDS = ("name", "description", "accelerator", *PROFILE_FIGURES, "default_quant", "sources")


@dataclass(frozen=True)
class HardwareSpec:
    """One device as the planner sees it. Byte counts are bytes; `budget_bytes` is what training may use.

    For a discrete GPU, total/available are VRAM (torch.cuda.mem_get_info); for a CPU or a unified-memory device
    (Jetson) they are system RAM. Optional sensor fields are None when the sensor is absent or failed.
    """

    name: str
    total_memory_bytes: int
    available_memory_bytes: int
    unified_memory: bool
    accelerator: str  #: "cuda" | "cpu"
    compute_capability: str | None
    bnb_4bit: bool  #: bitsandbytes 4-bit kernels usable here
    budget_fraction: float = PROBE_BUDGET_FRACTION
    cpu_bf16: bool | None = None  #: the CPU multiplies bf16 natively (AMX / AVX512-BF16); None = unknown (a profile)
    default_quant: str = "nf4"
    system_ram_bytes: int | None = None
    system_available_bytes: int | None = None
    cpu_count: int | None = None
    cpu_freq_mhz: float | None = None
    battery_percent: float | None = None
    power_plugged: bool | None = None
    temperatures_c: dict[str, float] | None = None  #: sensor label -> current °C
    gpu_name: str | None = None
    jetson_model: str | None = None  #: /proc/device-tree/model on a Jetson
    l4t_release: str | None = None  #: e.g. "R36.3.0" from /etc/nv_tegra_release
    nearest_profile: str | None = None
    source: str = "probe"  #: "probe" or "profile:<name>"

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ConfigError("accelerator", f"must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        if self.total_memory_bytes < 0 or self.available_memory_bytes < 0:
            raise ConfigError("memory", f"byte counts must be >= 0, got total={self.total_memory_bytes} "
                              f"available={self.available_memory_bytes}")
        if not 0 < self.budget_fraction <= 1:
            raise ConfigError("budget_fraction", f"must be in (0, 1], got {self.budget_fraction}")
        if self.default_quant not in QUANT_MODES:
            raise ConfigError("default_quant", f"must be one of {', '.join(QUANT_MODES)}, got {self.default_quant!r}")

    @property
    def budget_bytes(self) -> int:
        """available_memory_bytes × budget_fraction, rounded down."""
        return int(self.available_memory_bytes * self.budget_fraction)

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget_bytes"] = self.budget_bytes
        return data


@dataclass(frozen=True)
class HardwareProfile:
    """A device class from `hardware_profiles/<name>.yaml`; `origin` (the file) prefixes every error message."""

    name: str
    description: str
    accelerator: str
    memory_gib: float  #: memory usable for the model: VRAM (discrete GPU) or total RAM (unified / CPU)
    unified_memory: bool
    system_ram_gib: float
    compute_capability: str | None
    bnb_4bit: bool
    default_quant: str
    budget_fraction: float
    sources: dict[str, str] = field(default_factory=dict)
    origin: str = ""

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ConfigError(f"{self.origin or self.name} field {name!r}", problem)

        if not isinstance(self.name, str) or not self.name.strip():
            fail("name", f"must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str) or not self.description.strip():
            fail("description", "must be a non-empty string")
        if self.accelerator not in ACCELERATORS:
            fail("accelerator", f"must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        for name in ("memory_gib", "system_ram_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(name, f"must be a positive number of GiB, got {value!r}")
        for name in ("unified_memory", "bnb_4bit"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be true or false, got {getattr(self, name)!r}")
        capability = self.compute_capability
        if self.accelerator == "cuda":
            if not _is_capability(capability):
                fail("compute_capability", f"must be a CUDA capability such as \"8.7\" for a cuda device, "
                     f"got {capability!r}")
        elif capability is not None:
            fail("compute_capability", f"must be null for a cpu device, got {capability!r}")
        if self.unified_memory and self.memory_gib > self.system_ram_gib:
            fail("memory_gib", f"a unified-memory device cannot use more than system_ram_gib "
                 f"({self.system_ram_gib}), got {self.memory_gib}")
        if self.default_quant not in QUANT_MODES:
            fail("default_quant", f"must be one of {', '.join(QUANT_MODES)}, got {self.default_quant!r}")
        if self.default_quant in ("nf4", "int8") and not self.bnb_4bit:
            fail("default_quant", f"{self.default_quant} needs bitsandbytes, but bnb_4bit is false")
        fraction = self.budget_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            fail("budget_fraction", f"must be a number in (0, 1], got {fraction!r}")
        if not isinstance(self.sources, Mapping):
            fail("sources", "must map each figure to a source note")
        missing = [name for name in PROFILE_FIGURES
                   if not isinstance(self.sources.get(name), str) or not self.sources[name].strip()]
        if missing:
            fail("sources", f"needs a non-empty source note for {', '.join(missing)}")
        unknown = sorted(set(self.sources) - set(PROFILE_FIGURES) - {"default_quant"})
        if unknown:
            fail("sources", f"names unknown figure(s) {unknown}; figures are {', '.join(PROFILE_FIGURES)}")

    @classmethod
    def from_mapping(cls, data: object, origin: str = "") -> HardwareProfile:
        """Validate a parsed YAML document; unknown or missing fields are errors naming the field and `origin`."""
        where = origin or "hardware profile"
        if not isinstance(data, Mapping):
            raise ConfigError(where, f"must be a YAML mapping of fields, got {type(data).__name__}")
        missing = [name for name in _PROFILE_FIELDS if name not in data]
        if missing:
            raise ConfigError(f"{where} field {missing[0]!r}", f"is missing (required: {', '.join(_PROFILE_FIELDS)})")
        unknown = sorted(set(data) - set(_PROFILE_FIELDS))
        if unknown:
            raise ConfigError(f"{where} field {unknown[0]!r}", f"is not a known field ({', '.join(_PROFILE_FIELDS)})")
        values = {name: data[name] for name in _PROFILE_FIELDS}
        if isinstance(values["compute_capability"], (int, float)) and not isinstance(values["compute_capability"], bool):
            values["compute_capability"] = str(values["compute_capability"])  # YAML reads 8.7 as a float
        sources = values["sources"]
        if isinstance(sources, Mapping):
            values["sources"] = dict(sources)
        return cls(**values, origin=origin)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def budget_bytes(self) -> int:
        """memory_gib × budget_fraction in bytes: what a training run on this device class may use."""
        return int(self.memory_bytes * self.budget_fraction)


def spec_from_profile(profile: HardwareProfile, available_fraction: float = 1.0) -> HardwareSpec:
    """The `HardwareSpec` a probe would report on `profile`'s device with `available_fraction` of memory free."""
    if not 0 < available_fraction <= 1:
        raise ConfigError("available_fraction", f"must be in (0, 1], got {available_fraction}")
    total = profile.memory_bytes
    system = int(profile.system_ram_gib * GIB)
    return HardwareSpec(
        name=profile.description,
        total_memory_bytes=total,
        available_memory_bytes=int(total * available_fraction),
        unified_memory=profile.unified_memory,
        accelerator=profile.accelerator,
        compute_capability=profile.compute_capability,
        bnb_4bit=profile.bnb_4bit,
        budget_fraction=profile.budget_fraction,
        default_quant=profile.default_quant,
        system_ram_bytes=system,
        system_available_bytes=int(system * available_fraction),
        nearest_profile=profile.name,
        source=f"profile:{profile.name}",
    )


def nearest_profile(spec: HardwareSpec, profiles: Iterable[HardwareProfile]) -> str | None:
    """Name of the profile closest to `spec`: same accelerator, then same unified_memory, then the smallest
    |memory_gib − total memory| (ties: the smaller profile). None when `profiles` is empty."""
    candidates = list(profiles)
    for key in ("accelerator", "unified_memory"):
        narrowed = [p for p in candidates if getattr(p, key) == getattr(spec, key)]
        candidates = narrowed or candidates
    if not candidates:
        return None
    best = min(candidates, key=lambda p: (abs(p.memory_bytes - spec.total_memory_bytes), p.memory_bytes, p.name))
    return best.name


def _is_capability(value: object) -> bool:
    if not isinstance(value, str):
        return False
    major, dot, minor = value.partition(".")
    return bool(dot) and major.isdigit() and minor.isdigit()
