"""Stage 5, outputs: held-out loss after training, then DIR/update.safetensors, DIR/adapter.safetensors and
DIR/metrics.json.

  update.safetensors    prufed-delta/1, Δ = local_after − start (the global slice, or PEFT's fresh init), ORIGINAL keys
  adapter.safetensors   the trained adapter itself (prufed-adapter/1)
  metrics.json          loss curve, eval loss/perplexity, tokens/s, peak memory, quant mode, depth, wall time
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from edge_client.train.checkpoint import Progress
from edge_client.train.config import METRICS_FILE, UPDATE_FILE, TrainResult, peak_rss_bytes
from edge_client.train.precision import precision_record
from edge_client.train.setup import Session
from edge_client.train.steps import evaluate_rows
from prufed.common.fsio import atomic_write_json


def write_outputs(session: Session, progress: Progress, out: Path, round: int, wall_start: float) -> TrainResult:
    """Score the trained adapter, write the update, the adapter and the metrics; return what was written."""
    import torch

    from prufed.common.adapter_format import DELTA_FORMAT, GLOBAL_FORMAT, AdapterMeta, save_adapter
    from prufed.common.peft_bridge import adapter_state

    config, plan, kept, device = session.config, session.plan, session.kept, session.device
    eval_after = evaluate_rows(session.model, session.eval_rows, session.pad_id, config.eval_batch_size)
    after_state = adapter_state(session.model, kept)
    delta = {key: after_state[key] - progress.start_state[key] for key in after_state}
    lora = {"r": config.lora_r, "alpha": config.lora_alpha, "targets": list(config.lora_targets)}
    update_path = save_adapter(out / UPDATE_FILE, delta, AdapterMeta(
        DELTA_FORMAT, tuple(kept), base_model=session.fingerprint, round=round, num_examples=len(session.rows),
        lora=lora))
    save_adapter(out / "adapter.safetensors", after_state,
                 AdapterMeta(GLOBAL_FORMAT, tuple(kept), base_model=session.fingerprint, round=round, lora=lora))

    step, seconds, tokens = progress.step, progress.train_seconds, progress.train_tokens
    metrics = {
        "model": config.model, "base_model": session.fingerprint, "device": device.type,
        "quant": session.quant, "quant_detail": session.quant_detail,
        "precision": precision_record(session.model, session.optimizer, session.quant),
        "batching": "length-grouped" if config.length_grouped and config.batch_size > 1 else "shuffled",
        "loss_positions": "trained" if config.trained_positions_loss else "all",
        "depth": plan.depth, "source_num_layers": plan.source_num_layers, "strategy": plan.strategy,
        "kept_layers": kept, "depth_choice": session.depth_choice, "lora": lora, "round": round,
        "data": session.data_source, "num_examples": len(session.rows), "num_heldout": len(session.eval_rows),
        "dropped_by_truncation": session.rows.dropped + session.eval_rows.dropped,
        "steps": step, "resumed_from_step": progress.resumed_from, "train_loss": progress.losses,
        "eval_before": progress.eval_before, "eval_after": eval_after,
        "train_tokens": tokens, "train_seconds": seconds, "train_cpu_seconds": progress.train_cpu_seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "step_time_s": seconds / step if step else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "wall_time_s": time.perf_counter() - wall_start,
        "update_path": str(update_path), "config": asdict(config),
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    return TrainResult(update_path=update_path, metrics=metrics, num_examples=len(session.rows))
