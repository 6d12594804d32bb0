"""Build real pruned HF models: load the base, drop layers, (optionally) quantize, attach LoRA.

Pruning a HF LLaMA-family model must fix, or a saved model reloads with silently random layers:
`config.num_hidden_layers`, every `self_attn.layer_idx` (renumbered 0..d-1, the KV cache's slot), and
`config.layer_types` where the model has it (Qwen2).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_client.core.memory import QUANT_MODES
from edge_client.core.pruning import PruningPlan
from prufed.common.errors import ConfigError, ModelError
from prufed.common.models import cache_root, check_model_dir, fingerprint_model_dir, resolve_model

PRUNING_FILE = "pruning.json"
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")

# On AVX512-BF16 CPUs bitsandbytes tries to fetch a fused NF4 kernel from the Hugging Face hub (`kernels`) and
# warns on every run when it cannot. PruFed is offline by design and bitsandbytes falls back to its built-in CPU
# kernels, so the warning is noise for our users; real errors from that module still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load_base_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """Load a local HF causal LM + tokenizer in `dtype` on the CPU; check it is LLaMA-family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    decoder_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of a causal LM (or of a PEFT wrapper around one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(base).__name__} has no model.model.layers; only LLaMA-family models are supported")
    return layers


def prune_model(model: nn.Module, kept_layers: tuple[int, ...] | list[int]) -> nn.Module:
    """Keep only `kept_layers` (ORIGINAL indices, ascending) in place, fixing config and layer indices."""
    layers = decoder_layers(model)
    num_layers = len(layers)
    if not kept_layers or any(not 0 <= i < num_layers for i in kept_layers):
        raise ConfigError("kept_layers", f"must be non-empty indices in [0, {num_layers}), got {list(kept_layers)}")
    if list(kept_layers) != sorted(set(kept_layers)):  # a repeated layer would share one module and KV slot
        raise ConfigError("kept_layers", f"must be strictly ascending without repeats, got {list(kept_layers)}")
    kept = [layers[i] for i in kept_layers]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.layers = nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = base.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
    return model


def save_pruned(model: nn.Module, tokenizer, plan: PruningPlan, out_dir: str | os.PathLike[str]) -> Path:
    """`save_pretrained` the pruned model and tokenizer, with `pruning.json` beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / PRUNING_FILE).write_text(plan.to_json() + "\n")
    return out


def read_plan(model_dir: str | os.PathLike[str]) -> PruningPlan | None:
    """The `pruning.json` beside a pruned model, or None for an unpruned one."""
    path = Path(model_dir) / PRUNING_FILE
    if not path.is_file():
        return None
    try:
        return PruningPlan.from_json_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc.msg})") from exc


def num_layers_of(model_dir: Path) -> int:
    return int(check_model_dir(model_dir)["num_hidden_layers"])


def materialize_pruned(model_spec: str | None, plan: PruningPlan) -> Path:
    """A cached on-disk copy of the pruned model, so it can be (re)loaded with quantization at load time.

    Keyed by the base fingerprint and kept layers: `$PRUFED_CACHE/pruned/<hash>/`. Written atomically.
    """
    base_dir = resolve_model(model_spec)
    if plan.source_num_layers != num_layers_of(base_dir):
        raise ConfigError(
            "pruning plan", f"was made for {plan.source_num_layers} layers, model {base_dir} has {num_layers_of(base_dir)}"
        )
    fingerprint = fingerprint_model_dir(base_dir)
    key = hashlib.sha256(f"{fingerprint}|{list(plan.kept_layers)}".encode()).hexdigest()[:20]
    target = cache_root() / "pruned" / key
    if (target / PRUNING_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        model, tokenizer = load_base_model(base_dir)
        prune_model(model, plan.kept_layers)
        save_pruned(model, tokenizer, plan, staging)
        (staging / "base-fingerprint.txt").write_text(fingerprint)
        with contextlib.suppress(OSError):  # another process won the race; its copy is identical
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ProbeResult:
    """Whether a precision was TRIED and worked on this device, and a one-line account of the try."""

    ok: bool
    device: str  #: "cuda" or "cpu": where training would run it (the device `load_model_dir` picks)
    detail: str
    native: bool | None = None  #: bf16 only: the hardware multiplies bf16 (else torch emulates it through fp32)


def training_device() -> str:
    """Where `load_model_dir` puts a model, so where the probes must try their kernels."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float32."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@functools.cache
