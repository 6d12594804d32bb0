"""Stage 3, fit: optimizer steps from `progress.step` to `max_steps`, a checkpoint every `checkpoint_every` steps.

Learning rate: linear warm-up over `warmup_steps`, then linear decay to 10% of `lr` at `max_steps` (`lr_factor`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edge_client.train.checkpoint import Progress, save_checkpoint
from edge_client.train.config import log
from edge_client.train.setup import Session
from edge_client.train.steps import full_logits_loss, micro_batches, train_step, trained_position_loss


def _progress_bar(enabled: bool):
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


def fit(session: Session, progress: Progress, checkpoint_path: Path,
        on_step: Callable[[int, float], None] | None = None) -> None:
    """Advance `progress` to `max_steps`. on_step(step, loss) runs after each step and its checkpoint; an exception
    it raises stops the run there, as a kill would."""
    import torch

    config = session.config
    if session.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(session.device)
    session.model.train()
    log_every = max(1, config.max_steps // 10)
    loss_fn = trained_position_loss if config.trained_positions_loss else full_logits_loss
    with _progress_bar(config.verbose) as bar:
        task = bar.add_task("train", total=config.max_steps, completed=progress.step,
                            loss=progress.losses[-1] if progress.losses else float("nan"),
                            tps=progress.train_tokens / progress.train_seconds if progress.train_seconds else 0.0)
        while progress.step < config.max_steps:
            started, cpu_started = time.perf_counter(), time.process_time()
            micro = micro_batches(session.rows, session.pad_id, config.batch_size, config.grad_accum, config.seed,
                                  progress.step, grouped=config.length_grouped)
            step_loss, tokens = train_step(session.model, micro, session.params, session.optimizer,
                                           session.scheduler, max_grad_norm=config.max_grad_norm,
                                           device=session.device, loss_fn=loss_fn)
            progress.step += 1
            progress.losses.append(step_loss)
            progress.train_tokens += tokens
            progress.train_seconds += time.perf_counter() - started
            progress.train_cpu_seconds += time.process_time() - cpu_started
            tps = progress.train_tokens / progress.train_seconds
            bar.update(task, completed=progress.step, loss=step_loss, tps=tps)
            if bar.disable and progress.step % log_every == 0:  # no live bar (a log file): a line every ~10%
                log(config, f"step {progress.step}/{config.max_steps} loss {step_loss:.4f} {tps:.0f} tok/s")
            if config.checkpoint_every and (progress.step % config.checkpoint_every == 0
                                            or progress.step == config.max_steps):
                save_checkpoint(checkpoint_path, session, progress)
            if on_step is not None:
                on_step(progress.step, step_loss)
