"""Probe this machine (the ONLY module that does): psutil, torch.cuda, Jetson files, bitsandbytes.

Every probe is a small function that returns None when its sensor is absent or raises, so a missing battery,
temperature sensor, GPU, torch or psutil is reported as absent, never as a crash. `profile_device` takes the
probes' inputs as parameters (a filesystem root for the Jetson files, a psutil-like module, the CUDA and
bitsandbytes probes), which lets tests simulate a Jetson or a bare machine without touching this one.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.core.hardware import PROBE_BUDGET_FRACTION, HardwareProfile, HardwareSpec, nearest_profile

TEGRA_RELEASE = "etc/nv_tegra_release"
DEVICE_TREE_MODEL = "proc/device-tree/model"


@dataclass(frozen=True)
class CudaInfo:
    name: str
    total_bytes: int
    free_bytes: int
    capability: str  #: "major.minor"


@dataclass(frozen=True)
class JetsonInfo:
    model: str | None  #: /proc/device-tree/model, e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    l4t_release: str | None  #: "R36.3.0" from /etc/nv_tegra_release


def _safe(probe: Callable[[], Any]) -> Any:
    """probe() or None when the sensor is missing (AttributeError, OSError, NotImplementedError, ...)."""
    try:
        return probe()
    except Exception:
        return None


def _default_sensors():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def probe_cuda() -> CudaInfo | None:
    """Device 0 through torch.cuda; None without torch, without CUDA, or on any driver error."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        major, minor = torch.cuda.get_device_capability(0)
        return CudaInfo(torch.cuda.get_device_name(0), int(total), int(free), f"{major}.{minor}")
    except Exception:
        return None


def probe_bitsandbytes() -> bool:
    from edge_client.model import bitsandbytes_available

    return bitsandbytes_available()


def probe_bf16_works() -> bool:
    """A bf16 matmul forward and backward ran correctly on the training device (`edge_client.model.probe_bf16`, the
    try `prufed doctor` reports)."""
    from edge_client.model import probe_bf16

    return probe_bf16().ok


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def parse_tegra_release(text: str) -> str | None:
    """`# R36 (release), REVISION: 3.0, ...` -> "R36.3.0"; None when the line has another shape."""
    head = text.lstrip("# ").split(",")
    major = head[0].split(" ")[0] if head and head[0].startswith("R") else None
    if major is None:
        return None
    revision = next((part.split(":", 1)[1].strip() for part in head[1:] if "REVISION" in part), None)
    return f"{major}.{revision}" if revision else major


def probe_jetson(root: str | os.PathLike[str] = "/") -> JetsonInfo | None:
    """Jetson identity from `<root>/etc/nv_tegra_release` and `<root>/proc/device-tree/model`, None elsewhere."""
    base = Path(root)
    release_text = _read_text(base / TEGRA_RELEASE)
    model = _read_text(base / DEVICE_TREE_MODEL)
    is_jetson = release_text is not None or (model is not None and "jetson" in model.lower())
    if not is_jetson:
        return None
    return JetsonInfo(model=model, l4t_release=parse_tegra_release(release_text) if release_text else None)


def _cpu_native_bf16() -> bool:
    from edge_client.model import native_bf16

    return native_bf16("cpu")


def probe_temperatures(sensors) -> dict[str, float] | None:
    """Current °C per sensor label ("<chip>/<label>"), None where psutil has no temperature support."""
    readings = _safe(lambda: sensors.sensors_temperatures())
    if not readings:
        return None
    temps = {}
    for chip, entries in readings.items():
        for index, entry in enumerate(entries):
            if getattr(entry, "current", None) is not None:
                temps[f"{chip}/{entry.label or index}"] = float(entry.current)
    return temps or None


def _system_memory(sensors) -> tuple[int | None, int | None]:
    memory = _safe(lambda: sensors.virtual_memory())
    if memory is not None:
        return int(memory.total), int(memory.available)
    # Without psutil: POSIX page counts (no "available" figure there).
    total = _safe(lambda: os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return (int(total) if total else None), None


def profile_device(
    *,
    root: str | os.PathLike[str] = "/",
    sensors: Any = "psutil",
    cuda: Callable[[], CudaInfo | None] = probe_cuda,
    bnb: Callable[[], bool] = probe_bitsandbytes,
    bf16: Callable[[], bool] = probe_bf16_works,
    profiles: list[HardwareProfile] | None = None,
    budget_fraction: float = PROBE_BUDGET_FRACTION,
) -> HardwareSpec:
    """Probe this machine and name the nearest shipped hardware profile.

    sensors: a psutil-like module (None = no psutil); cuda/bnb/bf16: probe callables; profiles: candidates for
    `nearest_profile` (default: the shipped YAML files). Memory: VRAM for a discrete GPU; system RAM for a CPU
    or a Jetson (unified), where available = min(CUDA free, RAM available).
    """
    if sensors == "psutil":
        sensors = _default_sensors()
    ram_total, ram_available = _system_memory(sensors)
    gpu = _safe(cuda)
    jetson = probe_jetson(root)
    bnb_ok = bool(_safe(bnb))
    unified = jetson is not None
    if gpu is not None and not unified:
        total, available = gpu.total_bytes, gpu.free_bytes
    else:
        total = ram_total or (gpu.total_bytes if gpu else 0)
        candidates = [v for v in (ram_available, gpu.free_bytes if gpu else None) if v is not None]
        available = min(candidates) if candidates else total
    accelerator = "cuda" if gpu is not None else "cpu"
    battery = _safe(lambda: sensors.sensors_battery())
    frequency = _safe(lambda: sensors.cpu_freq())
    cpu_count = _safe(lambda: sensors.cpu_count(logical=True)) or _safe(os.cpu_count)
    name = (jetson.model if jetson and jetson.model else None) or (gpu.name if gpu else None) \
        or _safe(platform.processor) or _safe(platform.machine) or "unknown"
    if bnb_ok:
        default_quant = "nf4"
    else:
        default_quant = "bf16" if accelerator == "cuda" else "fp32"
    spec = HardwareSpec(
        name=name,
        total_memory_bytes=int(total or 0),
        available_memory_bytes=int(min(available or 0, total or 0)),
        unified_memory=unified,
        accelerator=accelerator,
        compute_capability=gpu.capability if gpu else None,
        bnb_4bit=bnb_ok,
        budget_fraction=budget_fraction,
        cpu_bf16=bool(_safe(_cpu_native_bf16)) and bool(_safe(bf16)),  # native, and a bf16 matmul was tried
        default_quant=default_quant,
        system_ram_bytes=ram_total,
        system_available_bytes=ram_available,
        cpu_count=int(cpu_count) if cpu_count else None,
        cpu_freq_mhz=float(frequency.current) if frequency is not None and frequency.current else None,
        battery_percent=float(battery.percent) if battery is not None else None,
        power_plugged=bool(battery.power_plugged) if battery is not None and battery.power_plugged is not None else None,
        temperatures_c=probe_temperatures(sensors),
        gpu_name=gpu.name if gpu else None,
        jetson_model=jetson.model if jetson else None,
        l4t_release=jetson.l4t_release if jetson else None,
    )
    if profiles is None:
        from edge_client.hardware_profiles import load_profiles

        profiles = list(_safe(lambda: load_profiles().values()) or [])
    from dataclasses import replace

    return replace(spec, nearest_profile=nearest_profile(spec, profiles))
