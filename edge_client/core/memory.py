"""Memory planner (pure): peak bytes of LoRA fine-tuning a layer-pruned LLaMA-family model, from its config alone.

Notation (config.json): h = hidden_size, I = intermediate_size, n_q = num_attention_heads, n_kv =
num_key_value_heads, d = head_dim (default h / n_q), V = vocab_size, d_kept = kept depth, b = batch, s = seq_len.

Per decoder layer the linear weights are  P_lin = h·n_q·d (q) + 2·h·n_kv·d (k, v) + n_q·d·h (o) + 3·h·I (MLP),
plus 2·h RMSNorm weights. Embeddings hold V·h parameters and an untied head another V·h (a tied head counts once).

Bytes per weight parameter of the decoder linears (QLoRA, Dettmers et al. 2023, §2-3; bitsandbytes):
  nf4 (double quantization, what `edge_client.model.load_model_dir` loads): 4 bit + an 8-bit absmax per 64-block
      + an fp32 second-level absmax per 256 blocks = 0.5 + 1/64 + 4/(64·256) ≈ 0.516 B
  nf4 without double quantization: 0.5 + 4/64 (fp32 absmax per 64-block) = 0.5625 B
  int8 (LLM.int8): 1 B + one fp32 scale per output row = 1 + 4/d_in B
  bf16: 2 B; fp32: 4 B
bitsandbytes quantizes only nn.Linear inside the decoder: embeddings, the head and the norms stay floating point,
and `peft.prepare_model_for_kbit_training` upcasts them to fp32 (4 B), so nf4/int8 pay 4 B per embedding parameter.

Adapter (LoRA rank r): r·(d_in + d_out) parameters per target per kept layer, fp32 (PEFT upcasts adapters).
Gradients 4 B/adapter parameter; AdamW keeps exp_avg + exp_avg_sq = 8 B/parameter; plain SGD keeps none.

Activations (act = 4 B: the residual stream is fp32 after k-bit preparation; 2 B in bf16 mode), per kept layer:
  without checkpointing: b·s·act·(A_H·h + A_Q·n_q·d + A_I·I + A_LORA·h·|targets|), the tensors autograd saves;
  with checkpointing: b·s·h·act (the layer's input) per layer, plus ONE layer's full set during its recompute.
Logits: b·s·V·4 B (the loss upcasts to fp32), held LOGIT_COPIES times at the peak (logits, log-softmax output
and their gradients during backward).
Overhead: RUNTIME_BYTES (Python + torch + transformers + peft + bitsandbytes resident set) on a CPU or a
unified-memory device; on a discrete GPU the CUDA context (CUDA_CONTEXT_BYTES). Plus LOAD_STAGING of the weight
bytes: while `from_pretrained` reads the safetensors file (memory-mapped) its pages stay resident next to the
model being built. The constants were calibrated on this repository's CPU machine, see CALIBRATION below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from prufed.common.errors import ConfigError, PrufedError

MIB = 2**20
GIB = 2**30
QUANT_MODES = ("nf4", "int8", "bf16", "fp32")  #: THE list of weight precisions (every flag and check uses it)
QUANT_CHOICES = ("auto", *QUANT_MODES)  #: what --quant accepts; edge_client.planning resolves "auto"
OPTIMIZERS = ("adamw", "sgd")
ACCELERATORS = ("cpu", "cuda")

NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # ≈ 0.5159 B/param (QLoRA §2, double quantization)
NF4_BYTES = 0.5 + 4 / 64  # 0.5625 B/param (QLoRA §2, fp32 absmax per 64-block)
FLOAT_BYTES = {"bf16": 2, "fp32": 4}
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
GRAD_BYTES = 4

# Activation elements autograd saves per token in one LLaMA decoder layer (see module docstring), derived from
# the LLaMA layer code (fp32, sdpa attention, whose CPU kernel keeps no s×s scores); see CALIBRATION.
A_H = 4.0  # two RMSNorms: input and normalised output each (derived; no-ckpt d=10 agrees within 3%)
A_Q = 4.0  # q, k, v (expanded to n_q heads by repeat_kv) and the attention output
A_I = 4.0  # gate, up, silu(gate), gate·up
A_LORA = 1.25  # per LoRA target: dropout output (fp32) + its bool mask
LOGIT_COPIES = 3.0
RUNTIME_BYTES = 500 * MIB  # measured: 388 MiB after the imports + ~116 MiB of library code the first backward maps
CUDA_CONTEXT_BYTES = 450 * MIB  # CUDA 12 context + cuBLAS workspace on Ampere, typically 300-500 MiB
CPU_SLACK_PER_LAYER = int(2.3 * MIB)  # glibc heap growth per kept layer, fitted on fp32 depths 10/20/30

CALIBRATION = """\
Measured on this repository's 2-core CPU machine (torch 2.13.0, transformers 5.23.0, peft 0.21.2, bitsandbytes
0.50.2), SmolLM2-135M pruned with `top` to d layers, LoRA r=8 on q,v, AdamW, seq 256, batch 1, gradient
checkpointing, full-length random sequences, peak RSS (VmHWM) over load + 3 training steps:
  imports (torch, transformers, peft, bitsandbytes): 388 MiB; the first backward maps +116 MiB of library code
  fp32  d=10:  911 MiB measured,  930 predicted (+2.1%)
  fp32  d=20: 1077 MiB measured, 1096 predicted (+1.8%)
  fp32  d=30: 1243 MiB measured, 1262 predicted (+1.5%)
  nf4   d=10:  995 MiB measured,  947 predicted (-4.8%)
  nf4   d=20: 1174 MiB measured, 1131 predicted (-3.7%)
  nf4   d=30: 1477 MiB measured in one run, 1314 predicted (-11%; not yet reproduced)
  nf4   d=10 without checkpointing: 1082 MiB measured, 1049 predicted (-3.0%)
