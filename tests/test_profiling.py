"""The machine probe: the real machine gives a well-formed spec; a simulated Jetson and missing sensors work."""

from __future__ import annotations

import json
from collections import namedtuple
from types import SimpleNamespace

import pytest

from edge_client.core.hardware import HardwareSpec, nearest_profile, spec_from_profile
from edge_client.hardware_profiles import load_profiles
from edge_client.profiling import CudaInfo, parse_tegra_release, probe_jetson, profile_device

GIB = 2**30
Memory = namedtuple("Memory", "total available")
Battery = namedtuple("Battery", "percent secsleft power_plugged")
Freq = namedtuple("Freq", "current min max")
Temp = namedtuple("Temp", "label current high critical")


def _jetson_root(tmp_path, model="NVIDIA Jetson Orin Nano Developer Kit"):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 2024\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    return tmp_path


def _sensors(total_gib=7.4, available_gib=5.0):
    def no_battery():
        raise NotImplementedError("no battery sensor")

    return SimpleNamespace(
        virtual_memory=lambda: Memory(int(total_gib * GIB), int(available_gib * GIB)),
        cpu_count=lambda logical=True: 6,
        cpu_freq=lambda: Freq(1510.0, 115.0, 1510.0),
        sensors_battery=no_battery,
        sensors_temperatures=lambda: {"cpu-thermal": [Temp("", 48.5, None, None)],
                                      "gpu-thermal": [Temp("gpu", 47.0, None, None)]},
    )


def test_this_machine_has_the_right_shape():
    spec = profile_device()
    assert isinstance(spec, HardwareSpec)
    assert spec.total_memory_bytes > 0 and 0 < spec.available_memory_bytes <= spec.total_memory_bytes
    assert 0 < spec.budget_bytes <= spec.available_memory_bytes
    assert spec.accelerator in ("cpu", "cuda") and spec.cpu_count and spec.cpu_count >= 1
    assert spec.nearest_profile in load_profiles()
    data = json.loads(json.dumps(spec.to_json_dict()))  # everything is JSON-serialisable
    assert data["budget_bytes"] == spec.budget_bytes
    if spec.accelerator == "cpu":
        assert spec.compute_capability is None and spec.gpu_name is None


def test_simulated_jetson_is_detected(tmp_path):
    root = _jetson_root(tmp_path)
    info = probe_jetson(root)
    assert info.model == "NVIDIA Jetson Orin Nano Developer Kit" and info.l4t_release == "R36.3.0"
    gpu = CudaInfo("Orin", total_bytes=int(7.4 * GIB), free_bytes=int(4.5 * GIB), capability="8.7")
    spec = profile_device(root=root, sensors=_sensors(), cuda=lambda: gpu, bnb=lambda: True)
    assert spec.unified_memory and spec.accelerator == "cuda" and spec.compute_capability == "8.7"
    assert spec.name == info.model and spec.jetson_model == info.model and spec.l4t_release == "R36.3.0"
    # Unified memory: the budget is limited by whichever of RAM and CUDA reports less free memory.
    assert spec.available_memory_bytes == int(4.5 * GIB)
    assert spec.nearest_profile == "jetson-orin-nano-8gb"
    assert spec.temperatures_c == {"cpu-thermal/0": 48.5, "gpu-thermal/gpu": 47.0}
    assert spec.battery_percent is None and spec.power_plugged is None  # the sensor raised: absent


def test_bigger_jetson_and_discrete_gpu_pick_their_profiles(tmp_path):
    root = _jetson_root(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit")
    gpu = CudaInfo("Orin", total_bytes=61 * GIB, free_bytes=55 * GIB, capability="8.7")
    spec = profile_device(root=root, sensors=_sensors(61, 58), cuda=lambda: gpu, bnb=lambda: True)
    assert spec.nearest_profile == "jetson-agx-orin-64gb"
    rtx = CudaInfo("NVIDIA GeForce RTX 4090", total_bytes=int(23.6 * GIB), free_bytes=22 * GIB, capability="8.9")
    desktop = profile_device(root=tmp_path / "no-jetson", sensors=_sensors(64, 50), cuda=lambda: rtx, bnb=lambda: True)
    assert not desktop.unified_memory and desktop.total_memory_bytes == rtx.total_bytes
    assert desktop.available_memory_bytes == rtx.free_bytes and desktop.system_ram_bytes == 64 * GIB
    assert desktop.nearest_profile == "rtx4090-24gb-desktop"


def test_missing_sensors_are_absent_not_fatal(tmp_path):
    def broken_cuda():
        raise RuntimeError("CUDA driver initialization failed")

    def broken_bnb():
        raise RuntimeError("libbitsandbytes_cuda.so: cannot open shared object file")

    bare = SimpleNamespace()  # a psutil without any sensor function
    spec = profile_device(root=tmp_path, sensors=bare, cuda=broken_cuda, bnb=broken_bnb)
    assert spec.accelerator == "cpu" and not spec.bnb_4bit and spec.default_quant == "fp32"
    assert spec.battery_percent is None and spec.temperatures_c is None and spec.cpu_freq_mhz is None
    assert spec.system_available_bytes is None and spec.jetson_model is None
    assert spec.total_memory_bytes > 0  # POSIX page count fallback
    assert spec.cpu_count is not None  # os.cpu_count fallback
    no_psutil = profile_device(root=tmp_path, sensors=None, cuda=lambda: None, bnb=lambda: False, profiles=[])
    assert no_psutil.nearest_profile is None and no_psutil.total_memory_bytes > 0


def test_battery_and_plain_laptop(tmp_path):
    sensors = _sensors(15.5, 9.0)
    sensors.sensors_battery = lambda: Battery(62.0, 3600, False)
    spec = profile_device(root=tmp_path, sensors=sensors, cuda=lambda: None, bnb=lambda: True)
    assert spec.battery_percent == 62.0 and spec.power_plugged is False
    assert spec.nearest_profile == "laptop-cpu-16gb" and spec.budget_bytes == int(9.0 * GIB * spec.budget_fraction)


@pytest.mark.parametrize("text, expected", [
    ("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic", "R36.3.0"),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "R35.4.1"),
    ("# R32 (release)", "R32"),
    ("garbage", None),
])
def test_parse_tegra_release(text, expected):
    assert parse_tegra_release(text) == expected


def test_nearest_profile_orders_accelerator_then_unified_then_memory():
    profiles = list(load_profiles().values())
    cpu_12 = spec_from_profile(next(p for p in profiles if p.name == "laptop-cpu-16gb"))
    assert nearest_profile(cpu_12, profiles) == "laptop-cpu-16gb"
    fake = HardwareSpec(name="x", total_memory_bytes=11 * GIB, available_memory_bytes=10 * GIB, unified_memory=False,
                        accelerator="cuda", compute_capability="8.6", bnb_4bit=True)
    assert nearest_profile(fake, profiles) == "rtx3060-12gb-desktop"  # not the 8 GiB Jetson (unified)
    assert nearest_profile(fake, []) is None
