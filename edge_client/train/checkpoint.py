"""Stages 2 and 4, restore and checkpoint: the resumable state of a run in DIR/checkpoint/state.pt.

One file, replaced atomically every `checkpoint_every` steps: adapter, start point (the Δ's reference), optimizer,
scheduler, RNG, losses, token and time counters, and the step (= the data-order position). It is keyed by a digest
of the settings (all but `_RESUME_FREE_FIELDS`) and of the training token ids, so a resume with other flags or data
is refused, naming the flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_client.train.config import TrainConfig, log
from edge_client.train.setup import Session, digest
from prufed.common.errors import ConfigError
from prufed.common.fsio import atomic_path

# Fields that may differ between a run and its resume: they do not change the trained numbers.
_RESUME_FREE_FIELDS = ("checkpoint_every", "verbose")


@dataclass
class Progress:
    """Where the run stands: the counters `fit` advances and `outputs` reports."""

    start_state: dict  #: adapter tensors at step 0 (ORIGINAL keys): the Δ's reference
    eval_before: dict | None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_tokens: int = 0  #: non-padding tokens the optimizer steps consumed
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  #: process CPU time of the steps (all threads): the work, whatever else runs
    resumed_from: int = 0


def settings_key(config: TrainConfig) -> str:
    return digest({k: v for k, v in asdict(config).items() if k not in _RESUME_FREE_FIELDS})


def save_checkpoint(path: Path, session: Session, progress: Progress) -> None:
    """torch.save to a temp file beside `path`, then rename: a kill leaves the old or the new file, never half."""
    import torch

    from prufed.common.peft_bridge import adapter_state

    state = {
        "step": progress.step, "adapter": adapter_state(session.model, session.kept), "start": progress.start_state,
        "optimizer": session.optimizer.state_dict(), "scheduler": session.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(), "losses": progress.losses, "train_tokens": progress.train_tokens,
        "train_seconds": progress.train_seconds, "train_cpu_seconds": progress.train_cpu_seconds,
        "eval_before": progress.eval_before or {},
        "config": settings_key(session.config), "data": session.data_key,
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, config: TrainConfig, data_key: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or corrupt file
        raise ConfigError("--resume", f"{path} is not a readable checkpoint ({exc})") from None
    if state.get("config") != settings_key(config):
        raise ConfigError("--resume", f"{path} was written with different training settings; use the same flags "
                          "(only --checkpoint-every may change) or drop --resume")
    if state.get("data") != data_key:
        raise ConfigError("--resume", f"{path} was trained on different data; use the same --data or drop --resume")
    return state


def restore(session: Session, path: Path, resume: bool) -> Progress:
    """Continue from `path` when resuming and it exists; else a fresh start (held-out loss before training)."""
    import torch

    from edge_client.train.steps import evaluate_rows
    from prufed.common.peft_bridge import adapter_state, load_adapter_state

    config = session.config
    if not (resume and path.exists()):
        if resume:
            log(config, f"resume: no checkpoint in {path.parent}, starting at step 0")
        progress = Progress(start_state=adapter_state(session.model, session.kept),
                            eval_before=evaluate_rows(session.model, session.eval_rows, session.pad_id,
                                                      config.eval_batch_size))
        torch.manual_seed(config.seed)
        return progress
    state = _load_checkpoint(path, config, session.data_key)
    load_adapter_state(session.model, state["adapter"], session.kept)
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    step = int(state["step"])
    log(config, f"resume: continuing from step {step} of {config.max_steps}")
    return Progress(start_state=state["start"], eval_before=state["eval_before"] or None, step=step,
                    losses=list(state["losses"]), train_tokens=int(state["train_tokens"]),
                    train_seconds=float(state["train_seconds"]),
                    train_cpu_seconds=float(state.get("train_cpu_seconds", 0.0)), resumed_from=step)