RSS includes the memory-mapped checkpoint pages (`overhead`); they are clean page cache the kernel can drop under
pressure, so the prediction is conservative on a CPU. CUDA_CONTEXT_BYTES is not measured here (no GPU).
"""

TARGET_SHAPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The config.json figures the planner needs."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    num_hidden_layers: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        required = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
        missing = [key for key in required if key not in config]
        if missing:
            raise ConfigError("config.json", f"missing field(s) {missing} needed by the memory planner")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads
        shape = cls(
            hidden_size=hidden, intermediate_size=int(config["intermediate_size"]), num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            vocab_size=int(config["vocab_size"]), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_hidden_layers=int(config["num_hidden_layers"]),
        )
        for item in fields(shape):
            value = getattr(shape, item.name)
            if item.type == "int" and value < 1:
                raise ConfigError(f"config.json {item.name}", f"must be >= 1, got {value}")
        return shape

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every decoder linear, by PEFT target name."""
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: its linears plus two RMSNorm weights."""
        return sum(d_in * d_out for d_in, d_out in self.linear_dims().values()) + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


@dataclass(frozen=True)
class TrainingSetup:
    """What is trained and how; every check names the `prufed plan`/`prufed train` flag."""

    seq_len: int = 256  #: tokens per example
    batch: int = 1  #: examples per micro-batch
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    quant: str = "nf4"  #: nf4 | int8 | bf16 | fp32 (weights of the decoder linears)
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"  #: adamw | sgd (no momentum)
    accelerator: str = "cpu"  #: cpu | cuda: where overhead is the Python runtime or the CUDA context
    unified_memory: bool = False  #: cuda on shared CPU/GPU memory (Jetson): the runtime counts too
    double_quant: bool = True  #: nf4 with double quantization (what load_model_dir uses)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for flag, value in (("--seq-len", self.seq_len), ("--batch", self.batch), ("--lora-r", self.lora_r)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(flag, f"must be an integer >= 1, got {value!r}")
        if self.quant not in QUANT_MODES:
            raise ConfigError("--quant", f"must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("--optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError("accelerator", f"must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        unknown = [t for t in self.lora_targets if t not in TARGET_SHAPES]
        if not self.lora_targets or unknown or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError("--lora-targets", f"must be distinct names from {', '.join(TARGET_SHAPES)}, "
                              f"got {list(self.lora_targets)}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak bytes by component; `total_bytes` is their sum."""

    weights: int  #: decoder linears (quantized) + norms
    embeddings_and_head: int
    adapter: int
    optimizer_state: int
    gradients: int
    activations: int
    logits: int
    overhead: int  #: runtime or CUDA context + load staging

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, item.name) for item in fields(self))

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def mib(self) -> dict[str, float]:
        """Every component and the total in MiB (for tables)."""
        return {key: value / MIB for key, value in self.to_json_dict().items()}


@dataclass(frozen=True)
class DepthPlan:
    """The deepest fitting depth, its breakdown, and the predicted total for every depth 1..L."""

    depth: int
    breakdown: MemoryBreakdown
    budget_bytes: int
    totals: tuple[int, ...]  #: totals[i] = predicted bytes at depth i + 1

    def to_json_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "budget_bytes": self.budget_bytes, "breakdown": self.breakdown.to_json_dict(),
                "totals_by_depth": {str(i + 1): total for i, total in enumerate(self.totals)}}


class BudgetTooSmall(PrufedError):
    """Not even one decoder layer fits the memory budget."""

    def __init__(self, budget_bytes: int, needed_bytes: int):
        self.budget_bytes = budget_bytes
        self.needed_bytes = needed_bytes
        super().__init__(
            f"no depth fits the memory budget: even 1 layer needs {needed_bytes / MIB:.0f} MiB but the budget is "
            f"{budget_bytes / MIB:.0f} MiB; lower --seq-len or --batch, use --quant nf4, or pick a larger device"
        )


def checkpoint_bytes_per_param(model_config: Mapping[str, Any]) -> int:
    """Bytes per parameter of the checkpoint on disk: config `dtype` (transformers 5) or `torch_dtype`; 2 if unset."""
    dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "bfloat16")
    return 4 if dtype in ("float32", "torch.float32") else 2


