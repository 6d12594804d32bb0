"""`prufed aggregate`: fold client update files into the next global adapter (offline, no server).

Each update is read, checked (format, base model, `validate_update`) and folded in one at a time, so memory stays
at about one global adapter per group plus one update. A rejected update is reported with its reason and skipped.

One-global modes (heteagg, fedavg) write one file. Per-group modes (fedavg-group, mixed, additive) write `--out DIR`:
one adapter file per depth group (the updates' kept-layer lists) and DIR/index.json, a list of
{"kept_layers": [...], "file": "...", "clients": n, "examples": n}. Such a DIR is a valid `--global` of the next
round; an update of a group it does not list is then refused (a new group needs a file `--global` to start from).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from prufed.cli.help import HelpFormatter
from prufed.cli.modes import add_mode_arguments
from prufed.common.errors import ConfigError, PrufedError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "aggregate", help="merge client update files into the next global adapter (HeteAgg)",
        formatter_class=HelpFormatter,
        description="Layer-aligned weighted averaging of LoRA deltas from clients of any depth: for every tensor, "
        "global' = global + server_lr * sum(w_k * delta_k) / sum(w_k) over the updates that hold it. Tensors no "
        "update holds are copied unchanged. Updates that fail validation are reported and skipped.",
        epilog="example: prufed aggregate --global runs/global-0.safetensors --update c1/update.safetensors "
        "--update c2/update.safetensors --out runs/global-1.safetensors --json",
    )
    parser.add_argument("--global", dest="global_path", type=Path, required=True, metavar="G",
                        help="current global adapter (format prufed-adapter/1); with a per-group mode also a "
                             "directory written by a previous per-group run (its index.json)")
    parser.add_argument("--update", dest="updates", type=Path, action="append", required=True, metavar="U",
                        help="a client update (format prufed-delta/1); repeat for each client")
    parser.add_argument("--out", type=Path, required=True,
                        help="the new global adapter file; with a per-group mode, a directory (one file per group "
                             "+ index.json)")
    parser.add_argument("--weighting", default="examples",
                        help="client weight: examples (its num_examples) or uniform (1 for every client)")
    add_mode_arguments(parser)
    parser.add_argument("--space", default="factors",
                        help="factors: average lora_A and lora_B separately; product: average the exact products "
                        "B·A, then truncated SVD back to rank r")
    parser.add_argument("--server-lr", type=float, default=1.0, help="step size applied to the averaged delta")
    parser.add_argument("--clip-norm", type=float, default=None,
                        help="scale each update to at most this L2 norm (over all its tensors); unset: no clipping")
    parser.add_argument("--trim-fraction", type=float, default=0.0,
                        help="coordinate-wise trimmed mean: drop this fraction at each end (keeps all updates in memory)")
    parser.add_argument("--json", action="store_true",
                        help="print per-tensor holder counts, rejected updates and the report as JSON on stdout")
    parser.set_defaults(func=cmd_aggregate)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _check_update(path: Path, global_state, global_meta):
    """(tensors, meta) of a usable update; raises UpdateRejected naming why it is not."""
    from aggregator.core.validate import UpdateRejected, validate_update
    from prufed.common.adapter_format import DELTA_FORMAT, AdapterFormatError, load_adapter
    from prufed.common.refusals import RefusalCode

    try:
        tensors, meta = load_adapter(path)
    except AdapterFormatError as exc:
        raise UpdateRejected(RefusalCode.BAD_FILE, str(exc)) from exc
    if meta.format != DELTA_FORMAT:
        raise UpdateRejected(RefusalCode.BAD_FORMAT, f"format is {meta.format!r}, an update must be {DELTA_FORMAT!r}")
    if meta.base_model and global_meta.base_model and meta.base_model != global_meta.base_model:
        raise UpdateRejected(RefusalCode.BASE_MODEL_MISMATCH,
                             f"trained on base model {meta.base_model}, the global is for {global_meta.base_model}")
    validate_update(tensors, kept_layers=meta.kept_layers, global_state=global_state, num_examples=meta.num_examples)
    return tensors, meta


def cmd_aggregate(args: argparse.Namespace) -> int:
    from aggregator.core.heteagg import AggregationConfig, AggregationError, HeteAggregator
    from aggregator.core.modes import check_mode, group_aggregator, is_group_mode
    from aggregator.core.validate import UpdateRejected
    from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta, load_adapter, save_adapter

    mix = check_mode(args.mode, args.mix)
    per_group = is_group_mode(args.mode)
    config = AggregationConfig(weighting=args.weighting, mode="heteagg" if per_group else args.mode, space=args.space,
                               server_lr=args.server_lr, clip_norm=args.clip_norm, trim_fraction=args.trim_fraction)
    inputs = {path.resolve() for path in args.updates}
    if len(inputs) != len(args.updates):
        raise ConfigError("--update", "the same file is given more than once")
    if args.out.resolve() in inputs:
        raise ConfigError("--out", f"{args.out} is also an --update")
    if per_group:
        group_states, global_state, global_meta = _group_globals(args.global_path)
        initial = None if args.global_path.is_dir() else global_state
        aggregator = group_aggregator(args.mode, group_states, config, initial=initial, mix=mix)
    else:
        global_state, global_meta = load_adapter(args.global_path)
        if global_meta.format != GLOBAL_FORMAT:
            raise ConfigError("--global", f"{args.global_path} has format {global_meta.format!r}, expected "
                                          f"{GLOBAL_FORMAT!r}")
        aggregator = HeteAggregator(global_state, config)
    accepted, rejected = [], []
    with _progress() as progress:
        task = progress.add_task("aggregating", total=len(args.updates))
        for path in args.updates:
            try:
                tensors, meta = _check_update(path, global_state, global_meta)
            except UpdateRejected as exc:
                rejected.append({"path": str(path), "code": exc.code, "reason": str(exc)})
            else:
                if per_group:
                    try:
                        aggregator.add(tuple(meta.kept_layers), tensors, meta.num_examples, name=str(path))
                    except AggregationError as exc:  # a group with no global in --global DIR/index.json
                        raise ConfigError("--global", f"{path}: {exc}") from exc
                else:
                    aggregator.add(tensors, meta.num_examples, name=str(path))
                accepted.append({"path": str(path), "num_examples": meta.num_examples,
                                 "kept_layers": list(meta.kept_layers)})
                del tensors  # one update in memory at a time
            progress.advance(task)

    summary = {"out": str(args.out), "round": global_meta.round + 1, "accepted": accepted, "rejected": rejected}
    if accepted and per_group:
        summary["groups"] = _write_groups(args.out, aggregator.finish(), global_meta)
    elif accepted:
        result = aggregator.finish()
        out_meta = AdapterMeta(GLOBAL_FORMAT, global_meta.kept_layers, base_model=global_meta.base_model,
                               round=global_meta.round + 1, lora=global_meta.lora)
        save_adapter(args.out, result.state, out_meta)
        summary["holders"] = {key: result.holders.get(key, 0) for key in sorted(global_state)}
        summary["report"] = result.report
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for item in rejected:
            print(f"rejected {item['path']}: {item['reason']}", file=sys.stderr)
        if accepted and per_group:
            print(f"aggregated {len(accepted)} update(s), {len(rejected)} rejected -> {args.out}/index.json "
                  f"(round {summary['round']}, mode {args.mode}); groups: "
                  + ", ".join(f"{len(g['kept_layers'])} layers: {g['clients']} client(s)" for g in summary["groups"]))
        elif accepted:
            layers = summary["report"]["layer_holders"]
            print(f"aggregated {len(accepted)} update(s), {len(rejected)} rejected -> {args.out} "
                  f"(round {summary['round']}); holders per layer: "
                  + ", ".join(f"{layer}:{count}" for layer, count in layers.items()))
    if not accepted:
        raise PrufedError(f"no update was accepted ({len(rejected)} rejected); {args.out} was not written")
    return 0


def _group_globals(path: Path):
    """({group: state}, a reference state, its meta) from `--global`: a file (every group starts from it; no group
    yet) or a directory with index.json from a previous per-group run."""
    from prufed.common.adapter_format import GLOBAL_FORMAT, load_adapter

    if not path.is_dir():
        state, meta = load_adapter(path)
        if meta.format != GLOBAL_FORMAT:
            raise ConfigError("--global", f"{path} has format {meta.format!r}, expected {GLOBAL_FORMAT!r}")
        return {}, state, meta
    index = path / "index.json"
    try:
        entries = json.loads(index.read_text())
        groups = {tuple(int(i) for i in e["kept_layers"]): path / e["file"] for e in entries}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError("--global", f"{index}: not a per-group index ({exc})") from None
    if not groups:
        raise ConfigError("--global", f"{index} lists no group")
    states, meta = {}, None
    for group, file in groups.items():
        states[group], meta = load_adapter(file)
        if meta.format != GLOBAL_FORMAT:
            raise ConfigError("--global", f"{file} has format {meta.format!r}, expected {GLOBAL_FORMAT!r}")
    return states, next(iter(states.values())), meta


def _write_groups(out: Path, results, global_meta) -> list[dict]:
    """One adapter file per group in `out` plus out/index.json; returns the index entries."""
    from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta, save_adapter
    from prufed.common.fsio import atomic_write_json

    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; a per-group mode writes a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = AdapterMeta(GLOBAL_FORMAT, global_meta.kept_layers, base_model=global_meta.base_model,
                       round=global_meta.round + 1, lora=global_meta.lora)
    index = []
    for group, result in sorted(results.items()):
        name = f"group-{len(group)}-{'_'.join(map(str, group))}.safetensors"
        if len(name) > 120:  # long kept-layer lists: a stable short name
            name = f"group-{len(group)}-{hashlib.sha256(str(group).encode()).hexdigest()[:12]}.safetensors"
        save_adapter(out / name, result.state, meta)
        index.append({"kept_layers": list(group), "file": name, "clients": int(result.report["clients"]),
                      "examples": int(result.report["examples"])})
    atomic_write_json(out / "index.json", index)
    return index
