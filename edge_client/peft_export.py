"""Export a global adapter in the forms the Hugging Face ecosystem loads as is.

Adapter directory (default), loadable with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`:
  adapter_config.json        PEFT's LoraConfig: r, lora_alpha, target_modules, base_model_name_or_path
  adapter_model.safetensors  the LoRA tensors under PEFT's saved names
                             (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`)
Full depth: `{i}` is the ORIGINAL layer index (the global's own keys) and the base is the unpruned model.
Pruned: `{i}` is the PRUNED index 0..d-1, pruning.json (ORIGINAL indices) sits beside the adapter, and the pruned
base model (weights, config, tokenizer) is written to `<out>/base/`, which base_model_name_or_path names.

Merged (`merge=True`): a Hugging Face model directory with W' = W + (alpha/r) B A folded into every target
(fp32), the tokenizer, and pruning.json when pruned; `AutoModelForCausalLM.from_pretrained(out)` loads it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from edge_client.global_adapter import ExportSource, GlobalAdapter, build_merged_model, check_global, lora_settings
from edge_client.model import PRUNING_FILE, num_layers_of
from prufed.common.adapter_keys import to_pruned_keys
from prufed.common.errors import ConfigError
from prufed.common.fsio import staged_dir
from prufed.common.models import fingerprint_model_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
#: Files of a cached pruned copy that describe the cache, not the model.
_CACHE_ONLY = ("prufed-fingerprint.json", "base-fingerprint.txt")


def export_adapter(adapter: GlobalAdapter, base_dir: Path, source: ExportSource | None, out_dir: Path, *,
                   merge: bool = False, flag: str = "--global",
                   on_stage: Callable[[str], None] | None = None) -> dict:
    """Write the adapter (or, with `merge`, the merged model) for `source` (None = the full base) to `out_dir`.

    Checks the adapter against the base fingerprint and the kept layers first; `out_dir` appears complete or not
    at all. Returns a summary: kind, layers, LoRA settings, round, files.
    """
    stage = on_stage or (lambda _name: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError("--out", f"{out_dir} exists and is not an empty directory")
    stage("checking adapter")
    kept = list(source.plan.kept_layers) if source else list(range(num_layers_of(base_dir)))
    tensors = check_global(adapter, kept, fingerprint_model_dir(base_dir), flag)
    r, alpha, targets = lora_settings(tensors, adapter.meta)
    model_dir = source.model_dir if source else base_dir
    with staged_dir(out_dir) as staging:
        if merge:
            stage("merging adapter into the model")
            model, tokenizer = build_merged_model(model_dir, kept, tensors, adapter.meta)
            stage("writing merged model")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        else:
            stage("writing adapter")
            if source is not None:
                _copy_model(model_dir, staging / BASE_DIR)
            base_name = str((out_dir / BASE_DIR).resolve()) if source else str(Path(base_dir).resolve())
            _write_peft_adapter(staging, tensors, kept if source else None, r, alpha, targets, base_name)
        if source is not None:
            (staging / PRUNING_FILE).write_text(source.plan.to_json() + "\n")
    return {
        "kind": "merged" if merge else "adapter", "out": str(out_dir), "origin": adapter.origin,
        "round": adapter.meta.round, "base_model": str(base_dir), "num_layers": len(kept),
        "source_num_layers": num_layers_of(base_dir), "kept_layers": kept,
        "strategy": source.plan.strategy if source else None,
        "lora": {"r": r, "alpha": alpha, "targets": list(targets)},
        "files": sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()),
    }


def _write_peft_adapter(out: Path, tensors: dict, kept_layers: list[int] | None, r: int, alpha: float,
                        targets: tuple[str, ...], base_name: str) -> None:
    """adapter_config.json through PEFT's own LoraConfig, and the tensors under PEFT's saved names.

    `kept_layers` given: keys are rewritten from ORIGINAL to pruned indices (the pruned base's own numbering).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    config.save_pretrained(str(out))
    keyed = to_pruned_keys(tensors, kept_layers) if kept_layers is not None else tensors
    # PEFT writes {"format": "pt"}; transformers' safetensors loader checks it.
    save_file({key: value.contiguous() for key, value in sorted(keyed.items())}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def _copy_model(model_dir: Path, target: Path) -> None:
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(*_CACHE_ONLY, ".*"))
