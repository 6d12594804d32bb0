"""Stage 1, set-up: plan the kept layers and precision, read the data, load the pruned model, attach LoRA, load the
global adapter slice, build the optimizer. Everything later stages need is one `Session`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_client.core.pruning import PruningPlan
from edge_client.data import InstructionExample
from edge_client.train.config import DEMO_EXAMPLES, TrainConfig, log, lr_factor
from prufed.common.errors import ConfigError


def resolve_plan(config: TrainConfig) -> tuple[PruningPlan, str, dict]:
    """(pruning plan, weight precision, how both were chosen) through `edge_client.planning`, the one planner
    `prufed plan` and `prufed edge run` use too."""
    from edge_client.layer_scores import plan_for_model, source_model_dir
    from edge_client.model import check_quant_available, num_layers_of
    from edge_client.planning import budget_label, device_spec, plan_training
    from prufed.common.models import read_model_config

    source = source_model_dir(config.model)
    num_layers = num_layers_of(source)
    if config.kept_layers is not None:
        depth: int | str = len(config.kept_layers)
    else:
        depth = num_layers if config.depth is None else config.depth
    if depth != "auto" and not 1 <= int(depth) <= num_layers:
        raise ConfigError("--depth", f"must be between 1 and {num_layers} (the model's layer count), got {depth}")
    if depth == "auto" or config.quant == "auto":
        spec = device_spec(config.profile, config.budget_gib)
        planned = plan_training(read_model_config(source), spec, planning_setup(config), quant=config.quant,
                                depth=depth, budget_source=budget_label(config.profile, config.budget_gib))
        quant, depth = planned.quant, planned.depth
        choice = planned.choice("auto" if config.depth == "auto" else "fixed")
    else:
        quant, choice = config.quant, {"mode": "fixed", "quant": config.quant, "quant_source": "flag"}
    check_quant_available(quant)
    if config.kept_layers is not None:
        plan = PruningPlan("explicit", num_layers, config.kept_layers, source_model=config.model,
                           protected=config.protect)
        return plan, quant, {**choice, "mode": "explicit"}
    return plan_for_model(config.model, config.strategy, int(depth), config.protect), quant, choice


def planning_setup(config: TrainConfig):
    """The memory planner's view of this run (device and precision are filled in by the planner)."""
    from edge_client.core.memory import TARGET_SHAPES, TrainingSetup

    # --targets may name modules of other architectures; the planner counts the LLaMA linears it has shapes for
    targets = tuple(t for t in config.lora_targets if t in TARGET_SHAPES) or TrainingSetup.lora_targets
    return TrainingSetup(seq_len=config.seq_len, batch=config.batch_size, lora_r=config.lora_r,
                         lora_targets=targets, gradient_checkpointing=config.gradient_checkpointing,
                         optimizer="adamw")


def load_data(config: TrainConfig, examples: list[InstructionExample] | None):
    """(train, heldout, source description): the given examples, a data file, or the built-in demo set."""
    from edge_client.data import load_examples, split_heldout

    if examples is None and config.data is None:
        from edge_client.demo_data import build_demo_examples

        count = config.max_examples or DEMO_EXAMPLES
        held = 0 if config.eval_fraction == 0 else min(config.max_eval_examples, max(1, round(count * config.eval_fraction)))
        train = build_demo_examples(count, seed=config.seed, split="train")
        heldout = build_demo_examples(held, seed=config.seed, split="heldout") if held else []
        return train, heldout, "built-in KJV demo tasks"
    if examples is None:
        examples, source = load_examples(config.data, config.data_format), str(config.data)
    else:
        examples, source = list(examples), "given examples"
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    train, heldout = split_heldout(examples, config.eval_fraction, config.seed)
    return train, heldout[: config.max_eval_examples], source


def digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (checkpoint keys for settings and data)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Session:
    """A run after set-up: the model with LoRA (and the global slice) loaded, its data and its optimizer."""

    config: TrainConfig
    plan: PruningPlan
    quant: str
    quant_detail: str
    depth_choice: dict
    fingerprint: str
    data_source: str
    model: Any  #: the PEFT model
    device: Any  #: torch.device
    rows: Any  #: TokenizedExamples of the training examples
    eval_rows: Any  #: TokenizedExamples of the held-out examples
    data_key: str  #: digest of the training token ids (a resume must see the same data)
    pad_id: int
    params: list  #: the trainable (LoRA) parameters
    optimizer: Any
    scheduler: Any

    @property
    def kept(self) -> list[int]:
        return list(self.plan.kept_layers)


def keep_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel during evaluation.

    Linear4bit (0.50.2) repacks on the first no-grad CPU forward (AVX512-BF16 machines) and from then on uses
    `gemv_4bit`, which has no autograd: later training would silently drop the input gradient through every
    quantized layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def set_up(config: TrainConfig, examples: list[InstructionExample] | None,
           global_adapter: Mapping | str | os.PathLike[str] | None) -> Session:
    """Plan, data, model, LoRA, global slice and optimizer, in the order that fixes every random draw."""
    import torch

    from edge_client.data import tokenize_examples
    from edge_client.model import attach_lora, load_model_dir, materialize_pruned
    from edge_client.planning import quant_description
    from prufed.common.adapter_format import load_adapter
    from prufed.common.models import fingerprint_model_dir, resolve_model
    from prufed.common.peft_bridge import load_adapter_state

    plan, quant, depth_choice = resolve_plan(config)
    kept = list(plan.kept_layers)
    fingerprint = fingerprint_model_dir(resolve_model(config.model))

    train_examples, heldout_examples, data_source = load_data(config, examples)
    model, tokenizer = load_model_dir(materialize_pruned(config.model, plan), quant)
    device = next(model.parameters()).device
    keep_4bit_differentiable(model)
    quant_detail = quant_description(quant)
    log(config, f"quant: {quant} ({quant_detail}) on {device.type}; depth {plan.depth}/{plan.source_num_layers} "
                f"({plan.strategy}), kept layers {kept}")

    rows = tokenize_examples(train_examples, tokenizer, config.seq_len)
    eval_rows = tokenize_examples(heldout_examples, tokenizer, config.seq_len)
    if not rows:
        raise ConfigError("--data", f"no training example fits --seq-len {config.seq_len} (all {rows.dropped} dropped)")
    data_key = digest([row["input_ids"] for row in rows])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(config.seed)
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, targets=config.lora_targets,
                        dropout=config.lora_dropout, gradient_checkpointing=config.gradient_checkpointing)
    if global_adapter is not None:
        tensors = load_adapter(global_adapter)[0] if isinstance(global_adapter, (str, os.PathLike)) else global_adapter
        load_adapter_state(model, tensors, kept)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.max_steps))
    return Session(config=config, plan=plan, quant=quant, quant_detail=quant_detail, depth_choice=depth_choice,
                   fingerprint=fingerprint, data_source=data_source, model=model, device=device, rows=rows,
                   eval_rows=eval_rows, data_key=data_key, pad_id=pad_id, params=params, optimizer=optimizer,
                   scheduler=scheduler)
