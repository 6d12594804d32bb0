"""`prufed aggregate`: fold client update files into the next global adapter(s) (offline, no server).

Each update is read, checked (format, base model, `validate_update`) and folded in one at a time, so memory stays
at about one global adapter (one per depth group in a per-group mode) plus one update. A rejected update is
reported with its reason and skipped. Per-group modes (fedavg-group, mixed, additive) write one global per depth
group into the --out directory plus index.json: [{"kept_layers": [...], "file": "...", "clients": n,
"examples": n}, ...]; such a directory is also accepted as --global for the next round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from prufed.cli.help import HelpFormatter
from prufed.cli.modes import add_mode_arguments
from prufed.cli.quiet import progress_bar
from prufed.common.errors import ConfigError, PrufedError

INDEX = "index.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "aggregate", help="merge client update files into the next global adapter(s) (HeteAgg and per-group modes)",
        formatter_class=HelpFormatter,
        description="Layer-aligned weighted averaging of LoRA deltas from clients of any depth. heteagg: for every "
        "tensor, global' = global + server_lr * sum(w_k * delta_k) / sum(w_k) over the updates that hold it; tensors "
        "no update holds are copied unchanged. The per-group modes keep one global per depth group (clients with "
        "the same kept layers): fedavg-group averages within the group only; mixed blends the group's own mean "
        "step with every holder's, (1 - mix) * own + mix * all; additive adds mix * the other holders' mean step to "
        "the group's own. --mix auto sets the coefficient per layer from how well the group's update agrees with "
        "the others' (see aggregator/core/mixed.py and additive.py). Updates that fail validation are reported "
        "and skipped.",
        epilog="examples: prufed aggregate --global runs/global-0.safetensors --update c1/update.safetensors "
        "--update c2/update.safetensors --out runs/global-1.safetensors --json\n"
        "  prufed aggregate --mode mixed --mix auto --global runs/global-0.safetensors --update c1/update.safetensors "
        "--update c2/update.safetensors --out runs/round-1/",
    )
    parser.add_argument("--global", dest="global_path", type=Path, required=True, metavar="G",
                        help="current global adapter (format prufed-adapter/1), or, for a per-group mode, a directory "
                        "written by a previous per-group aggregation (its index.json names each group's global)")
    parser.add_argument("--update", dest="updates", type=Path, action="append", required=True, metavar="U",
                        help="a client update (format prufed-delta/1); repeat for each client")
    parser.add_argument("--out", type=Path, required=True,
                        help="where to write the new global adapter; a directory for a per-group mode")
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


def _load_globals(path: Path, per_group: bool):
    """(initial global, {group: global}, meta) from a global file, or from a per-group --out directory."""
    from prufed.common.adapter_format import GLOBAL_FORMAT, load_adapter

    def one(file: Path):
        state, meta = load_adapter(file)
        if meta.format != GLOBAL_FORMAT:
            raise ConfigError("--global", f"{file} has format {meta.format!r}, expected {GLOBAL_FORMAT!r}")
        return state, meta

    if not path.is_dir():
        state, meta = one(path)
        return state, {}, meta
    if not per_group:
        raise ConfigError("--global", f"{path} is a directory of per-group globals; --mode heteagg/fedavg needs one file")
    index_path = path / INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        entries = [(tuple(int(x) for x in entry["kept_layers"]), path / str(entry["file"])) for entry in index]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError("--global", f"{index_path} is not a per-group index ({exc})") from exc
    if not entries:
        raise ConfigError("--global", f"{index_path} lists no group")
    globals_, meta = {}, None
    for group, file in entries:
        globals_[group], meta = one(file)
    return None, globals_, meta


def _group_file(group: tuple[int, ...]) -> str:
    """A stable file name per kept-layer list: its depth and a short digest of the list."""
    digest = hashlib.sha256(json.dumps(list(group)).encode()).hexdigest()[:10]
    return f"global-{len(group)}L-{digest}.safetensors"


def _make_aggregator(args, config, initial, globals_):
    from aggregator.core.heteagg import HeteAggregator
    from aggregator.core.modes import check_mode, group_aggregator, is_group_mode

    mix = check_mode(args.mode, args.mix)
    if is_group_mode(args.mode):
        return group_aggregator(args.mode, globals_, config, initial, mix)
    return HeteAggregator(initial, config)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from aggregator.core.heteagg import AggregationConfig
    from aggregator.core.modes import check_mode, is_group_mode
    from aggregator.core.validate import UpdateRejected
    from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterMeta, save_adapter
    from prufed.common.fsio import atomic_write_text
    from prufed.common.refusals import RefusalCode

    check_mode(args.mode, args.mix)  # before any file is read
    per_group = is_group_mode(args.mode)
    config = AggregationConfig(weighting=args.weighting, mode="fedavg" if args.mode == "fedavg" else "heteagg",
                               space=args.space, server_lr=args.server_lr, clip_norm=args.clip_norm,
                               trim_fraction=args.trim_fraction)
    inputs = {path.resolve() for path in args.updates}
    if len(inputs) != len(args.updates):
        raise ConfigError("--update", "the same file is given more than once")
    if args.out.resolve() in inputs:
        raise ConfigError("--out", f"{args.out} is also an --update")
    if per_group and args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"--mode {args.mode} writes a directory (one global per group); {args.out} is a file")
    if per_group and args.out.resolve() == args.global_path.resolve():
        raise ConfigError("--out", "must differ from --global (the previous round's globals would be overwritten)")
    initial, globals_, global_meta = _load_globals(args.global_path, per_group)
    reference = initial if initial is not None else next(iter(globals_.values()))
    aggregator = _make_aggregator(args, config, initial, globals_)

    accepted, rejected = [], []
    with progress_bar() as progress:
        task = progress.add_task("aggregating", total=len(args.updates))
        for path in args.updates:
            try:
                tensors, meta = _check_update(path, reference, global_meta)
                if per_group and initial is None and tuple(meta.kept_layers) not in globals_:
                    raise UpdateRejected(RefusalCode.BAD_KEPT_LAYERS, f"kept layers {list(meta.kept_layers)} have no global in "
                                         f"{args.global_path / INDEX}")
            except UpdateRejected as exc:
                rejected.append({"path": str(path), "code": exc.code, "reason": str(exc)})
            else:
                if per_group:
                    aggregator.add(tuple(meta.kept_layers), tensors, meta.num_examples, name=str(path))
                else:
                    aggregator.add(tensors, meta.num_examples, name=str(path))
                accepted.append({"path": str(path), "num_examples": meta.num_examples,
                                 "kept_layers": list(meta.kept_layers)})
                del tensors  # one update in memory at a time
            progress.advance(task)

    summary: dict = {"out": str(args.out), "round": global_meta.round + 1, "mode": args.mode, "accepted": accepted,
                     "rejected": rejected}
    if not accepted:
        _print(args, summary)
        raise PrufedError(f"no update was accepted ({len(rejected)} rejected); {args.out} was not written")
    out_meta = AdapterMeta(GLOBAL_FORMAT, global_meta.kept_layers, base_model=global_meta.base_model,
                           round=global_meta.round + 1, lora=global_meta.lora)
    if per_group:
        index, reports = [], {}
        for group, result in aggregator.finish().items():
            name = _group_file(group)
            save_adapter(args.out / name, result.state, out_meta)
            index.append({"kept_layers": list(group), "file": name, "clients": result.report["clients"],
                          "examples": result.report["examples"]})
            reports[name] = result.report
        # The index goes last: a reader that finds it finds every file it names.
        atomic_write_text(args.out / INDEX, json.dumps(index, indent=2) + "\n")
        summary["groups"] = index
        summary["report"] = reports
    else:
        result = aggregator.finish()
        save_adapter(args.out, result.state, out_meta)
        summary["holders"] = {key: result.holders.get(key, 0) for key in sorted(reference)}
        summary["report"] = result.report
    _print(args, summary)
    return 0


def _print(args, summary: dict) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    for item in summary["rejected"]:
        print(f"rejected {item['path']}: {item['reason']}", file=sys.stderr)
    if not summary["accepted"]:
        return
    head = (f"aggregated {len(summary['accepted'])} update(s), {len(summary['rejected'])} rejected -> {args.out} "
            f"(round {summary['round']}, {summary['mode']})")
    if "groups" in summary:
        print(head + "; groups: " + ", ".join(f"{len(g['kept_layers'])} layers ({g['clients']} clients, "
                                             f"{g['examples']} examples) -> {g['file']}" for g in summary["groups"]))
    else:
        layers = summary["report"]["layer_holders"]
        print(head + "; holders per layer: " + ", ".join(f"{layer}:{count}" for layer, count in layers.items()))
