"""Held-out evaluation: token-weighted mean negative log-likelihood and perplexity.

  loss = sum_t -log p(x_t | x_<t) / N    over the N predicted (non-masked, non-padding) tokens, in nats/token
  perplexity = exp(loss)

Batches are padded on the right with attention_mask 0 and label -100, so padding never changes the result:
causal attention means real tokens never see the pads that follow them, and pads are never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edge_client.data import IGNORE_INDEX


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean NLL per predicted token, nats
    perplexity: float  # exp(loss)
    tokens: int  # predicted tokens that were scored

    def to_json_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def pad_batch(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples `{input_ids, labels?}` into [B, T] tensors with attention_mask; labels default to ids."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(list(row["input_ids"]), dtype=torch.long)
        n = ids.numel()
        input_ids[i, :n] = ids
        labels[i, :n] = torch.as_tensor(list(row["labels"]), dtype=torch.long) if "labels" in row else ids
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batched(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, batch_size: int = 4):
    """Yield right-padded batches of `batch_size` examples (see `pad_batch`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(rows), batch_size):
        yield pad_batch(rows[start : start + batch_size], pad_token_id)


def _as_batch(batch: Mapping[str, object]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)
    if input_ids.dim() == 1:  # a single unbatched example
        input_ids, labels = input_ids[None], labels[None]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(input_ids.shape)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    # A padded position is never a target, whatever its label says.
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return input_ids, labels, mask


@torch.inference_mode()
def masked_loss(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Token-weighted mean NLL over batches of input_ids/labels(/attention_mask); labels -100 are ignored.

    labels are aligned with input_ids (HF convention): logits at position t predict labels[t + 1].
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for index, batch in enumerate(batches):
        input_ids, labels, mask = _as_batch(batch)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((targets != IGNORE_INDEX).sum())
        if on_batch is not None:
            on_batch(index + 1)
    if total_tokens == 0:
        raise ValueError("no tokens to score: every label is masked or every text is shorter than 2 tokens")
    loss = total_nll / total_tokens
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=total_tokens)


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_len: int = 256,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Perplexity of `model` on `texts`, each cut to its first `max_len` tokens (tokens 2..n are scored)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    rows = [{"input_ids": ids[:max_len]} for ids in encoded if len(ids) >= 2]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return masked_loss(model, batched(rows, pad_id, batch_size), on_batch=on_batch)
