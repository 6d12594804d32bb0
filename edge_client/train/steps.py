"""One optimizer step and its batches: the primitives `fit` loops over, usable on any loaded PEFT model (an
in-process experiment loop calls them on its own model; see `edge_client.train.precision` for the weights).

Loss per step: mean token NLL (nats) over the response tokens of the step's micro-batches; each micro-batch's mean
is weighted by its share of the step's response tokens, so the step loss is one token mean.
Batches (`micro_batches`): seeded per-epoch shuffles (`batch_indices`), re-cut by length when `grouped`
(`grouped_batch_indices`), so right-padding, which every layer would compute on, stays small.
Loss (`trained_position_loss`): the vocabulary projection (hidden × V, the largest matmul of a small model) only at
positions whose next token is trained, instead of `model(...).loss` over every position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edge_client.data import IGNORE_INDEX


def micro_batches(rows: Sequence, pad_id: int, batch_size: int, grad_accum: int, seed: int, step: int, *,
                  grouped: bool = False) -> list[dict]:
    """The `grad_accum` padded micro-batches of optimizer step `step` (a pure function of the step: exact resume);
    `grouped`: rows of similar length batched together (no effect at batch size 1, which never pads)."""
    from edge_client.data import batch_indices, grouped_batch_indices
    from edge_client.evaluate import pad_batch

    if grouped and batch_size > 1:
        lengths = [len(row["input_ids"]) for row in rows]
        positions = [grouped_batch_indices(lengths, batch_size, seed, step * grad_accum + k) for k in range(grad_accum)]
    else:
        positions = [batch_indices(len(rows), batch_size, seed, step * grad_accum + k) for k in range(grad_accum)]
    return [pad_batch([rows[i] for i in indices], pad_id) for indices in positions]


def full_logits_loss(model, batch: dict):
    """transformers' own causal-LM loss: logits at every position, mean NLL over labels != -100."""
    return model(**batch, use_cache=False).loss


def trained_position_loss(model, batch: dict):
    """The same mean NLL as `full_logits_loss`, with the head applied only where a label is trained.

    loss = mean over {(b, t): labels[b, t+1] != -100} of −log softmax(W_head · h[b, t])[labels[b, t+1]], h the
    final (normed) hidden state. LLaMA-family heads have no logit scaling or soft-capping, so this is exact.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[:, :-1][trained]).float()
    return torch.nn.functional.cross_entropy(logits, targets[trained])


def train_step(model, micro: list[dict], params: list, optimizer, scheduler=None, *, max_grad_norm: float = 1.0,
               device: Any = None, loss_fn: Callable = full_logits_loss) -> tuple[float, int]:
    """Forward/backward over `micro` with `loss_fn(model, batch)`, clip, one optimizer (and scheduler) step.
    Returns (step loss in nats per trained token, non-padding tokens consumed)."""
    import torch

    targets = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro]
    total_targets = max(1, sum(targets))
    step_loss, tokens = 0.0, 0
    for batch, count in zip(micro, targets):
        batch = {key: value.to(device) for key, value in batch.items()} if device is not None else batch
        loss = loss_fn(model, batch)
        (loss * (count / total_targets)).backward()
        step_loss += float(loss.detach()) * count / total_targets
        tokens += int(batch["attention_mask"].sum())
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


def evaluate_rows(model, rows: Sequence, pad_id: int, batch_size: int) -> dict | None:
    """Held-out masked loss (`edge_client.evaluate.masked_loss`) in eval mode; None without rows."""
    from edge_client.evaluate import batched, masked_loss

    if not rows:
        return None
    was_training = model.training
    model.eval()
    try:
        return masked_loss(model, batched(rows, pad_id, batch_size)).to_json_dict()
    finally:
        model.train(was_training)
