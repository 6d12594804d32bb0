"""The message layout PruFed's ClientApp and Strategy agree on (Flower 1.42 Message API).

Server -> client (TRAIN): RecordDict {"arrays": ArrayRecord, "config": ConfigRecord}
    arrays  the global adapter, ORIGINAL-layer keys; only the node's kept layers once the server knows them
    config  "server-round" plus the task's hyper-parameters (TASK_KEYS)
Client -> server: RecordDict {"arrays": ArrayRecord, "metrics": MetricRecord, "prufed": ConfigRecord}
    arrays   Δ = local − global of the kept layers, ORIGINAL-layer keys (float32)
    metrics  "num-examples" (the aggregation weight), "train-loss", "train-seconds", "train-wall-s", "depth",
             "eval-loss" / "eval-examples" (the received global scored on the node's held-out examples; 0 = none)
    prufed   "kept-layers" (list of ORIGINAL indices), "plan" (PruningPlan JSON), "partition-id" (or -1)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from prufed.common.adapter_keys import keys_for_layers

ARRAYS, CONFIG, METRICS, PRUFED = "arrays", "config", "metrics", "prufed"
NUM_EXAMPLES, KEPT_LAYERS, PLAN, PARTITION = "num-examples", "kept-layers", "plan", "partition-id"
#: Hyper-parameters a TRAIN message carries (the same set `prufed aggregator` hands out in PullTask).
TASK_KEYS = ("max-steps", "lr", "batch-size", "seq-len", "lora-r", "lora-alpha", "lora-targets")


def to_array_record(state: Mapping[str, torch.Tensor]):
    """ArrayRecord of CPU tensors (numpy .npy bytes: float32 values travel bit-exact)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({key: value.detach().cpu().contiguous() for key, value in state.items()})


def to_state(record) -> dict[str, torch.Tensor]:
    """ORIGINAL-keyed tensors of an ArrayRecord (copies, writable)."""
    return {key: torch.from_numpy(array.numpy().copy()) for key, array in record.items()}


def slice_state(state: Mapping[str, torch.Tensor], layers: Iterable[int]) -> dict[str, torch.Tensor]:
    """The tensors of `layers` only: what a node of known depth needs to download."""
    return {key: state[key] for key in keys_for_layers(state, layers)}


def task_hyper(config: Mapping) -> tuple[dict, dict]:
    """(hyper-parameters, LoRA settings) of a TRAIN ConfigRecord, in the agent's PullTask vocabulary."""
    missing = [key for key in TASK_KEYS if key not in config]
    if missing:
        raise KeyError(f"the TRAIN message's ConfigRecord lacks {missing} (PruFedStrategy sends them)")
    hyper = {"max_steps": int(config["max-steps"]), "lr": float(config["lr"]), "batch_size": int(config["batch-size"]),
             "seq_len": int(config["seq-len"])}
    lora = {"r": int(config["lora-r"]), "alpha": float(config["lora-alpha"]),
            "targets": [t for t in str(config["lora-targets"]).split(",") if t]}
    return hyper, lora
