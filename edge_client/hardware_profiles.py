"""Load the device classes in `hardware_profiles/*.yaml` (one file per profile, the file stem is its name).

The directory is `$PRUFED_HARDWARE_PROFILES` when set, else `hardware_profiles/` at the repository root (next to
the `edge_client` package: an editable install or a source checkout). The YAML files are data, not package data:
a wheel build must add them (or point the variable at a copy).
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_client.core.hardware import HardwareProfile, HardwareSpec
from edge_client.core.hardware import nearest_profile as _nearest
from prufed.common.errors import ConfigError

PROFILES_ENV = "PRUFED_HARDWARE_PROFILES"


def profiles_dir() -> Path:
    override = os.environ.get(PROFILES_ENV)
    return Path(override).expanduser() if override else Path(__file__).resolve().parents[1] / "hardware_profiles"


def load_profile_file(path: Path) -> HardwareProfile:
    """Parse and validate one YAML file; errors name the file and the field."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML ({exc})") from None
    profile = HardwareProfile.from_mapping(data, origin=str(path))
    if profile.name != Path(path).stem:
        raise ConfigError(f"{path} field 'name'", f"must equal the file name {Path(path).stem!r}, got {profile.name!r}")
    return profile


def load_profiles(directory: str | os.PathLike[str] | None = None) -> dict[str, HardwareProfile]:
    """Every `*.yaml` in `directory` (default `profiles_dir()`), by name, sorted by name."""
    root = Path(directory) if directory is not None else profiles_dir()
    if not root.is_dir():
        raise ConfigError("hardware profiles", f"directory {root} does not exist (set ${PROFILES_ENV})")
    files = sorted(root.glob("*.yaml"))
    if not files:
        raise ConfigError("hardware profiles", f"no *.yaml files in {root}")
    return {profile.name: profile for profile in map(load_profile_file, files)}


def get_profile(name: str, directory: str | os.PathLike[str] | None = None) -> HardwareProfile:
    profiles = load_profiles(directory)
    if name not in profiles:
        raise ConfigError("--profile", f"unknown hardware profile {name!r}; known: {', '.join(profiles)}")
    return profiles[name]


def nearest_profile(spec: HardwareSpec, directory: str | os.PathLike[str] | None = None) -> str | None:
    """Name of the shipped profile closest to `spec` (accelerator, then unified memory, then memory size)."""
    return _nearest(spec, load_profiles(directory).values())
