"""Export a pruned (optionally LoRA-merged) LLaMA-family decoder to ONNX with a KV cache, and verify it.

The graph (legacy TorchScript exporter, opset 17 by default):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float32 for i in 0..depth-1
  outputs  logits [batch, seq, vocab] float32, present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]
`i` is the PRUNED index (the KV slot); `export.json` maps it to ORIGINAL layers through `kept_layers`.
A prefill passes past tensors with past = 0. Every axis named above is dynamic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_client.global_adapter import ExportSource, build_merged_model, read_global_adapter
from edge_client.model import PRUNING_FILE
from edge_client.onnx_generate import (
    EXPORT_FILE,
    INT4_FILE,
    INT8_FILE,
    ONNX_FILE,
    OnnxDecoder,
    left_pad,
    past_names,
    position_ids_for,
)
from prufed.common.adapter_format import AdapterMeta
from prufed.common.errors import ConfigError, PrufedError
from prufed.common.fsio import staged_dir
from prufed.common.models import fingerprint_model_dir

EXPORT_FORMAT = "prufed-onnx/1"
DEFAULT_OPSET = 17
#: Max |logit_ort - logit_torch| allowed for the fp32 graph, as a fraction of max(1, max |logit|): fp32 kernels
#: sum in different orders, so the gap scales with the logits. Measured on the default model (|logit| up to ~30):
#: 5e-5 .. 1.6e-4 absolute, i.e. up to ~5e-6 relative, at 30/20/10 layers.
FP32_TOLERANCE = 2e-5
#: Fixed verification prompts: different lengths, so the batch of 2 is left-padded.
PARITY_PROMPTS = ("In the beginning God created the heaven and the earth.", "And God said,")


class ExportError(PrufedError):
    """The exported graph disagrees with PyTorch, or the export itself failed."""


class DecoderWithCache(nn.Module):
    """Flat-tensor front of a causal LM: rebuilds a DynamicCache from past tensors, returns logits + presents."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.depth = int(model.config.num_hidden_layers)

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.depth):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def io_names(depth: int) -> tuple[list[str], list[str]]:
    """(graph input names, graph output names) in positional order."""
    presents = [name.replace("past_key_values.", "present.") for name in past_names(depth)]
    return ["input_ids", "attention_mask", "position_ids", *past_names(depth)], ["logits", *presents]


def cache_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of one cached key or value row."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(getattr(config, "num_key_value_heads", None) or heads), head_dim


