"""What every export starts from: a checked global adapter, the (pruned) model it goes on, and the merged model.

Shared by `edge_client.peft_export` (PEFT adapter / merged HF directories) and `edge_client.onnx_export`.
A source is the pruned model directory, its plan (ORIGINAL kept layers) and the unpruned base it came from; it
comes from `--pruning DIR`, from `--keep N --strategy S`, or from a `prufed prune` output passed as `--model`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_client.core.pruning import DEFAULT_STRATEGY, PruningPlan
from edge_client.model import PRUNING_FILE, attach_lora, load_model_dir, materialize_pruned, num_layers_of, read_plan
from prufed.common.adapter_format import GLOBAL_FORMAT, AdapterFormatError, AdapterMeta, load_adapter
from prufed.common.adapter_keys import layer_of
from prufed.common.errors import ConfigError, ModelError
from prufed.common.models import check_model_dir, resolve_model
from prufed.common.peft_bridge import load_adapter_state

DEFAULT_LORA_ALPHA = 16  # attach_lora's default, used only when an adapter carries no `lora` metadata


@dataclass(frozen=True)
class ExportSource:
    """What to export: a pruned model directory, its plan, and the unpruned base it came from."""

    model_dir: Path
    plan: PruningPlan
    base_dir: Path


@dataclass(frozen=True)
class GlobalAdapter:
    """A global adapter's tensors (ORIGINAL layer keys) and metadata; `origin` names where it was read from."""

    tensors: dict[str, torch.Tensor]
    meta: AdapterMeta
    origin: str


def _pruned_model_source(model_dir: Path, plan: PruningPlan) -> ExportSource:
    """A `prufed prune` output given as --model: its plan names the base it was pruned from."""
    try:
        base_dir = resolve_model(plan.source_model or None)
    except ModelError as exc:
        raise ConfigError("--model", f"{model_dir} was pruned from {plan.source_model!r}, which is not found here; "
                                     f"pass the original model as --model and this directory as --pruning") from exc
    if num_layers_of(base_dir) != plan.source_num_layers:
        raise ConfigError("--model", f"{model_dir}/{PRUNING_FILE} was made for a {plan.source_num_layers}-layer "
                                     f"model, but its source {base_dir} has {num_layers_of(base_dir)} layers")
    return ExportSource(model_dir, plan, base_dir)


def resolve_source(model: str | None, pruning: Path | None = None, keep: int | None = None,
                   strategy: str = DEFAULT_STRATEGY, *, full_depth: bool = False) -> ExportSource | None:
    """The model to export onto.

    `model` may be the unpruned base (then `pruning` or `keep` picks the layers) or a `prufed prune` output (then
    neither may be given). With neither and `full_depth`, returns None: the export is for the full base model.
    """
    if pruning is not None and keep is not None:
        raise ConfigError("--pruning", "give either --pruning DIR or --keep N (with --strategy), not both")
    base_dir = resolve_model(model)
    own_plan = read_plan(base_dir)
    if own_plan is not None:
        if pruning is not None or keep is not None:
            flag = "--pruning" if pruning is not None else "--keep"
            raise ConfigError(flag, f"--model {base_dir} is already pruned (it holds {PRUNING_FILE}); drop {flag}, "
                                    "or pass the original model as --model")
        return _pruned_model_source(base_dir, own_plan)
    if pruning is None and keep is None:
        if full_depth:
            return None
        raise ConfigError("--pruning", "give --pruning DIR or --keep N (with --strategy), or pass a `prufed prune` "
                                       "output as --model")
    base_layers = num_layers_of(base_dir)
    if keep is not None:
        from edge_client.layer_scores import plan_for_model

        if keep < 1 or keep > base_layers:
            raise ConfigError("--keep", f"must be between 1 and {base_layers} (the model's layer count), got {keep}")
        plan = plan_for_model(base_dir, strategy, keep)
        return ExportSource(materialize_pruned(str(base_dir), plan), plan, base_dir)
    pruning = Path(pruning)  # type: ignore[arg-type]
    if not pruning.is_dir():
        raise ConfigError("--pruning", f"no such directory: {pruning}")
    plan = read_plan(pruning)
    if plan is None:
        raise ConfigError("--pruning", f"{pruning} has no {PRUNING_FILE}")
    if plan.source_num_layers != base_layers:
        raise ConfigError("--pruning", f"{pruning}/{PRUNING_FILE} was made for a {plan.source_num_layers}-layer model, "
                                       f"but --model {model} has {base_layers} layers")
    if (pruning / "config.json").is_file():
        depth = int(check_model_dir(pruning)["num_hidden_layers"])
        if depth != plan.depth:
            raise ConfigError("--pruning", f"{pruning} holds a {depth}-layer model but its {PRUNING_FILE} keeps "
                                           f"{plan.depth} layers")
        return ExportSource(pruning, plan, base_dir)
    return ExportSource(materialize_pruned(str(base_dir), plan), plan, base_dir)


