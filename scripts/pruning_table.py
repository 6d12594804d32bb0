"""Held-out perplexity of every pruning strategy at several depths, against the unpruned model (same run).

  python scripts/pruning_table.py --model smollm2-135m --keep 20,15

Writes JSON (--out, default runs/pruning_table.json) and a markdown table beside it (.md), and prints the table.
`ratio` = pruned perplexity / unpruned perplexity, both measured here on the same held-out text.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from edge_client.core.pruning import STRATEGIES, make_plan
from edge_client.corpus import heldout_texts
from edge_client.evaluate import perplexity
from edge_client.layer_scores import calibration_passages, compute_layer_scores, source_model_dir
from edge_client.model import load_base_model, prune_model
from prufed.common.models import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local HF directory")
    parser.add_argument("--keep", default="20,15", help="comma-separated layer counts to keep")
    parser.add_argument("--texts", type=int, default=32, help="held-out passages")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per passage")
    parser.add_argument("--calib", type=Path, default=None, help="calibration text file (default: built-in)")
    parser.add_argument("--out", type=Path, default=Path("runs/pruning_table.json"), help="JSON output path")
    args = parser.parse_args(argv)
    keeps = [int(k) for k in args.keep.split(",") if k.strip()]

    model_dir = source_model_dir(args.model)
    base, tokenizer = load_base_model(model_dir)
    num_layers = len(base.model.layers)
    texts = heldout_texts(args.texts)
    scores = compute_layer_scores(base, tokenizer, calibration_passages(args.calib),
                                  block_sizes=[num_layers - k for k in keeps if k < num_layers])
    started = time.perf_counter()
    baseline = perplexity(base, tokenizer, texts, max_len=args.max_len)
    print(f"unpruned: ppl {baseline.perplexity:.2f} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    rows = []
    for keep in keeps:
        for strategy in STRATEGIES:
            plan = make_plan(strategy, num_layers, keep, scores=scores, source_model=args.model)
            model = prune_model(copy.deepcopy(base), plan.kept_layers)
            result = perplexity(model, tokenizer, texts, max_len=args.max_len)
            rows.append({"keep": keep, "strategy": strategy, "dropped_layers": list(plan.dropped_layers),
                         **result.to_json_dict(), "ratio": result.perplexity / baseline.perplexity})
            print(f"keep {keep} {strategy}: ppl {result.perplexity:.2f}", file=sys.stderr)
            del model

    lines = [
        f"Held-out perplexity, {args.model} ({num_layers} layers), {len(texts)} KJV held-out passages, "
        f"{baseline.tokens} tokens; ratio = pruned / unpruned.",
        "",
        "| keep | strategy | dropped layers | perplexity | ratio |",
        "|---:|---|---|---:|---:|",
        f"| {num_layers} | (unpruned) | - | {baseline.perplexity:.2f} | 1.00 |",
    ]
    for keep in keeps:
        for row in sorted((r for r in rows if r["keep"] == keep), key=lambda r: r["perplexity"]):
            dropped = ",".join(map(str, row["dropped_layers"]))
            lines.append(f"| {keep} | {row['strategy']} | {dropped} | {row['perplexity']:.2f} | {row['ratio']:.2f} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "num_layers": num_layers, "texts": len(texts), "max_len": args.max_len,
        "baseline": baseline.to_json_dict(), "rows": rows,
        "scores": {"magnitude": scores.magnitude, "contribution": scores.contribution,
                   "angular": {str(k): v for k, v in scores.angular.items()}},
    }, indent=2))
    args.out.with_suffix(".md").write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
