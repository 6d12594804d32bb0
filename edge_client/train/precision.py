"""Weight precision on the CPU: bf16 base weights where the CPU multiplies bf16 natively, LoRA and AdamW in fp32.

Measured here (AMX, SmolLM2-135M LoRA step): bf16 base weights 0.53-0.65× the fp32 step time (see
`edge_client.planning.CPU_SPEED_ORDER`). The frozen base is only read, so bf16 costs it rounding (8 mantissa bits);
the trained LoRA matrices and AdamW's moments stay fp32 (PEFT computes the adapter branch in the adapter's dtype),
so small updates are not lost to bf16 rounding. `prufed train --quant auto` makes this choice through
`edge_client.planning`; an in-process loop that already holds a model uses `apply_precision`.
"""

from __future__ import annotations

from typing import Any

FLOAT_QUANTS = ("bf16", "fp32")


def fastest_float_precision() -> str:
    """bf16 where this CPU multiplies bf16 natively (AMX / AVX512-BF16), else fp32: `--quant auto`'s CPU rule
    when memory is no constraint."""
    from edge_client.model import native_bf16

    return "bf16" if native_bf16("cpu") else "fp32"


def apply_precision(model, quant: str):
    """Cast the frozen floating-point parameters of a LoRA-wrapped `model` to `quant`'s dtype in place and keep the
    trainable ones (LoRA) fp32. Call it after `attach_lora` and before building the optimizer (AdamW's moments then
    follow the fp32 LoRA parameters)."""
    import torch

    if quant not in FLOAT_QUANTS:
        raise ValueError(f"apply_precision takes one of {FLOAT_QUANTS}, got {quant!r} (nf4/int8 are load-time)")
    dtype = torch.bfloat16 if quant == "bf16" else torch.float32
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
    return model


def precision_record(model, optimizer=None, quant: str | None = None) -> dict[str, Any]:
    """What metrics.json records: the dtypes actually held by the frozen weights, the trained (LoRA) parameters
    and the optimizer state, and whether this CPU has native bf16."""
    from edge_client.model import native_bf16

    def names(tensors) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    state: list = []
    if optimizer is not None:
        state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "dtype") and v.dim() > 0]
    return {"quant": quant, "base_weights": names(frozen), "trained": names(trained),
            "optimizer_state": names(state), "cpu_native_bf16": native_bf16("cpu")}
