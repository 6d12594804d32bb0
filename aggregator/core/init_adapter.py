"""The round-0 global adapter (pure): full-depth LoRA factors named and shaped exactly as PEFT creates them.

For every layer i and target module m with weight [out, in]:
  `base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A.weight`  [r, in]   kaiming-uniform(a=√5), i.e.
      U(−1/√in, 1/√in), as PEFT's `init_lora_weights=True`
  `base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_B.weight`  [out, r]  zeros, so ΔW = 0 at round 0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prufed.common.errors import ConfigError

KEY_TEMPLATE = "base_model.model.model.layers.{layer}.{block}.{module}.lora_{factor}.weight"


def module_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[str, int, int]]:
    """{target module: (block, out_features, in_features)} of a LLaMA-family decoder layer."""
    try:
        hidden = int(model_config["hidden_size"])
        heads = int(model_config["num_attention_heads"])
        kv_heads = int(model_config.get("num_key_value_heads") or heads)
        intermediate = int(model_config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("model config", f"needs hidden_size, num_attention_heads, intermediate_size ({exc})") from exc
    head_dim = int(model_config.get("head_dim") or hidden // heads)
    return {
        "q_proj": ("self_attn", heads * head_dim, hidden),
        "k_proj": ("self_attn", kv_heads * head_dim, hidden),
        "v_proj": ("self_attn", kv_heads * head_dim, hidden),
        "o_proj": ("self_attn", hidden, heads * head_dim),
        "gate_proj": ("mlp", intermediate, hidden),
        "up_proj": ("mlp", intermediate, hidden),
        "down_proj": ("mlp", hidden, intermediate),
    }


def initial_global_adapter(model_config: Mapping[str, Any], r: int, alpha: float, targets: Sequence[str],
                           seed: int) -> dict[str, torch.Tensor]:
    """Full-depth ORIGINAL-keyed LoRA init (fp32, CPU), deterministic in `seed`.

    `alpha` only scales ΔW = (alpha/r)·B·A at forward time; it is checked here, not stored in the tensors.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError("--lora-r", f"must be an int >= 1, got {r!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError("--lora-alpha", f"must be a number > 0, got {alpha!r}")
    shapes = module_shapes(model_config)
    unknown = sorted(set(targets) - set(shapes))
    if not targets or unknown:
        raise ConfigError("--lora-targets", f"must be a non-empty subset of {sorted(shapes)}, got {list(targets)}")
    generator = torch.Generator().manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for layer in range(int(model_config["num_hidden_layers"])):
        for module in sorted(set(targets), key=list(shapes).index):
            block, out_features, in_features = shapes[module]
            a = torch.empty(r, in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            state[KEY_TEMPLATE.format(layer=layer, block=block, module=module, factor="A")] = a
            state[KEY_TEMPLATE.format(layer=layer, block=block, module=module, factor="B")] = torch.zeros(out_features, r)
    return state
