"""Installing PruFed: ranges in pyproject.toml, exact pins in constraints.txt, role extras, and a real wheel.

The wheel test builds `prufed-*.whl`, installs it into a fresh venv (no system site-packages) with the lock file as
constraints, first the core alone and then `[edge]`, and runs the installed `prufed` there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from prufed.cli import build_parser
from prufed.cli.extras import COMMAND_EXTRAS, extras_providing, missing_extras, missing_extras_message

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
AGGREGATOR_ONLY = ("sqlalchemy", "prometheus_client")  # import names
EXPERIMENTS_ONLY = ("matplotlib",)


def lock_pins() -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}; every line must be `name==version`."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and "*" not in spec.version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def requirement_lines() -> list[tuple[str, str]]:
    """(group, requirement) for the core and every extra."""
    return [("dependencies", r) for r in PROJECT["dependencies"]] + [
        (f"optional-dependencies.{extra}", r) for extra, reqs in EXTRAS.items() for r in reqs]


@pytest.mark.parametrize(("group", "line"), requirement_lines(), ids=lambda v: v if isinstance(v, str) else "")
def test_requirement_is_a_range_and_its_lock_pin_lies_inside(group, line):
    req = Requirement(line)
    if canonicalize_name(req.name) == "prufed":  # [all] names the other extras
        assert set(req.extras) <= set(EXTRAS) - {"all", "dev"}
        return
    exact = [s for s in req.specifier if s.operator in ("==", "===")]
    assert not exact, f"{group}: {line!r} is an exact pin; declare a tested range, pin it in constraints.txt"
    assert req.specifier, f"{group}: {line!r} has no version range"
    pins = lock_pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"{group}: {req.name} is not pinned in constraints.txt (run scripts/lock.py)"
    assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {line!r}"


def test_torch_range_admits_jetpack_builds_and_the_locked_one():
    (torch_req,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains("2.5.0") and torch_req.specifier.contains("2.5.0a0+872d972e41.nv24.08")
    assert lock_pins()["torch"] == "2.13.0"


def test_lock_file_is_this_environment():
    """The suite runs on exactly the locked versions, and the lock lists exactly the closure of `.[all,dev]`."""
    for name, version in lock_pins().items():
        assert Version(metadata.version(name)).public == version, f"installed {name} differs from constraints.txt"
    done = subprocess.run([sys.executable, "scripts/lock.py", "--check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_command_says_which_extras_it_needs():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert set(COMMAND_EXTRAS) == set(sub.choices)
    for command, extras in COMMAND_EXTRAS.items():
        assert set(extras) <= set(EXTRAS) - {"all", "dev"}, command


def test_missing_extras_reads_requirement_markers():
    requirements = ["torch>=2.5", "prufed-no-such-dist>=1; extra == 'edge'", "peft>=0.21; extra == 'edge'",
                    "sqlalchemy>=2.1; extra == 'aggregator'", "prufed[edge,aggregator]; extra == 'all'"]
    assert missing_extras(["edge", "aggregator"], requirements) == {"edge": ["prufed-no-such-dist"]}
    assert missing_extras(["aggregator"], requirements) == {}
    message = missing_extras_message("edge run", {"edge": ["peft", "bitsandbytes"]})
    assert message == ("`prufed edge run` needs the edge extra (bitsandbytes, peft not installed): "
                       "pip install 'prufed[edge]'")


def test_a_missing_module_is_traced_to_the_extra_that_requires_it():
    lines = [f"{r}; extra == '{extra}'" for extra, reqs in EXTRAS.items() for r in reqs]
    assert extras_providing("sqlalchemy.engine", lines) == ["aggregator"]
    assert extras_providing("prometheus_client", lines) == ["aggregator"]
    assert extras_providing("matplotlib.pyplot", lines) == ["experiments"]
    assert extras_providing("bitsandbytes", lines) == ["edge"]
    assert extras_providing("psycopg", lines) == ["postgres"]
    assert set(extras_providing("transformers", lines)) == {"edge", "aggregator"}
    assert extras_providing("yaml", lines) == []  # the core's


def test_this_environment_has_every_extra():
    """`make` installs `.[all,dev]`: with pyproject.toml's own requirement lines nothing is missing."""
    lines = [f"{r}; extra == '{extra}'" for extra, reqs in EXTRAS.items() for r in reqs
             if canonicalize_name(Requirement(r).name) != "prufed"]
    assert missing_extras(list(EXTRAS), lines) == {}


