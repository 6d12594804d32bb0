"""Product-space pieces (pure): pair LoRA factors into modules and re-factor a dense ΔW to rank r.

A LoRA module holds A [r, in] and B [out, r]; its weight change is ΔW = (alpha/r)·B·A. The scaling alpha/r is the
same for every client, so averaging B·A averages ΔW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from prufed.common.errors import PrufedError

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def lora_modules(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{module name: (lora_A key, lora_B key)}; raises PrufedError when a key is not half of an A/B pair."""
    keys = set(keys)
    modules: dict[str, tuple[str, str]] = {}
    for key in sorted(keys):
        if A_TAG in key:
            partner = key.replace(A_TAG, B_TAG, 1)
            module = key.split(A_TAG, 1)[0]
        elif B_TAG in key:
            partner = key.replace(B_TAG, A_TAG, 1)
            module = key.split(B_TAG, 1)[0]
        else:
            raise PrufedError(f"{key} is neither a lora_A nor a lora_B tensor; product space needs A/B pairs")
        if partner not in keys:
            raise PrufedError(f"{key} has no partner {partner}; product space needs A/B pairs")
        if A_TAG in key:
            modules[module] = (key, partner)
    return modules


def relative_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """‖target − approx‖_F / ‖target‖_F (0 when both are zero, inf when only target is)."""
    scale = float(torch.linalg.matrix_norm(target))
    diff = float(torch.linalg.matrix_norm(target - approx))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def refactor(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of `target` [out, in] (Eckart–Young): B = U_r·√S_r, A = √S_r·V_rᵀ.

    Returns (B [out, rank], A [rank, in], ‖target − B·A‖_F / ‖target‖_F). Zero-pads when rank > min(out, in).
    """
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(target.shape[0], rank, dtype=target.dtype, device=target.device)
    a = torch.zeros(rank, target.shape[1], dtype=target.dtype, device=target.device)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a, relative_error(target, b @ a)
