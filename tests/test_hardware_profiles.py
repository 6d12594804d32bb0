"""Every shipped hardware profile loads and is well-formed; a bad field is reported by name and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_client.core.hardware import PROFILE_FIGURES, HardwareProfile, nearest_profile, spec_from_profile
from edge_client.hardware_profiles import PROFILES_ENV, get_profile, load_profile_file, load_profiles, profiles_dir
from prufed.common.errors import ConfigError

SHIPPED = sorted(profiles_dir().glob("*.yaml"))
REQUIRED_CLASSES = {
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
    "rtx3060-12gb-desktop", "rtx4090-24gb-desktop", "laptop-cpu-8gb", "laptop-cpu-16gb",
}


def test_required_device_classes_are_shipped():
    assert {path.stem for path in SHIPPED} >= REQUIRED_CLASSES
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_shipped_profile_is_valid(path: Path):
    profile = load_profile_file(path)
    assert profile.name == path.stem
    assert 0 < profile.budget_fraction <= 1
    assert 0 < profile.budget_bytes < profile.memory_bytes
    for figure in PROFILE_FIGURES:
        assert profile.sources[figure].strip(), f"{path.name}: no source for {figure}"
    if profile.accelerator == "cuda":
        major, minor = profile.compute_capability.split(".")
        assert int(major) >= 7 and minor.isdigit()
    else:
        assert profile.compute_capability is None and not profile.unified_memory
    if profile.unified_memory:
        assert profile.memory_gib <= profile.system_ram_gib
    # A profile emulated as a device is recognised as itself.
    assert nearest_profile(spec_from_profile(profile), [profile]) == profile.name
    spec = spec_from_profile(profile, available_fraction=0.5)
    assert spec.budget_bytes == int(int(profile.memory_bytes * 0.5) * profile.budget_fraction)


def _good_document() -> dict:
    return yaml.safe_load((profiles_dir() / "jetson-orin-nano-8gb.yaml").read_text())


@pytest.mark.parametrize("field, value, fragment", [
    ("memory_gib", -8, "positive"),
    ("memory_gib", "eight", "positive"),
    ("budget_fraction", 1.5, "(0, 1]"),
    ("budget_fraction", 0, "(0, 1]"),
    ("accelerator", "tpu", "cuda, cpu"),
    ("compute_capability", "eight", "capability"),
    ("unified_memory", "yes", "true or false"),
    ("bnb_4bit", 1, "true or false"),
    ("default_quant", "fp8", "nf4"),
    ("sources", {"memory_gib": "datasheet"}, "source note"),
])
def test_bad_field_is_named_with_the_file(tmp_path, field, value, fragment):
    document = _good_document()
    document[field] = value
    path = tmp_path / "jetson-orin-nano-8gb.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as excinfo:
        load_profile_file(path)
    message = str(excinfo.value)
    assert f"'{field}'" in message and str(path) in message and fragment in message


def test_missing_and_unknown_fields_are_named(tmp_path):
    document = _good_document()
    del document["system_ram_gib"]
    with pytest.raises(ConfigError, match="'system_ram_gib'.*missing"):
        HardwareProfile.from_mapping(document, origin="x.yaml")
    document = {**_good_document(), "memroy_gib": 8}
    with pytest.raises(ConfigError, match="'memroy_gib'.*not a known field"):
        HardwareProfile.from_mapping(document, origin="x.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        HardwareProfile.from_mapping(["not", "a", "mapping"], origin="x.yaml")


def test_name_must_match_file_and_yaml_must_parse(tmp_path):
    path = tmp_path / "other-name.yaml"
    path.write_text(yaml.safe_dump(_good_document()))
    with pytest.raises(ConfigError, match="'name'.*other-name"):
        load_profile_file(path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile_file(broken)


def test_get_profile_and_directory_override(tmp_path, monkeypatch):
    assert get_profile("laptop-cpu-8gb").accelerator == "cpu"
    with pytest.raises(ConfigError, match="--profile.*unknown.*jetson-orin-nano-8gb"):
        get_profile("no-such-device")
    (tmp_path / "jetson-orin-nano-8gb.yaml").write_text(yaml.safe_dump(_good_document()))
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert list(load_profiles()) == ["jetson-orin-nano-8gb"]
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_profiles()
