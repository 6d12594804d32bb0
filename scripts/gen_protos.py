"""Regenerate the committed gRPC stubs from proto/ (`--check`: regenerate into a temp dir, fail on any diff).

    python scripts/gen_protos.py            # rewrite prufed/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1 and list the files that differ
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc over every .proto; return the generated files (relative to out_dir)."""
    from grpc_tools import protoc  # dev dependency, only needed here

    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    return [Path(proto).with_suffix("").with_name(Path(proto).stem + suffix)
            for proto in protos for suffix in GENERATED_SUFFIXES]


def check() -> list[str]:
    """Names of generated files that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [str(rel) for rel in fresh
                if not (ROOT / rel).is_file() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail on a diff instead of rewriting the stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        for name in stale:
            print(f"stale generated file: {name} (run python scripts/gen_protos.py)", file=sys.stderr)
        return 1 if stale else 0
    for rel in generate(ROOT):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