def export_decoder(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace `model` behind `DecoderWithCache` with example batch 2, seq 3, past 7 (a padded row included)."""
    depth = int(model.config.num_hidden_layers)
    kv_heads, head_dim = cache_shape(model.config)
    batch, seq, past = 2, 3, 7
    input_ids = torch.randint(3, int(model.config.vocab_size), (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[1, :2] = 0
    positions = torch.from_numpy(position_ids_for(mask.numpy(), seq))
    pasts = [torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * depth)]
    inputs, outputs = io_names(depth)
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dynamic.update({name: {0: "batch", 2: "past"} for name in inputs[3:]})
    dynamic.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches in transformers' cache/mask code; the example inputs take the
        # general branch (non-empty past, a padded row) and `parity` then checks the empty-past prefill path.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(DecoderWithCache(model), (input_ids, mask, positions, *pasts), str(path),
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False, do_constant_folding=True)


def parity(model: nn.Module, tokenizer, onnx_path: Path, prompts: Sequence[str] = PARITY_PROMPTS) -> dict:
    """Max |logits| difference ORT vs torch on a left-padded prefill and one decode step with the cache.

    Only real (unpadded) positions count: a fully masked query row has no defined output.
    """
    depth = int(model.config.num_hidden_layers)
    kv_shape = cache_shape(model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], pad_id)
    decoder = OnnxDecoder(onnx_path, depth, kv_shape)
    ort_logits, presents = decoder(ids, mask)
    wrapper = DecoderWithCache(model)
    empty = [torch.zeros(len(prompts), kv_shape[0], 0, kv_shape[1])] * (2 * depth)
    with torch.no_grad():
        torch_out = wrapper(torch.from_numpy(ids), torch.from_numpy(mask),
                            torch.from_numpy(position_ids_for(mask, ids.shape[1])), *empty)
    torch_logits = torch_out[0].numpy()
    real = mask.astype(bool)
    prefill = float(np.abs(ort_logits[real] - torch_logits[real]).max())

    next_ids = torch_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    step_mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
    ort_step, _ = decoder(next_ids, step_mask, presents)
    with torch.no_grad():
        torch_step = wrapper(torch.from_numpy(next_ids), torch.from_numpy(step_mask),
                             torch.from_numpy(position_ids_for(step_mask, 1)), *torch_out[1:])[0].numpy()
    decode = float(np.abs(ort_step - torch_step).max())
    agree = float((ort_logits[real].argmax(-1) == torch_logits[real].argmax(-1)).mean())
    # The scale puts the absolute diff in context: fp32 rounding is ~1e-6 of it.
    scale = float(np.abs(torch_logits[real]).max())
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "argmax_agreement": agree,
            "max_abs_logit": scale, "prompts": list(prompts)}


INT8_KEEP_FP32 = "/mlp/down_proj/"  #: MatMul nodes whose name holds this stay fp32 in the int8 copy


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMul weights, one scale per output channel, activations quantized per
    call with one scale per tensor; the MLP down-projections stay fp32.

    Why down_proj stays fp32: its input, the SwiGLU product, carries the few huge activation outliers of LLaMA-family
    models, and one per-tensor activation scale then rounds every other channel to zero. Measured on the 30-layer
    default model (6 held-out passages, 2 threads): quantizing every MatMul gives ppl +79% over fp32 at 0.50x its
    prefill latency; keeping the 30 down_proj MatMuls fp32 gives ppl +7.7% at 0.60x prefill and 1.5x decode tokens/s.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    keep_fp32 = [node.name for node in graph.node if node.op_type == "MatMul" and INT8_KEEP_FP32 in node.name]
    # quantize_dynamic logs a "consider pre-processing" hint on the root logger every call; not actionable here.
    hint = _DropMessage("pre-processing before quantization")
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=keep_fp32)
    finally:
        logging.getLogger().removeFilter(hint)


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


#: int4 weight rounding: "hqq" (half-quadratic: scale and zero point fitted per block to minimise the l_0.7 norm
#: of the weight error, no calibration data) or "rtn" (round to nearest between the block's min and max).
#: See `quantize_int4` for the measurement behind these defaults.
INT4_ALGORITHM = "hqq"
INT4_ALGORITHMS = ("hqq", "rtn")
#: Weights per int4 scale and zero point (MatMulNBits `block_size`).
INT4_BLOCK_SIZE = 32
#: MatMulNBits `accuracy_level` 4: activations are quantized to int8 per block inside the kernel, so the matmul
#: runs on int8 dot-product units (AVX512-VNNI/AMX here, NEON dot-product on ARM) instead of fp32.
INT4_ACCURACY_LEVEL = 4


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE, algorithm: str = INT4_ALGORITHM,
                  bits: int = 4) -> None:
    """Weight-only quantization of every constant-weight MatMul with onnxruntime's MatMulNBits quantizer.

    Each run of `block_size` input weights of one output column gets its own scale s and zero point z:
    w ~ s * (q - z), q in [0, 2^bits). Weights cost bits/8 + ~4/block_size bytes each (int4, block 32: ~0.63 B
    vs 4 B fp32). Unlike `quantize_int8` no per-tensor activation scale exists, so LLaMA's activation outliers
    cost little and every MatMul, down_proj and the LM head included, is quantized.
    """
    import onnx

    if algorithm not in INT4_ALGORITHMS:
        raise ConfigError("--int4-algorithm", f"must be one of {', '.join(INT4_ALGORITHMS)}, got {algorithm!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError("--int4-block-size", f"must be a power of two >= 16, got {block_size}")
    root_level = logging.getLogger().level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # Importing that module runs logging.basicConfig(level=INFO), and the quantizer logs a line per graph node:
    # thousands of stray stderr lines. Its warnings still show.
    logging.getLogger().setLevel(root_level)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    config = (HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits) if algorithm == "hqq" else
              DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits))
    with warnings.catch_warnings():
        # HQQ wraps read-only numpy weights in torch tensors it never writes to.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
    model = quantizer.model.model
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", INT4_ACCURACY_LEVEL))
    onnx.save(model, str(dst))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def export_onnx(source: ExportSource, out_dir: Path, *, adapter: Path | None = None, int8: bool = False,
                int4: bool = False, int4_block_size: int = INT4_BLOCK_SIZE, int4_algorithm: str = INT4_ALGORITHM,
                opset: int = DEFAULT_OPSET, tolerance: float = FP32_TOLERANCE,
                on_stage: Callable[[str], None] | None = None) -> dict:
    """Build, merge, export, verify and write `out_dir`; returns the export.json contents.

    Raises ExportError (and leaves `out_dir` untouched) when the fp32 graph's max |logit diff| exceeds
    `tolerance` x max(1, max |logit|).
    """
    stage = on_stage or (lambda _name: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError("--out", f"{out_dir} exists and is not an empty directory")
    if not 7 <= opset <= 20:
        raise ConfigError("--opset", f"the TorchScript exporter supports opsets 7..20, got {opset}")
    base_fingerprint = fingerprint_model_dir(source.base_dir)
    adapter_state = meta = None
    if adapter is not None:
        stage("reading adapter")
        adapter_state, meta = read_global_adapter(Path(adapter), source.plan, base_fingerprint)
    stage("loading and merging model")
    model, tokenizer = build_merged_model(source.model_dir, source.plan.kept_layers, adapter_state, meta)
    # Eager attention materialises the 4-D mask on every path, so tracing bakes in no padding shortcut.
    model.config._attn_implementation = "eager"
    with staged_dir(out_dir) as staging:
        stage("exporting ONNX")
        export_decoder(model, staging / ONNX_FILE, opset)
        stage("verifying fp32 parity")
        checks = {"fp32": parity(model, tokenizer, staging / ONNX_FILE)}
        worst = max(checks["fp32"]["prefill_max_abs_diff"], checks["fp32"]["decode_max_abs_diff"])
        bound = tolerance * max(1.0, checks["fp32"]["max_abs_logit"])
        if not worst <= bound:
            raise ExportError(f"onnxruntime logits differ from PyTorch by {worst:.3g} > {bound:.3g} "
                              f"({tolerance:g} x max(1, max |logit|), fp32)")
        if int8:
            stage("quantizing int8")
            quantize_int8(staging / ONNX_FILE, staging / INT8_FILE)
            checks["int8"] = parity(model, tokenizer, staging / INT8_FILE)
        if int4:
            stage("quantizing int4")
            quantize_int4(staging / ONNX_FILE, staging / INT4_FILE, int4_block_size, int4_algorithm)
            checks["int4"] = parity(model, tokenizer, staging / INT4_FILE)
        tokenizer.save_pretrained(staging)
        (staging / PRUNING_FILE).write_text(source.plan.to_json() + "\n")
        quantized = {"int8": INT8_FILE} if int8 else {}
        if int4:
            quantized["int4"] = INT4_FILE
        info = _export_info(model, tokenizer, source, base_fingerprint, adapter, meta, opset, tolerance, checks,
                            quantized)
        if int4:
            info["int4"] = {"algorithm": int4_algorithm, "block_size": int4_block_size, "bits": 4,
                            "accuracy_level": INT4_ACCURACY_LEVEL}
        (staging / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _export_info(model, tokenizer, source: ExportSource, base_fingerprint: str, adapter: Path | None,
                 meta: AdapterMeta | None, opset: int, tolerance: float, checks: dict,
                 quantized: dict[str, str]) -> dict:
    config = model.config
    kv_heads, head_dim = cache_shape(config)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {
        "format": EXPORT_FORMAT,
        "source_model": str(source.model_dir),
        "source_fingerprint": fingerprint_model_dir(source.model_dir),
        "base_model": str(source.base_dir),
        "base_fingerprint": base_fingerprint,
        "strategy": source.plan.strategy,
        "source_num_layers": source.plan.source_num_layers,
        "kept_layers": list(source.plan.kept_layers),
        "num_layers": int(config.num_hidden_layers),
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "eos_token_ids": sorted(set(eos if isinstance(eos, list) else [eos])),
        "pad_token_id": tokenizer.pad_token_id,
        "opset": opset,
        "adapter": None if adapter is None else {
            "path": str(adapter), "sha256": sha256_file(Path(adapter)), "round": meta.round,
            "kept_layers": list(meta.kept_layers), "lora": meta.lora,
        },
        "files": {"fp32": ONNX_FILE, **quantized},
        "parity": {"tolerance_fp32": tolerance, "tolerance_fp32_abs": tolerance * max(1.0, checks["fp32"]["max_abs_logit"]),
                   **checks},
    }
