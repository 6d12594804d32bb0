"""Which role extra (`prufed[edge]`, `prufed[aggregator]`, ...) each command needs, and which are missing here.

The extras' contents are read from the installed distribution's own metadata (its `Requires-Dist: X; extra ==
"edge"` lines, i.e. pyproject.toml), so this module lists commands, never packages. A command whose extra is not
fully installed stops before it starts, with one line that says what to install.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "prufed"
#: Extras each top-level command needs beyond the core (torch, safetensors, gRPC, protobuf, pyyaml, rich).
#: Every command is listed (tests/test_install.py checks), so a new one must say what it needs.
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "aggregate": (),
    "plan": (),  # config.json and the pure planner only
    "doctor": (),  # reports a missing [edge] itself, as its verdict
    "layers": ("edge",),
    "prune": ("edge",),
    "eval": ("edge",),
    "profile": ("edge",),
    "train": ("edge",),
    "edge": ("edge",),
    "export-onnx": ("edge",),
    "generate": ("edge",),
    "export-adapter": ("edge",),  # --db also needs [aggregator]; the store import says so
    "aggregator": ("aggregator",),
    "simulate": ("edge", "aggregator", "experiments"),
}


#: Every extra a requirement marker may name (`all` and `dev` are never the answer to a missing module).
_EXTRA_NAMES = tuple(dict.fromkeys(extra for extras in COMMAND_EXTRAS.values() for extra in extras)) + ("postgres",)


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def project_requirements() -> list[str]:
    """`Requires-Dist` lines of the installed prufed; empty when it is only on PYTHONPATH (nothing to check)."""
    try:
        return metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        return []


def missing_extras(extras: Iterable[str], requirements: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{extra: [distributions it requires that are not installed]} for each of `extras` with any missing."""
    extras = tuple(extras)
    missing: dict[str, list[str]] = {}
    for text in project_requirements() if requirements is None else requirements:
        req = Requirement(text)
        if req.marker is None or req.name == PROJECT:
            continue
        for extra in extras:
            if req.marker.evaluate({"extra": extra}) and not _installed(req.name):
                missing.setdefault(extra, []).append(req.name)
    return missing


def extras_providing(module: str, requirements: Iterable[str] | None = None) -> list[str]:
    """The extras (other than `all`) that require a distribution named like the top-level `module` (sqlalchemy,
    prometheus_client, matplotlib, peft, ...): which extra a ModuleNotFoundError asks for."""
    wanted = canonicalize_name(module.partition(".")[0])
    found: list[str] = []
    for text in project_requirements() if requirements is None else requirements:
        req = Requirement(text)
        if req.marker is None or canonicalize_name(req.name) != wanted:
            continue
        found += [extra for extra in _EXTRA_NAMES if extra not in found and req.marker.evaluate({"extra": extra})]
    return found


def install_hint(extras: Iterable[str]) -> str:
    """`pip install 'prufed[edge,aggregator]'`."""
    return f"pip install '{PROJECT}[{','.join(extras)}]'"


def missing_extras_message(command: str, missing: dict[str, list[str]]) -> str:
    """One line: what is missing and the pip command that installs it."""
    packages = sorted({name for names in missing.values() for name in names})
    what = f"the {next(iter(missing))} extra" if len(missing) == 1 else f"the {' and '.join(missing)} extras"
    return f"`prufed {command}` needs {what} ({', '.join(packages)} not installed): {install_hint(missing)}"