def weight_bytes_per_param(quant: str, d_in: int, double_quant: bool = True) -> float:
    """Bytes per parameter of one decoder linear with input width d_in (see module docstring)."""
    if quant == "nf4":
        return NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES
    if quant == "int8":
        return 1.0 + 4.0 / d_in
    return float(FLOAT_BYTES[quant])


def activation_elements_per_token(shape: ModelShape, targets: tuple[str, ...]) -> float:
    """Elements autograd saves per token in one decoder layer without checkpointing."""
    q_width = shape.num_attention_heads * shape.head_dim
    return (A_H * shape.hidden_size + A_Q * q_width + A_I * shape.intermediate_size
            + A_LORA * sum(shape.linear_dims()[t][0] for t in targets))


def estimate_memory(model_config: Mapping[str, Any], depth: int, setup: TrainingSetup) -> MemoryBreakdown:
    """Predicted peak training memory (bytes) with `depth` kept decoder layers."""
    shape = ModelShape.from_config(model_config)
    if not 1 <= depth <= shape.num_hidden_layers:
        raise ConfigError("--depth", f"must be between 1 and {shape.num_hidden_layers}, got {depth}")
    dims = shape.linear_dims()
    float_bytes = 2 if setup.quant == "bf16" else 4  # nf4/int8: norms/embeddings upcast to fp32 by k-bit prep
    h = shape.hidden_size

    linear = sum(d_in * d_out * weight_bytes_per_param(setup.quant, d_in, setup.double_quant)
                 for d_in, d_out in dims.values())
    weights = depth * (linear + 2 * h * float_bytes) + h * float_bytes  # + the final norm
    embeddings = shape.embedding_params * float_bytes

    adapter_params = depth * setup.lora_r * sum(sum(dims[t]) for t in setup.lora_targets)
    adapter = adapter_params * 4
    gradients = adapter_params * GRAD_BYTES
    optimizer_state = adapter_params * (ADAMW_STATE_BYTES if setup.optimizer == "adamw" else 0)

    tokens = setup.batch * setup.seq_len
    one_layer = tokens * float_bytes * activation_elements_per_token(shape, setup.lora_targets)
    if setup.gradient_checkpointing:
        activations = depth * tokens * h * float_bytes + one_layer
    else:
        activations = depth * one_layer
    logits = LOGIT_COPIES * tokens * shape.vocab_size * 4

    overhead = 0.0
    if setup.accelerator == "cuda":
        overhead += CUDA_CONTEXT_BYTES
    if setup.accelerator == "cpu" or setup.unified_memory:
        overhead += RUNTIME_BYTES
    if setup.accelerator == "cpu":
        # from_pretrained memory-maps the checkpoint and the pages it read stay resident (RSS) for the model's
        # lifetime; tensors kept in the file's dtype alias those pages and are already counted above.
        checkpoint = checkpoint_bytes_per_param(model_config)
        file_bytes = (depth * (shape.layer_params) + h + shape.embedding_params) * checkpoint
        aliased = embeddings + (weights if setup.quant in FLOAT_BYTES else 0) if float_bytes == checkpoint else 0
        overhead += file_bytes - aliased
        overhead += CPU_SLACK_PER_LAYER * depth
    return MemoryBreakdown(
        weights=int(weights), embeddings_and_head=int(embeddings), adapter=int(adapter),
        optimizer_state=int(optimizer_state), gradients=int(gradients), activations=int(activations),
        logits=int(logits), overhead=int(overhead),
    )


def plan_depth(model_config: Mapping[str, Any], budget_bytes: int, setup: TrainingSetup) -> DepthPlan:
    """The deepest depth whose predicted peak is <= budget_bytes (totals grow with depth, so the first misfit
    ends the search). Raises `BudgetTooSmall` when depth 1 does not fit."""
    if isinstance(budget_bytes, bool) or budget_bytes < 0:
        raise ConfigError("--budget-gib", f"must be a positive memory budget, got {budget_bytes} bytes")
    shape = ModelShape.from_config(model_config)
    breakdowns = [estimate_memory(model_config, depth, setup) for depth in range(1, shape.num_hidden_layers + 1)]
    totals = tuple(item.total_bytes for item in breakdowns)
    fitting = [depth for depth, total in enumerate(totals, start=1) if total <= budget_bytes]
    if not fitting:
        raise BudgetTooSmall(int(budget_bytes), totals[0])
    depth = max(fitting)
    return DepthPlan(depth=depth, breakdown=breakdowns[depth - 1], budget_bytes=int(budget_bytes), totals=totals)


def choose_depth(model_config: Mapping[str, Any], budget_bytes: int, setup: TrainingSetup) -> int:
    """Deepest kept depth that fits `budget_bytes` (raises `BudgetTooSmall`, a PrufedError, if none does)."""
    return plan_depth(model_config, budget_bytes, setup).depth