def lora_settings(tensors: Mapping[str, torch.Tensor], meta: AdapterMeta) -> tuple[int, float, tuple[str, ...]]:
    """(r, alpha, targets) from the `lora` metadata, else r from a lora_A shape [r, in] and targets from key names."""
    targets = tuple(sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors if ".lora_" in key}))
    if meta.lora:
        return int(meta.lora["r"]), meta.lora["alpha"], tuple(meta.lora.get("targets", targets))
    ranks = {int(value.shape[0]) for key, value in tensors.items() if ".lora_A." in key}
    if len(ranks) != 1:
        raise AdapterFormatError(f"adapter has no 'lora' metadata and its lora_A ranks are {sorted(ranks)}")
    print(f"warning: adapter has no 'lora' metadata; assuming alpha={DEFAULT_LORA_ALPHA}", file=sys.stderr)
    return ranks.pop(), DEFAULT_LORA_ALPHA, targets


def read_global_file(path: Path, flag: str = "--adapter") -> GlobalAdapter:
    """Load a global adapter file (prufed-adapter/1); `flag` is the CLI option named in errors."""
    if not Path(path).is_file():
        raise ConfigError(flag, f"no such file: {path}")
    tensors, meta = load_adapter(path)
    return GlobalAdapter(tensors, meta, str(path))


def check_global(adapter: GlobalAdapter, kept_layers: Sequence[int], base_fingerprint: str,
                 flag: str = "--adapter") -> dict[str, torch.Tensor]:
    """The slice of `adapter` for `kept_layers`, after checking its format, base model and layer coverage."""
    meta, origin = adapter.meta, adapter.origin
    if meta.format != GLOBAL_FORMAT:
        raise ConfigError(flag, f"{origin} is a {meta.format} file; export needs a global adapter ({GLOBAL_FORMAT})")
    if meta.base_model and meta.base_model != base_fingerprint:
        raise ConfigError(flag, f"{origin} was trained on base {meta.base_model[:19]}..., "
                                f"not on --model ({base_fingerprint[:19]}...)")
    missing = sorted(set(kept_layers) - set(meta.kept_layers))
    if missing:
        raise ConfigError(flag, f"{origin} covers layers {list(meta.kept_layers)}, "
                                f"but the export needs layers {missing} it lacks")
    kept = set(kept_layers)
    return {key: value for key, value in adapter.tensors.items() if layer_of(key) in kept}


def read_global_adapter(path: Path, plan: PruningPlan, base_fingerprint: str):
    """Load a global adapter file and check it covers every kept layer of `plan` and matches the base model."""
    adapter = read_global_file(path)
    return check_global(adapter, plan.kept_layers, base_fingerprint), adapter.meta


def build_merged_model(model_dir: Path, kept_layers: Sequence[int], adapter: Mapping[str, torch.Tensor] | None = None,
                       meta: AdapterMeta | None = None):
    """Load the (pruned) model in fp32; with an adapter, load its kept slice and merge W += (alpha/r) B A."""
    model, tokenizer = load_model_dir(model_dir, "fp32")
    if adapter is not None:
        assert meta is not None, "an adapter needs its metadata (LoRA r, alpha, targets)"
        r, alpha, targets = lora_settings(adapter, meta)
        peft_model = attach_lora(model, r=r, alpha=alpha, targets=targets, dropout=0.0)
        load_adapter_state(peft_model, adapter, kept_layers)
        model = peft_model.merge_and_unload()
    model.eval()
    return model, tokenizer
