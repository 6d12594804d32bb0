"""Local LoRA instruction tuning of a layer-pruned model, with exact resume and a PruFed update file as output.

`train_local` runs five stages, one module each (the way litgpt's finetune scripts are staged):
  1. set-up      (setup.py)       plan kept layers and precision (`edge_client.planning`: fixed, `--depth N` or
                                  `--depth auto`) -> cached pruned copy -> load it -> attach LoRA -> load the global
                                  adapter slice (or keep PEFT's fresh init) -> AdamW + schedule
  2. restore     (checkpoint.py)  continue from DIR/checkpoint/state.pt, or start fresh (held-out loss before)
  3. fit         (fit.py)         `max_steps` optimizer steps (`steps.train_step`)
  4. checkpoint  (checkpoint.py)  every `checkpoint_every` steps, one file replaced atomically, so a kill resumes exactly
  5. outputs     (outputs.py)     held-out loss after -> DIR/update.safetensors, adapter.safetensors, metrics.json
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from edge_client.data import InstructionExample
from edge_client.train.config import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    METRICS_FILE,
    UPDATE_FILE,
    TrainConfig,
    TrainResult,
    lr_factor,
    peak_rss_bytes,
)
from edge_client.train.setup import load_data, resolve_plan

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FILE", "METRICS_FILE", "UPDATE_FILE", "TrainConfig", "TrainResult",
           "load_data", "lr_factor", "peak_rss_bytes", "resolve_plan", "train_local"]


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
    from edge_client.train.checkpoint import restore
    from edge_client.train.fit import fit
    from edge_client.train.outputs import write_outputs
    from edge_client.train.setup import set_up

    wall_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not resume and checkpoint_path.exists():
        checkpoint_path.unlink()  # a fresh run must never be mistaken for a resumable one later

    session = set_up(config, examples, global_adapter)
    progress = restore(session, checkpoint_path, resume)
    fit(session, progress, checkpoint_path, on_step)
    return write_outputs(session, progress, out, round, wall_start)
