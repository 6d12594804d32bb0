"""`prufed export-adapter`: the federation's global adapter as a PEFT adapter directory or a merged HF model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from prufed.cli.help import HelpFormatter
from prufed.cli.quiet import step_progress
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

EPILOG = """examples:
  prufed export-adapter --db sqlite:///runs/simulate/agg.db --out runs/adapter
  prufed export-adapter --db sqlite:///runs/simulate/agg.db --keep 20 --strategy contribution --out runs/adapter-20
  prufed export-adapter --global runs/global.safetensors --model smollm2-135m --out runs/merged --merge

then, in Python:
  base = AutoModelForCausalLM.from_pretrained(json.load(open("runs/adapter/adapter_config.json"))
                                              ["base_model_name_or_path"])
  model = PeftModel.from_pretrained(base, "runs/adapter")
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-adapter", help="export the global adapter for PEFT (full or pruned base), or merged",
        formatter_class=HelpFormatter, epilog=EPILOG,
        description="Write the federation's global LoRA adapter as a PEFT adapter directory (adapter_config.json "
        "+ adapter_model.safetensors) that PeftModel.from_pretrained loads as is. Without a pruning flag it is for "
        "the full base model; with --pruning or --keep it is for that pruned model (layer indices renumbered), "
        "with pruning.json beside it and the pruned base written to OUT/base. --merge writes a merged Hugging "
        "Face model directory instead.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", default=None, metavar="URL", help="aggregator database URL (as given to `aggregator serve`)")
    source.add_argument("--global", dest="global_file", type=Path, default=None, metavar="FILE",
                        help="a global adapter file (prufed-adapter/1 safetensors, ORIGINAL layer keys)")
    parser.add_argument("--version", type=int, default=None, metavar="N", help="with --db: global version (default: the latest)")
    parser.add_argument("--blob-dir", default=None, metavar="DIR", help="with --db: blob directory (non-SQLite databases)")
    parser.add_argument("--model", default=None, metavar="M",
                        help=f"the UNPRUNED base model (alias or HF directory), or a `prufed prune` output; default: "
                        f"{DEFAULT_MODEL} when its fingerprint is the one the adapter was trained on")
    parser.add_argument("--pruning", type=Path, default=None, metavar="DIR",
                        help="directory holding pruning.json (e.g. `prufed prune` output); excludes --keep")
    parser.add_argument("--keep", type=int, default=None, metavar="N",
                        help="layers to keep (with --strategy); excludes --pruning")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                        help=f"pruning strategy for --keep: {', '.join(STRATEGIES)}")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (must be new or empty)")
    parser.add_argument("--merge", action="store_true", help="write a merged Hugging Face model directory instead")
    parser.add_argument("--json", action="store_true", help="print the export summary as JSON on stdout")
    parser.set_defaults(func=cmd_export_adapter)


def export_command(db: str, version: int, out: str | None = None) -> str:
    """The command line that exports global `version` of the database `db` (shown by `aggregator status`)."""
    return f"prufed export-adapter --db {db} --version {version} --out {out or f'runs/adapter-v{version}'}"


def read_global_from_db(url: str, blob_dir: str | None, version: int | None):
    """Global `version` (None = latest) through the aggregator's read API: its status names each version's blob.

    The one place the CLI reads a global out of an aggregator database.
    """
    from aggregator.rounds import read_status
    from aggregator.store import Store
    from edge_client.global_adapter import GlobalAdapter, read_global_file

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).expanduser().is_file():
        raise ConfigError("--db", f"{url[len('sqlite:///'):]}: no such database file")
    store = Store(url, blob_dir)
    try:
        status = read_status(store)
        blobs = {int(r["metrics"]["global_version"]): r["metrics"]["sha256"] for r in status["rounds"]
                 if "global_version" in r["metrics"] and "sha256" in r["metrics"]}
        latest = int(status["global_version"])
        if version is None:
            version = latest
        if version == 0:
            raise ConfigError("--version", "version 0 is the initial adapter (lora_B = 0: the base model unchanged); "
                                           "export a version written by a closed round")
        if version not in blobs:
            raise ConfigError("--version", f"the database holds global versions 1..{latest}, not {version}"
                              if latest else "the federation has closed no round yet: no global to export")
        adapter = read_global_file(store.blobs.path(blobs[version]), "--db")
        return GlobalAdapter(adapter.tensors, adapter.meta, f"global version {version} of {url}")
    finally:
        store.dispose()


def _default_base(fingerprint: str) -> str:
    """The default model when the adapter was trained on it; otherwise --model must be given."""
    from prufed.common.models import fingerprint_model_dir, resolve_model

    if fingerprint and fingerprint_model_dir(resolve_model(DEFAULT_MODEL)) != fingerprint:
        raise ConfigError("--model", f"the adapter was trained on base {fingerprint[:19]}..., not on the default "
                                     f"{DEFAULT_MODEL}: pass that base model's directory as --model")
    return DEFAULT_MODEL


def cmd_export_adapter(args: argparse.Namespace) -> int:
    if args.keep is not None and args.keep < 1:
        raise ConfigError("--keep", f"must be >= 1, got {args.keep}")
    if args.global_file is not None and (args.version is not None or args.blob_dir is not None):
        raise ConfigError("--version" if args.version is not None else "--blob-dir", "only applies with --db")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ConfigError("--out", f"{args.out} exists and is not an empty directory")
    from edge_client.global_adapter import read_global_file, resolve_source
    from edge_client.peft_export import export_adapter
    from prufed.common.models import resolve_model

    with step_progress("reading global adapter") as stage:
        if args.db is not None:
            adapter, flag = read_global_from_db(args.db, args.blob_dir, args.version), "--db"
        else:
            adapter, flag = read_global_file(args.global_file, "--global"), "--global"
        model = args.model if args.model is not None else _default_base(adapter.meta.base_model)
        stage("resolving model")
        source = resolve_source(model, args.pruning, args.keep, args.strategy, full_depth=True)
        base_dir = source.base_dir if source else resolve_model(model)
        info = export_adapter(adapter, base_dir, source, args.out, merge=args.merge, flag=flag, on_stage=stage)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    what = "merged model" if args.merge else "PEFT adapter"
    depth = f"{info['num_layers']}/{info['source_num_layers']} layers"
    if info["strategy"]:
        depth += f" ({info['strategy']})"
    lora = info["lora"]
    print(f"{what} of round {info['round']} (LoRA r={lora['r']}, alpha={lora['alpha']:g}, "
          f"{','.join(lora['targets'])}) for {depth} -> {args.out}")
    if not args.merge:
        base = args.out / "base" if info["strategy"] else info["base_model"]
        print(f"load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{args.out}')")
    return 0