# ---- the wheel ----------------------------------------------------------------------------------------------------
def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def _pip_install(python: Path, *args) -> None:
    # This venv's pip drives the fresh one (--python): no pip inside it, no bytecode compiling; offline except PyPI.
    done = _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile",
                 "-c", REPO / "constraints.txt", *args])
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~90 s on an idle 2-core machine; two installs and four cold CLI starts under load: minutes
def test_wheel_installs_by_role_in_a_fresh_venv(tmp_path):
    source = tmp_path / "src"  # a copy, so the build's build/ and *.egg-info never land in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "out"))
    done = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", source])
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("prufed-*-py3-none-any.whl")

    venv = tmp_path / "venv"
    done = _run([sys._base_executable, "-m", "venv", "--without-pip", venv])
    assert done.returncode == 0, done.stderr
    python, prufed = venv / "bin" / "python", venv / "bin" / "prufed"

    # The core alone: the agent cannot run, and both doctor and the agent say what to install.
    _pip_install(python, wheel)
    doctor = _run([prufed, "doctor", "--json"], cwd=tmp_path)
    assert doctor.returncode == 1
    assert "pip install 'prufed[edge]'" in doctor.stderr and len(doctor.stderr.strip().splitlines()) == 1
    assert "peft" in json.loads(doctor.stdout)["missing_extras"]["edge"]
    agent = _run([prufed, "edge", "run", "--aggregator", "127.0.0.1:1", "--token", "t"], cwd=tmp_path)
    assert agent.returncode == 2 and agent.stderr.strip().endswith("pip install 'prufed[edge]'"), agent.stderr

    # [edge]: the agent runs, the aggregator's and the experiments' packages stay out.
    _pip_install(python, f"{wheel}[edge]")
    help_text = _run([prufed, "edge", "run", "--help"], cwd=tmp_path)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: prufed edge run"), help_text.stderr
    doctor = _run([prufed, "doctor", "--json"], cwd=tmp_path)
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["ok"] and report["missing_extras"] == {}
    assert report["executable"].startswith(str(venv))
    assert report["nearest_profile"] is not None  # hardware_profiles/*.yaml travel in the wheel
    from edge_client.model import probe_bf16, probe_bnb_4bit

    assert report["bnb_4bit"]["ok"] == probe_bnb_4bit().ok and report["bf16"]["ok"] == probe_bf16().ok
    absent = _run([python, "-c", "import importlib.util, sys; "
                   "print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])", *AGGREGATOR_ONLY,
                   *EXPERIMENTS_ONLY], cwd=tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    aggregator = _run([prufed, "aggregator", "status", "--db", f"sqlite:///{tmp_path / 'agg.db'}"], cwd=tmp_path)
    assert aggregator.returncode == 2 and "pip install 'prufed[aggregator]'" in aggregator.stderr
    # A module outside the command's own extra (the aggregator's store, behind export-adapter --db) is traced too.
    export = _run([prufed, "export-adapter", "--db", f"sqlite:///{tmp_path / 'agg.db'}", "--out", tmp_path / "x"],
                  cwd=tmp_path)
    assert export.returncode == 2 and export.stderr.strip().endswith("pip install 'prufed[aggregator]'"), export.stderr

    # Everything installed came from the lock file, at its versions.
    freeze = _run([sys.executable, "-m", "pip", "--python", python, "list", "--format", "json"])
    installed = {canonicalize_name(p["name"]): Version(p["version"]).public for p in json.loads(freeze.stdout)}
    installed.pop("prufed")
    pins = lock_pins()
    assert {name: (version, pins.get(name)) for name, version in installed.items() if pins.get(name) != version} == {}
