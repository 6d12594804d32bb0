"""Federated evaluation on the device: the client scores the global slice it downloaded on its own held-out
examples, before training, and sends only two numbers with its upload: the loss and how many examples it scored.

    loss = Σ_t −log p(x_t | x_<t) / N   over the N response tokens of the held-out examples (nats/token; see
                                        edge_client/evaluate.py), with the downloaded global loaded, dropout off

The held-out split is fixed for the agent's life (seeded, taken before any training), so successive rounds score
successive globals on the same examples, and these examples are never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_client.core.pruning import PruningPlan
from edge_client.data import InstructionExample

HELDOUT_FRACTION = 0.1
"""Share of the local examples held out for federated evaluation (capped by --eval-examples)."""


@dataclass(frozen=True)
class FederatedEval:
    loss: float  # nats/token over the held-out response tokens
    examples: int  # held-out examples scored (those with a response token left within --seq-len)
    tokens: int

    def to_json_dict(self) -> dict:
        return {"loss": self.loss, "examples": self.examples, "tokens": self.tokens}


def heldout_split(examples: Sequence[InstructionExample], max_heldout: int, seed: int
                  ) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """(train, heldout): min(max_heldout, 10%) of the examples (at least 1 when there are 2+) held out, seeded;
    max_heldout 0 holds out nothing."""
    from edge_client.data import split_heldout

    if max_heldout <= 0 or len(examples) < 2:
        return list(examples), []
    fraction = min(HELDOUT_FRACTION, max_heldout / len(examples))
    return split_heldout(examples, fraction, seed)


def score_global(model: str | None, plan: PruningPlan, global_state: Mapping, heldout: Sequence[InstructionExample],
                 *, seq_len: int, lora: Mapping, quant: str, batch_size: int = 4) -> FederatedEval | None:
    """The held-out loss of `global_state` (ORIGINAL keys, this plan's kept layers) on the pruned model, loaded in
    `quant` (the plan's resolved precision, never "auto"); None when no held-out example has a response token
    within `seq_len`."""
    import torch

    from edge_client.data import tokenize_examples
    from edge_client.evaluate import batched, masked_loss
    from edge_client.model import attach_lora, check_quant_available, load_model_dir, materialize_pruned
    from prufed.common.peft_bridge import load_adapter_state

    base, tokenizer = load_model_dir(Path(materialize_pruned(model, plan)), check_quant_available(quant))
    rows = tokenize_examples(heldout, tokenizer, seq_len)  # drops examples with no response token left
    if not rows:
        return None
    alpha = float(lora["alpha"])
    peft = attach_lora(base, r=int(lora["r"]), alpha=int(alpha) if alpha.is_integer() else alpha,
                       targets=tuple(lora["targets"]), dropout=0.0)
    load_adapter_state(peft, global_state, tuple(plan.kept_layers))
    peft.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        result = masked_loss(peft, batched(rows, pad, batch_size))
    return FederatedEval(result.loss, len(rows), result.tokens)
