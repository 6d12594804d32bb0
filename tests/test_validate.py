"""validate_update: every rejection path, each with its code and a message naming the fault; no mutation."""

from __future__ import annotations

import pytest
import torch

from aggregator.core.heteagg import HeteAggregator
from aggregator.core.init_adapter import initial_global_adapter
from aggregator.core.validate import UpdateRejected, validate_update
from prufed.common.adapter_keys import keys_for_layers, with_layer
from prufed.common.errors import PrufedError

CONFIG = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 4}
KEPT = (0, 2)


@pytest.fixture()
def global_state():
    return initial_global_adapter(CONFIG, r=2, alpha=4, targets=("q_proj", "v_proj"), seed=0)


@pytest.fixture()
def good(global_state):
    return {k: torch.full(global_state[k].shape, 0.01) for k in keys_for_layers(global_state, KEPT)}


def test_valid_update_passes(global_state, good):
    validate_update(good, kept_layers=KEPT, global_state=global_state, num_examples=3)


def test_huge_finite_values_whose_sum_overflows_pass(global_state, good):
    key = first_key(good)
    huge = torch.full(good[key].shape, 3.0e38)  # finite, but any two of them sum to inf in float32
    assert not torch.isfinite(huge.sum())
    validate_update({**good, key: huge}, kept_layers=KEPT, global_state=global_state, num_examples=1)


def first_key(update, layer=0):
    return next(k for k in sorted(update) if f".layers.{layer}." in k)


def mutations(global_state, good):
    """(name, update, kept_layers, num_examples, code, text the message must contain)."""
    key = first_key(good)
    missing = dict(good)
    del missing[key]
    extra_key = next(k for k in global_state if ".layers.1." in k)
    wrong_layer = {with_layer(k, 1) if ".layers.2." in k else k: v for k, v in good.items()}
    yield "missing key", missing, KEPT, 1, "wrong_keys", key
    yield "extra key", {**good, extra_key: torch.zeros(global_state[extra_key].shape)}, KEPT, 1, "wrong_keys", \
        "layers [1] are not in kept_layers"
    yield "wrong layer", wrong_layer, KEPT, 1, "wrong_keys", "missing"
    yield "foreign key", {**good, "lm_head.weight": torch.zeros(2)}, KEPT, 1, "wrong_keys", "lm_head.weight"
    yield "kept layer unknown", good, (0, 2, 9), 1, "bad_kept_layers", "[9]"
    yield "kept layer repeated", good, (0, 0, 2), 1, "bad_kept_layers", "distinct"
    yield "shape", {**good, key: torch.zeros(3, 3)}, KEPT, 1, "bad_shape", key
    yield "transposed", {**good, key: good[key].T.contiguous()}, KEPT, 1, "bad_shape", key
    yield "dtype", {**good, key: good[key].double()}, KEPT, 1, "bad_dtype", "float64"
    yield "not a tensor", {**good, key: [0.0]}, KEPT, 1, "bad_dtype", "list"
    nan, inf = good[key].clone(), good[key].clone()
    nan.view(-1)[3] = float("nan")
    inf.view(-1)[0], inf.view(-1)[1] = float("inf"), float("-inf")
    yield "nan", {**good, key: nan}, KEPT, 1, "non_finite", "1 NaN"
    yield "inf", {**good, key: inf}, KEPT, 1, "non_finite", "2 infinite"
    yield "zero examples", good, KEPT, 0, "bad_num_examples", "0"
    yield "negative examples", good, KEPT, -5, "bad_num_examples", "-5"
    yield "float examples", good, KEPT, 2.5, "bad_num_examples", "2.5"
    yield "bool examples", good, KEPT, True, "bad_num_examples", "True"


def test_every_rejection_path(global_state, good):
    cases = list(mutations(global_state, good))
    assert len({code for *_, code, _ in cases}) == 6
    for name, update, kept, n, code, text in cases:
        with pytest.raises(UpdateRejected) as info:
            validate_update(update, kept_layers=kept, global_state=global_state, num_examples=n)
        assert info.value.code == code, name
        assert text in str(info.value), (name, str(info.value))
        assert isinstance(info.value, PrufedError)


def test_rejected_update_leaves_global_and_aggregator_untouched(global_state, good):
    snapshot = {k: v.clone() for k, v in global_state.items()}
    aggregator = HeteAggregator(global_state)
    aggregator.add(good, 4)
    for name, update, kept, n, _code, _text in mutations(global_state, good):
        before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in update.items()}
        try:
            validate_update(update, kept_layers=kept, global_state=global_state, num_examples=n)
        except UpdateRejected:
            pass  # a rejected update is never added
        else:
            pytest.fail(f"{name} was accepted")
        for k, v in update.items():  # validation reads only
            assert (torch.equal(v, before[k]) if not v.isnan().any() else torch.equal(v.isnan(), before[k].isnan())) \
                if isinstance(v, torch.Tensor) else v == before[k]
    assert all(torch.equal(global_state[k], snapshot[k]) for k in snapshot)
    result = aggregator.finish()
    assert result.report["updates"] == 1
    for key in good:
        torch.testing.assert_close(result.state[key], snapshot[key] + good[key])
    for key in set(global_state) - set(good):
        assert torch.equal(result.state[key], snapshot[key])
