"""Stage inputs: `TrainConfig` (what `prufed train` was given), file names and the learning-rate schedule."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.core.memory import QUANT_CHOICES
from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from edge_client.data import FORMATS
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
UPDATE_FILE = "update.safetensors"
METRICS_FILE = "metrics.json"
DEMO_EXAMPLES = 1000


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
    # The fast CPU path's pieces (no flags: always on in `prufed train`; scripts/bench_edge.py turns them off to
    # measure the path they replaced).
    length_grouped: bool = True  #: batch rows of similar length together (less padding computed)
    trained_positions_loss: bool = True  #: vocabulary projection only where a label is trained

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


def log(config: TrainConfig, message: str) -> None:
    """A mode or progress line on stderr when `config.verbose`."""
    if config.verbose:
        print(message, file=sys.stderr, flush=True)
