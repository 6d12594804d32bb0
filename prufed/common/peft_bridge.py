"""Convert between a (pruned) PEFT model's LoRA state and the ORIGINAL-layer key scheme, both directions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prufed.common.adapter_keys import KeySchemeError, to_original_keys, to_pruned_keys


def adapter_state(peft_model: nn.Module, kept_layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `peft_model` (pruned to `kept_layers`), keyed by ORIGINAL layer index, on CPU fp32."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {key: value.detach().to("cpu", torch.float32).clone() for key, value in to_original_keys(state, kept_layers).items()}


def load_adapter_state(peft_model: nn.Module, original_state: Mapping[str, torch.Tensor], kept_layers: Sequence[int]) -> None:
    """Load the kept-layer slice of an ORIGINAL-keyed adapter into `peft_model`; every LoRA tensor must be set."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    pruned = to_pruned_keys(original_state, kept_layers)
    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = sorted(expected - set(pruned)), sorted(set(pruned) - expected)
    if missing or unexpected:
        raise KeySchemeError(
            f"adapter does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    result = set_peft_model_state_dict(peft_model, dict(pruned))
    refused = list(getattr(result, "unexpected_keys", None) or [])
    if refused:
        raise KeySchemeError(f"PEFT refused adapter keys: {refused[:3]}")
