"""Local LoRA instruction tuning of a layer-pruned model, with exact resume and a PruFed update file as output.

One run: plan the kept layers (fixed, `--depth N` or `--depth auto` via the memory planner) -> cached pruned copy
-> load it quantized (NF4 when bitsandbytes works) -> attach LoRA -> load the global adapter slice (or keep PEFT's
fresh init) -> AdamW for `max_steps` optimizer steps -> held-out masked loss before and after ->
  DIR/update.safetensors   prufed-delta/1, Δ = local_after − global_before, ORIGINAL layer keys
  DIR/metrics.json         loss curve, eval loss/perplexity, tokens/s, peak memory, quant mode, depth, wall time
  DIR/checkpoint/state.pt  every `checkpoint_every` steps, one file replaced atomically (adapter, start point,
                           optimizer, scheduler, RNG, step = the data-order position) so a killed run resumes exactly

Learning rate: linear warm-up over `warmup_steps`, then linear decay to 10% of `lr` at `max_steps`.
Loss per step: mean token NLL (nats) over the response tokens of the step's micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_client.core.memory import QUANT_CHOICES
from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES, PruningPlan
from edge_client.data import FORMATS, InstructionExample
from prufed.common.errors import ConfigError
from prufed.common.fsio import atomic_path, atomic_write_json
from prufed.common.models import DEFAULT_MODEL

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
UPDATE_FILE = "update.safetensors"
METRICS_FILE = "metrics.json"
DEMO_EXAMPLES = 1000
# Fields that may differ between a run and its resume: they do not change the trained numbers.
_RESUME_FREE_FIELDS = ("checkpoint_every", "verbose")


@dataclass(frozen=True)
class TrainConfig:
    """One local training run. Every check names the `prufed train` flag that sets the field."""

    model: str = DEFAULT_MODEL  #: alias or local HF directory of the UNPRUNED base model
    depth: int | str | None = None  #: layers to keep; None = all; "auto" = deepest the memory planner fits
    strategy: str = DEFAULT_STRATEGY  #: pruning strategy (edge_client.core.pruning.STRATEGIES)
    protect: tuple[int, ...] = ()  #: ORIGINAL layer indices never dropped
    kept_layers: tuple[int, ...] | None = None  #: explicit ORIGINAL kept layers (e.g. from the server); wins over depth
    profile: str | None = None  #: hardware profile to emulate for depth="auto"
    budget_gib: float | None = None  #: memory budget (GiB) to emulate for depth="auto"; wins over profile
    data: str | None = None  #: instruction file; None = built-in demo data
    data_format: str | None = None  #: alpaca | dolly | gsm8k; None = detect
    max_examples: int | None = None  #: cap on examples read (train + held-out)
    eval_fraction: float = 0.1  #: held-out share of a data file
    max_eval_examples: int = 64  #: cap on held-out examples scored before/after
    max_steps: int = 60  #: optimizer steps
    batch_size: int = 1  #: examples per micro-batch
    grad_accum: int = 1  #: micro-batches per optimizer step
    lr: float = 2e-4  #: peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0  #: 0 disables clipping
    seq_len: int = 256  #: tokens per example (prompt + response + EOS), longer ones are cut
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.05
    quant: str = "auto"  #: auto | nf4 | int8 | bf16 | fp32
    gradient_checkpointing: bool = True
    seed: int = 0
    checkpoint_every: int = 20  #: steps between checkpoints; 0 = never
    eval_batch_size: int = 4
    verbose: bool = True  #: progress bar and mode lines on stderr

    def __post_init__(self) -> None:
        object.__setattr__(self, "protect", tuple(int(i) for i in self.protect))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.kept_layers is not None:
            object.__setattr__(self, "kept_layers", tuple(int(i) for i in self.kept_layers))
        depth = self.depth
        if isinstance(depth, bool) or not (depth is None or depth == "auto" or (isinstance(depth, int) and depth >= 1)):
            raise ConfigError("--depth", f"must be a positive integer or 'auto', got {depth!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError("--strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.budget_gib is not None and not (math.isfinite(self.budget_gib) and self.budget_gib > 0):
            raise ConfigError("--budget-gib", f"must be a positive number of GiB, got {self.budget_gib}")
        if self.data_format is not None and self.data_format not in FORMATS:
            raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {self.data_format!r}")
        positive = {"--max-steps": self.max_steps, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--lora-r": self.lora_r, "--lora-alpha": self.lora_alpha, "--eval-batch-size": self.eval_batch_size,
                    "--max-eval-examples": self.max_eval_examples}
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(flag, f"must be an integer >= 1, got {value!r}")
        if self.max_examples is not None and self.max_examples < 2:
            raise ConfigError("--max-examples", f"must be >= 2 (one to train, one to hold out), got {self.max_examples}")
        if self.seq_len < 8:
            raise ConfigError("--seq-len", f"must be >= 8 tokens, got {self.seq_len}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr", f"must be a positive number, got {self.lr}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("--eval-fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("--lora-dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ConfigError("--max-grad-norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ConfigError("--warmup-steps", f"must be >= 0, got {self.warmup_steps}")
        if self.checkpoint_every < 0:
            raise ConfigError("--checkpoint-every", f"must be >= 0 (0 = never), got {self.checkpoint_every}")
        if self.quant not in QUANT_CHOICES:
            raise ConfigError("--quant", f"must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("--targets", f"must name at least one module, got {list(self.lora_targets)}")


@dataclass(frozen=True)
class TrainResult:
    update_path: Path
    metrics: dict = field(default_factory=dict)
    num_examples: int = 0


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): (step+1)/warmup, then 1 -> 0.1 linearly."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0 - 0.9 * (step - warmup_steps) / max(1, max_steps - warmup_steps)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


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


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _resume_key(config: TrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in _RESUME_FREE_FIELDS}


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file beside `path`, then rename: a kill leaves the old or the new file, never half."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, config: TrainConfig, data_key: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or corrupt file
        raise ConfigError("--resume", f"{path} is not a readable checkpoint ({exc})") from None
    if state.get("config") != _digest(_resume_key(config)):
        raise ConfigError("--resume", f"{path} was written with different training settings; use the same flags "
                          "(only --checkpoint-every may change) or drop --resume")
    if state.get("data") != data_key:
        raise ConfigError("--resume", f"{path} was trained on different data; use the same --data or drop --resume")
    return state


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not (enabled and console.is_terminal))


def _log(config: TrainConfig, message: str) -> None:
    if config.verbose:
        print(message, file=sys.stderr, flush=True)


def _keep_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel during evaluation.

    Linear4bit (0.50.2) repacks on the first no-grad CPU forward (AVX512-BF16 machines) and from then on uses
    `gemv_4bit`, which has no autograd: later training would silently drop the input gradient through every
    quantized layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _evaluate(model, rows, pad_id: int, batch_size: int) -> dict | None:
    from edge_client.evaluate import batched, masked_loss

    if not rows:
        return None
    was_training = model.training
    model.eval()
    try:
        return masked_loss(model, batched(rows, pad_id, batch_size)).to_json_dict()
    finally:
        model.train(was_training)


def train_local(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    global_adapter: Mapping | str | os.PathLike[str] | None = None,
    examples: list[InstructionExample] | None = None,
    round: int = 0,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train LoRA on the pruned model and write DIR/update.safetensors + DIR/metrics.json (see module docstring).

    global_adapter: ORIGINAL-keyed tensors (or an adapter file) covering at least the kept layers; None = PEFT's
    fresh init, which is then the Δ's reference. resume: continue from DIR/checkpoint/state.pt when it exists.
    on_step(step, loss) runs after every optimizer step (and after its checkpoint); an exception it raises stops
    the run there, as a kill would.
    """
    import torch

    from edge_client.data import batch_indices, tokenize_examples
    from edge_client.evaluate import pad_batch
    from edge_client.model import attach_lora, load_model_dir, materialize_pruned
    from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, load_adapter, save_adapter
    from prufed.common.models import fingerprint_model_dir, resolve_model
    from prufed.common.peft_bridge import adapter_state, load_adapter_state

    wall_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not resume and checkpoint_path.exists():
        checkpoint_path.unlink()  # a fresh run must never be mistaken for a resumable one later

    plan, quant, depth_choice = resolve_plan(config)
    kept = list(plan.kept_layers)
    base_dir = resolve_model(config.model)
    fingerprint = fingerprint_model_dir(base_dir)

    train_examples, heldout_examples, data_source = load_data(config, examples)
    model_dir = materialize_pruned(config.model, plan)
    model, tokenizer = load_model_dir(model_dir, quant)
    device = next(model.parameters()).device
    _keep_4bit_differentiable(model)
    from edge_client.planning import quant_description

    quant_detail = quant_description(quant)
    _log(config, f"quant: {quant} ({quant_detail}) on {device.type}; depth {plan.depth}/{plan.source_num_layers} "
                 f"({plan.strategy}), kept layers {kept}")

    rows = tokenize_examples(train_examples, tokenizer, config.seq_len)
    eval_rows = tokenize_examples(heldout_examples, tokenizer, config.seq_len)
    if not rows:
        raise ConfigError("--data", f"no training example fits --seq-len {config.seq_len} (all {rows.dropped} dropped)")
    data_key = _digest([row["input_ids"] for row in rows])
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

    state = _load_checkpoint(checkpoint_path, config, data_key) if resume and checkpoint_path.exists() else None
    if state is None:
        if resume:
            _log(config, f"resume: no checkpoint in {checkpoint_path.parent}, starting at step 0")
        start_state = adapter_state(model, kept)
        eval_before = _evaluate(model, eval_rows, pad_id, config.eval_batch_size)
        step, losses, train_tokens, train_seconds = 0, [], 0, 0.0
        torch.manual_seed(config.seed)
    else:
        start_state = state["start"]
        load_adapter_state(model, state["adapter"], kept)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        eval_before = state["eval_before"] or None
        step, losses = int(state["step"]), list(state["losses"])
        train_tokens, train_seconds = int(state["train_tokens"]), float(state["train_seconds"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        _log(config, f"resume: continuing from step {step} of {config.max_steps}")
    resumed_from = step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    log_every = max(1, config.max_steps // 10)
    with _progress(config.verbose) as progress:
        task = progress.add_task("train", total=config.max_steps, completed=step,
                                 loss=losses[-1] if losses else float("nan"),
                                 tps=train_tokens / train_seconds if train_seconds else 0.0)
        while step < config.max_steps:
            started = time.perf_counter()
            micro = [pad_batch([rows[i] for i in batch_indices(len(rows), config.batch_size, config.seed,
                                                              step * config.grad_accum + k)], pad_id)
                     for k in range(config.grad_accum)]
            # Weight each micro-batch by its share of the step's response tokens: the step loss is a token mean.
            targets = [int((batch["labels"][:, 1:] != -100).sum()) for batch in micro]
            total_targets = max(1, sum(targets))
            step_loss = 0.0
            for batch, count in zip(micro, targets):
                batch = {key: value.to(device) for key, value in batch.items()}
                loss = model(**batch, use_cache=False).loss
                (loss * (count / total_targets)).backward()
                step_loss += float(loss.detach()) * count / total_targets
                train_tokens += int(batch["attention_mask"].sum())
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            train_seconds += time.perf_counter() - started
            progress.update(task, completed=step, loss=step_loss, tps=train_tokens / train_seconds)
            if progress.disable and step % log_every == 0:  # no live bar (a log file): a line every ~10%
                _log(config, f"step {step}/{config.max_steps} loss {step_loss:.4f} "
                             f"{train_tokens / train_seconds:.0f} tok/s")
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.max_steps):
                checkpoint = {
                    "step": step, "adapter": adapter_state(model, kept), "start": start_state,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng_cpu": torch.get_rng_state(), "losses": losses, "train_tokens": train_tokens,
                    "train_seconds": train_seconds, "eval_before": eval_before or {},
                    "config": _digest(_resume_key(config)), "data": data_key,
                }
                if torch.cuda.is_available():
                    checkpoint["rng_cuda"] = torch.cuda.get_rng_state()
                _save_checkpoint(checkpoint_path, checkpoint)
            if on_step is not None:
                on_step(step, step_loss)

    eval_after = _evaluate(model, eval_rows, pad_id, config.eval_batch_size)
    after_state = adapter_state(model, kept)
    delta = {key: after_state[key] - start_state[key] for key in after_state}
    lora = {"r": config.lora_r, "alpha": config.lora_alpha, "targets": list(config.lora_targets)}
    update_path = save_adapter(out / UPDATE_FILE, delta, AdapterMeta(
        DELTA_FORMAT, tuple(kept), base_model=fingerprint, round=round, num_examples=len(rows), lora=lora))
    save_adapter(out / "adapter.safetensors", after_state,
                 AdapterMeta(GLOBAL_FORMAT, tuple(kept), base_model=fingerprint, round=round, lora=lora))

    metrics = {
        "model": config.model, "base_model": fingerprint, "device": device.type,
        "quant": quant, "quant_detail": quant_detail,
        "depth": plan.depth, "source_num_layers": plan.source_num_layers, "strategy": plan.strategy,
        "kept_layers": kept, "depth_choice": depth_choice, "lora": lora, "round": round,
        "data": data_source, "num_examples": len(rows), "num_heldout": len(eval_rows),
        "dropped_by_truncation": rows.dropped + eval_rows.dropped,
        "steps": step, "resumed_from_step": resumed_from, "train_loss": losses,
        "eval_before": eval_before, "eval_after": eval_after,
        "train_tokens": train_tokens, "train_seconds": train_seconds,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0,
        "step_time_s": train_seconds / step if step else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "wall_time_s": time.perf_counter() - wall_start,
        "update_path": str(update_path), "config": asdict(config),
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    return TrainResult(update_path=update_path, metrics=metrics, num_examples=len(rows))

