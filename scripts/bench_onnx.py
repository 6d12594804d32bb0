"""Benchmark: torch eager fp32 vs onnxruntime fp32, int8 and int4 on pruned copies of the default model.

Per depth (--strategy, default: the project's default strategy): prefill latency (batch 1, --prompt-tokens tokens,
median of --repeats), decode tokens/s
(--new-tokens greedy steps on the KV cache after that prefill, prefill excluded), held-out perplexity
(exp(mean NLL per predicted token) over --ppl-texts KJV held-out passages, batch 1), and file sizes.
Ratios are against torch measured in the same run with the same intra-op thread count (torch.set_num_threads
and SessionOptions.intra_op_num_threads both = --threads). Targets: int4 decode >= 2.5x torch tokens/s and
held-out perplexity drift (ppl_q / ppl_ort_fp32 - 1) <= 5% for int4 and int8. `--sweep` adds rows for other
weight-only settings (algorithm:block_size), quantized from the same fp32 graph, to choose the export's default.

usage: .venv/bin/python scripts/bench_onnx.py [--depths 30,20] [--threads 2] [--sweep rtn:32,hqq:64,rtn8:32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from edge_client.corpus import heldout_texts
from edge_client.global_adapter import ExportSource
from edge_client.layer_scores import plan_for_model
from edge_client.model import load_model_dir, materialize_pruned
from edge_client.onnx_export import INT4_ALGORITHM, INT4_BLOCK_SIZE, export_onnx, quantize_int4
from edge_client.onnx_generate import EXPORT_FILE, MODEL_FILES, OnnxDecoder
from prufed.cli.help import HelpFormatter
from prufed.common.models import DEFAULT_MODEL, resolve_model

DECODE_TARGET = 2.5  # int4 decode tokens/s / torch decode tokens/s must be >= this
DRIFT_TARGET = 0.05  # ppl_quantized / ppl_ort_fp32 - 1 must be <= this (int4 and int8)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and (for ORT) finish graph set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_runner(model):
    """(prefill(ids) -> (logits, cache), step(token, cache, length) -> (logits, cache)) for an HF model."""

    def prefill(ids: np.ndarray):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        return out.logits[:, -1].numpy(), out.past_key_values

    def step(token: np.ndarray, cache, _length: int):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(token), past_key_values=cache, use_cache=True)
        return out.logits[:, -1].numpy(), out.past_key_values

    return prefill, step


def ort_runner(decoder: OnnxDecoder):
    def prefill(ids: np.ndarray):
        logits, past = decoder(ids, np.ones_like(ids))
        return logits[:, -1], past

    def step(token: np.ndarray, past, length: int):
        logits, past = decoder(token, np.ones((1, length), dtype=np.int64), past)
        return logits[:, -1], past

    return prefill, step


def measure(runner, prompt: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """Prefill seconds (median) and decode tokens/s (median over repeats of `new_tokens` greedy steps)."""
    prefill, step = runner
    prefill_s = median_time(lambda: prefill(prompt), repeats)

    def decode():
        logits, cache = prefill(prompt)
        start = time.perf_counter()
        for i in range(new_tokens):
            token = logits.argmax(-1)[:, None].astype(np.int64)
            logits, cache = step(token, cache, prompt.shape[1] + i + 1)
        return time.perf_counter() - start

    decode()  # warm-up
    decode_s = statistics.median(decode() for _ in range(max(1, repeats // 2)))
    return {"prefill_ms": 1000 * prefill_s, "decode_tok_s": new_tokens / decode_s}


def nll_per_token(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL (nats) of ids[1:] under logits[:-1], and the token count."""
    z = logits[0, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = ids[0, 1:]
    return float(-logp[np.arange(len(targets)), targets].sum()), len(targets)


def perplexity(forward, token_rows) -> float:
    total, count = 0.0, 0
    for ids in token_rows:
        nll, n = nll_per_token(forward(ids), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def bench_depth(args, depth: int, prompt_ids: list[int], ppl_rows: list[np.ndarray]) -> dict:
    base_dir = resolve_model(args.model)
    plan = plan_for_model(base_dir, args.strategy, depth)
    model_dir = materialize_pruned(args.model, plan)
    export_dir = args.workdir / f"{args.strategy}-{depth}"
    info_path = export_dir / EXPORT_FILE
    # The bench's own scratch: reuse an export only if it holds every copy with today's int4 settings.
    int4 = json.loads(info_path.read_text()).get("int4", {}) if info_path.is_file() else {}
    current = (int4.get("algorithm"), int4.get("block_size")) == (INT4_ALGORITHM, INT4_BLOCK_SIZE)
    if not current or not all((export_dir / f).is_file() for f in MODEL_FILES.values()):
        print(f"[depth {depth}] exporting to {export_dir}", file=sys.stderr)
        shutil.rmtree(export_dir, ignore_errors=True)
        export_onnx(ExportSource(model_dir, plan, base_dir), export_dir, int8=True, int4=True)
    info = json.loads(info_path.read_text())
    kv_shape = (info["num_key_value_heads"], info["head_dim"])
    model, _ = load_model_dir(model_dir, "fp32")
    model.eval()
    prompt = np.array([prompt_ids], dtype=np.int64)
    rows: dict = {"kept_layers": list(plan.kept_layers)}
    with torch.no_grad():
        torch_forward = lambda ids: model(input_ids=torch.from_numpy(ids)).logits.numpy()  # noqa: E731
        print(f"[depth {depth}] torch eager fp32", file=sys.stderr)
        rows["torch-fp32"] = {**measure(torch_runner(model), prompt, args.new_tokens, args.repeats),
                              "ppl": perplexity(torch_forward, ppl_rows),
                              "size_mb": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20}
    files = {f"ort-{name}": export_dir / file for name, file in MODEL_FILES.items()}
    for variant in args.sweep:
        name, block = variant.split(":")
        bits = 8 if name.endswith("8") else 4
        path = export_dir / f"sweep-{name}-b{block}.onnx"
        if not path.is_file():
            quantize_int4(export_dir / MODEL_FILES["fp32"], path, int(block), name.rstrip("8"), bits)
        files[f"{'int8w' if bits == 8 else 'int4'}-{name.rstrip('8')}-b{block}"] = path
    for name, path in files.items():
        print(f"[depth {depth}] {name}", file=sys.stderr)
        decoder = OnnxDecoder(path, depth, kv_shape, threads=args.threads)
        rows[name] = {**measure(ort_runner(decoder), prompt, args.new_tokens, args.repeats),
                      "ppl": perplexity(lambda ids, d=decoder: d(ids, np.ones_like(ids))[0], ppl_rows),
                      "size_mb": path.stat().st_size / 2**20}
    ref, fp32 = rows["torch-fp32"], rows["ort-fp32"]
    for row in rows.values():
        if isinstance(row, dict) and "ppl" in row:
            row["prefill_ratio"] = row["prefill_ms"] / ref["prefill_ms"]
            row["decode_ratio"] = row["decode_tok_s"] / ref["decode_tok_s"]
            row["ppl_drift"] = row["ppl"] / fp32["ppl"] - 1
    rows["parity_fp32"] = info["parity"]["fp32"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or directory (unpruned)")
    parser.add_argument("--depths", default="30,20", help="comma-separated kept-layer counts")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                        help=f"pruning strategy: {', '.join(STRATEGIES)}")
    parser.add_argument("--sweep", default="", help="extra weight-only rows, ALGORITHM:BLOCK,... with ALGORITHM "
                        "rtn or hqq (4-bit) or rtn8 (8-bit MatMulNBits)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps timed after the prefill")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills (median); decode runs repeats//2")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch AND ORT")
    parser.add_argument("--ppl-texts", type=int, default=6, help="held-out passages for the perplexity drift")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_onnx"), help="exports (reused if present)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_onnx.json"), help="JSON results")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    args.sweep = [v for v in args.sweep.split(",") if v]
    for variant in args.sweep:
        algorithm, _, block = variant.partition(":")
        if algorithm not in ("rtn", "hqq", "rtn8") or not block.isdecimal():
            parser.error(f"--sweep: {variant!r} is not ALGORITHM:BLOCK with ALGORITHM rtn, hqq or rtn8")
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    text = " ".join(heldout_texts(8, max_chars=2000))
    prompt_ids = tokenizer(text)["input_ids"][: args.prompt_tokens]
    if len(prompt_ids) < args.prompt_tokens:
        parser.error(f"--prompt-tokens: the built-in text has only {len(prompt_ids)} tokens")
    ppl_rows = [np.array([tokenizer(t)["input_ids"][:256]], dtype=np.int64) for t in heldout_texts(args.ppl_texts)]
    results = {d: bench_depth(args, d, prompt_ids, ppl_rows) for d in depths}

    header = (f"{'depth':>5} {'runtime':<14} {'prefill ms':>10} {'x torch':>8} {'decode tok/s':>12} {'x torch':>8} "
              f"{'ppl':>9} {'drift':>7} {'size MB':>8}")
    print(f"strategy={args.strategy}, threads={args.threads} (torch.set_num_threads and ORT intra_op_num_threads), "
          f"prefill batch 1 x {args.prompt_tokens} tokens, decode {args.new_tokens} tokens, ppl on {args.ppl_texts} "
          "held-out passages; drift = ppl / ppl(ORT fp32) - 1")
    print(header)
    print("-" * len(header))
    for depth, rows in results.items():
        for name, r in rows.items():
            if isinstance(r, dict) and "ppl" in r:
                print(f"{depth:>5} {name:<14} {r['prefill_ms']:>10.1f} {r['prefill_ratio']:>8.2f} "
                      f"{r['decode_tok_s']:>12.1f} {r['decode_ratio']:>8.2f} {r['ppl']:>9.3f} "
                      f"{100 * r['ppl_drift']:>+6.1f}% {r['size_mb']:>8.1f}")
        print(f"{'':>5} fp32 parity {rows['parity_fp32']['prefill_max_abs_diff']:.1e} (max |logit| "
              f"{rows['parity_fp32']['max_abs_logit']:.1f})")
    verdict = {
        "int4_decode_ok": all(rows["ort-int4"]["decode_ratio"] >= DECODE_TARGET for rows in results.values()),
        "int4_drift_ok": all(rows["ort-int4"]["ppl_drift"] <= DRIFT_TARGET for rows in results.values()),
        "int8_drift_ok": all(rows["ort-int8"]["ppl_drift"] <= DRIFT_TARGET for rows in results.values()),
    }
    print(f"targets (int4 decode >= {DECODE_TARGET}x torch, drift <= {100 * DRIFT_TARGET:g}%): {json.dumps(verdict)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "strategy": args.strategy, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "ppl_texts": args.ppl_texts,
        "int4": {"algorithm": INT4_ALGORITHM, "block_size": INT4_BLOCK_SIZE},
        "targets": {"int4_decode_ratio_min": DECODE_TARGET, "ppl_drift_max": DRIFT_TARGET}, "verdict": verdict,
        "results": {str(d): rows for d, rows in results.items()},
    }, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
