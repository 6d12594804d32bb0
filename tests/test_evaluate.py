"""Held-out evaluation: token-weighted NLL against a by-hand reference; padding and batching never change it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer

from edge_client.evaluate import IGNORE_INDEX, batched, masked_loss, perplexity

TEXTS = [
    "Blessed are the meek: for they shall inherit the earth.",
    "Ask, and it shall be given you.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures.",
    "Amen.",
]


def reference_nll(model, token_lists, label_lists=None):
    """Sum of -log p over scored tokens and their count, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for index, ids in enumerate(token_lists):
        labels = ids if label_lists is None else label_lists[index]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                total -= log_probs[t - 1, labels[t]].item()
                count += 1
    return total, count


def test_perplexity_matches_reference_and_ignores_padding():
    model, tokenizer = build_tiny_llama(4, seed=11), build_tiny_tokenizer()
    token_lists = [tokenizer(text)["input_ids"][:20] for text in TEXTS]
    total, count = reference_nll(model, token_lists)
    results = [perplexity(model, tokenizer, TEXTS, max_len=20, batch_size=size) for size in (1, 3, 4)]
    for result in results:
        assert result.tokens == count == sum(len(ids) - 1 for ids in token_lists)
        assert result.loss == pytest.approx(total / count, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_max_len_truncates():
    model, tokenizer = build_tiny_llama(2), build_tiny_tokenizer()
    assert perplexity(model, tokenizer, TEXTS, max_len=8).tokens == sum(min(len(t), 8) - 1 for t in
                                                                       tokenizer(TEXTS)["input_ids"])
    with pytest.raises(ValueError, match="max_len"):
        perplexity(model, tokenizer, TEXTS, max_len=1)


def test_masked_loss_scores_only_unmasked_labels():
    model = build_tiny_llama(4, seed=12)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [IGNORE_INDEX] * 3 + [8, 9, 10]},
        {"input_ids": [40, 41, 42], "labels": [IGNORE_INDEX, 41, 42]},
        {"input_ids": [70, 71, 72, 73, 74, 75, 76, 77], "labels": [IGNORE_INDEX] * 6 + [76, 77]},
    ]
    total, count = reference_nll(model, [r["input_ids"] for r in rows], [r["labels"] for r in rows])
    assert count == 3 + 2 + 2
    for size in (1, 2, 3):
        result = masked_loss(model, batched(rows, pad_token_id=0, batch_size=size))
        assert result.tokens == count
        assert result.loss == pytest.approx(total / count, rel=1e-5)
    # an unbatched example given as plain lists is accepted too
    single = masked_loss(model, [rows[1]])
    assert single.loss == pytest.approx(reference_nll(model, [rows[1]["input_ids"]], [rows[1]["labels"]])[0] / 2,
                                        rel=1e-5)


def test_padding_positions_are_never_scored_even_with_labels():
    model = build_tiny_llama(2, seed=13)
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    padded = masked_loss(model, [{"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}])
    plain = masked_loss(model, [{"input_ids": ids[:, :3], "labels": ids[:, :3]}])
    assert padded.tokens == plain.tokens == 2
    assert padded.loss == pytest.approx(plain.loss, rel=1e-6)


def test_nothing_to_score_is_an_error():
    model = build_tiny_llama(2)
    with pytest.raises(ValueError, match="no tokens"):
        masked_loss(model, [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3}])
