"""The adapter key scheme (pure): PEFT tensor names with `layers.{i}` as the ORIGINAL layer index.

A pruned PEFT model's `get_peft_model_state_dict` yields names such as
`base_model.model.model.layers.{j}.self_attn.q_proj.lora_A.weight` where j is the PRUNED index.
On the wire and on disk, j is replaced by kept_layers[j], so a full-depth global adapter loads directly into
PEFT on the unpruned model, and HeteAgg aligns clients of any depth by name alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from prufed.common.errors import PrufedError

LAYER_PATTERN = re.compile(r"(?<=\.layers\.)(\d+)(?=\.)")
T = TypeVar("T")


class KeySchemeError(PrufedError):
    """A tensor name does not fit the layer-aligned key scheme."""


def layer_of(key: str) -> int | None:
    """The layer index embedded in `key`, or None for a key outside the decoder layers."""
    match = LAYER_PATTERN.search(key)
    return int(match.group(1)) if match else None


def with_layer(key: str, layer: int) -> str:
    """`key` with its layer index replaced by `layer`."""
    if LAYER_PATTERN.search(key) is None:
        raise KeySchemeError(f"tensor {key!r} has no '.layers.N.' segment")
    return LAYER_PATTERN.sub(str(layer), key, count=1)


def to_original_keys(state: Mapping[str, T], kept_layers: Sequence[int]) -> dict[str, T]:
    """Rename a pruned model's adapter state dict: pruned index j -> ORIGINAL index kept_layers[j]."""
    renamed: dict[str, T] = {}
    for key, value in state.items():
        pruned = layer_of(key)
        if pruned is None:
            raise KeySchemeError(f"adapter tensor {key!r} is outside the decoder layers")
        if pruned >= len(kept_layers):
            raise KeySchemeError(f"adapter tensor {key!r} names pruned layer {pruned}, model keeps {len(kept_layers)}")
        renamed[with_layer(key, kept_layers[pruned])] = value
    return renamed


def to_pruned_keys(state: Mapping[str, T], kept_layers: Sequence[int]) -> dict[str, T]:
    """Select the kept layers of an ORIGINAL-keyed adapter and rename them to pruned indices.

    Tensors of dropped layers are left out; this is the slice a client of that depth downloads.
    """
    position = {original: pruned for pruned, original in enumerate(kept_layers)}
    renamed: dict[str, T] = {}
    for key, value in state.items():
        original = layer_of(key)
        if original is None:
            raise KeySchemeError(f"adapter tensor {key!r} is outside the decoder layers")
        if original in position:
            renamed[with_layer(key, position[original])] = value
    return renamed


def keys_for_layers(keys: Iterable[str], layers: Iterable[int]) -> list[str]:
    """The subset of ORIGINAL-keyed `keys` that belong to `layers`, sorted."""
    wanted = set(layers)
    return sorted(key for key in keys if layer_of(key) in wanted)


def layers_of_keys(keys: Iterable[str]) -> list[int]:
    """Sorted distinct layer indices named by `keys`."""
    return sorted({layer for layer in map(layer_of, keys) if layer is not None})