def probe_bnb_4bit() -> ProbeResult:
    """Try what NF4 training does, on a 64x32 layer: quantize (double quant), forward and backward to the input.

    The forward must equal x·dequant(W)ᵀ (the kernel, not the quantization, is under test) within 1e-2 relative
    error, and the input gradient must be finite. Compute dtype as in `load_model_dir`: bf16 on CUDA, fp32 on CPU.
    """
    device = training_device()
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken CUDA setup raises RuntimeError at import
        return ProbeResult(False, device, f"bitsandbytes does not import: {type(exc).__name__}: {exc}".splitlines()[0])
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(32, 64, generator=generator)
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=compute, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        layer = layer.to(device)
        x = torch.randn(4, 64, generator=generator).to(device=device, dtype=compute).requires_grad_(True)
        y = layer(x)
        y.float().sum().backward()
        dequant = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute)
        error = _relative_error(y, x.detach() @ dequant.t())
    except Exception as exc:
        return ProbeResult(False, device, f"NF4 layer failed on {device}: {type(exc).__name__}: {exc}".splitlines()[0])
    if not (error < 1e-2 and x.grad is not None and bool(torch.isfinite(x.grad).all())):
        return ProbeResult(False, device, f"NF4 layer on {device} gave wrong results (relative error {error:.2g})")
    return ProbeResult(True, device, f"NF4 Linear4bit forward+backward on {device}, relative error {error:.1g} "
                                     f"vs the dequantized weight (bitsandbytes {bnb.__version__})")


def bitsandbytes_available() -> bool:
    """True when bitsandbytes' 4-bit kernels ran correctly here (`probe_bnb_4bit`; 0.50.2 supports the CPU too)."""
    return probe_bnb_4bit().ok


def native_bf16(device: str) -> bool:
    """The hardware multiplies bf16: CUDA compute capability >= 8.0 (Ampere, Jetson Orin), or a CPU with
    AVX512-BF16 or AMX-BF16. Elsewhere bf16 works but is emulated through fp32, slower than fp32 itself."""
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    capability = torch._C._cpu._get_cpu_capability()  # torch's cpuinfo flags, the ones its kernels dispatch on
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


@functools.cache
def probe_bf16() -> ProbeResult:
    """Try what bf16 training does: a bf16 matmul forward and backward on the training device, within 2e-2 of fp32
    (bf16 keeps 8 significant bits); `native` says whether the hardware does it or torch emulates it."""
    device = training_device()
    try:
        generator = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(16, 64, generator=generator), torch.randn(64, 16, generator=generator)
        a = a32.to(device=device, dtype=torch.bfloat16).requires_grad_(True)
        out = a @ b32.to(device=device, dtype=torch.bfloat16)
        out.float().sum().backward()
        error = _relative_error(out, a32 @ b32)
    except Exception as exc:
        return ProbeResult(False, device, f"bf16 matmul failed on {device}: {type(exc).__name__}: {exc}".splitlines()[0])
    native = native_bf16(device)
    if not (error < 2e-2 and a.grad is not None and bool(torch.isfinite(a.grad.float()).all())):
        return ProbeResult(False, device, f"bf16 matmul on {device} gave wrong results (relative error {error:.2g})",
                           native)
    how = "in hardware" if native else "emulated through fp32 (slower than fp32)"
    return ProbeResult(True, device, f"bf16 matmul forward+backward on {device}, relative error {error:.1g}; {how}",
                       native)


def check_quant_available(quant: str) -> str:
    """`quant` itself when this machine can load it (nf4/int8 need bitsandbytes); `auto` is resolved by
    `edge_client.planning` before a model is loaded."""
    if quant not in QUANT_MODES:
        raise ConfigError("--quant", f"must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if quant in ("nf4", "int8") and not bitsandbytes_available():
        raise ConfigError("--quant", f"{quant} needs bitsandbytes, which is not importable here")
    return quant


def load_model_dir(model_dir: Path, quant: str = "fp32"):
    """Load a (possibly pruned) model directory with the chosen weight precision.

    nf4: bitsandbytes 4-bit NormalFloat with double quantization, compute in bf16 on CUDA and fp32 on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict = {}
    if quant == "nf4":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device}
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    else:
        kwargs["dtype"] = torch.bfloat16 if quant == "bf16" else torch.float32
        if device == "cuda":
            kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=DEFAULT_LORA_TARGETS, dropout: float = 0.05,
                gradient_checkpointing: bool = False):
    """Wrap `model` in a PEFT LoRA model (k-bit preparation first when it is quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if r < 1:
        raise ConfigError("--lora-r", f"must be >= 1, got {r}")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # peft passes empty kwargs, which leaves torch's checkpoint guessing (and warning); non-reentrant is the
        # mode torch recommends and the one transformers uses on the full-precision path below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
