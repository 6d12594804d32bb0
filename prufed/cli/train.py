"""`prufed train`: local LoRA instruction tuning of a layer-pruned model -> DIR/update.safetensors + metrics.json.

Heavy imports (torch, transformers, peft) stay inside the handler so `prufed --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.core.memory import QUANT_CHOICES
from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES, parse_protect
from prufed.cli.help import HelpFormatter
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

FORMAT_CHOICES = ("alpaca", "dolly", "gsm8k")


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="LoRA instruction tuning of a pruned model; writes an update file and metrics",
        formatter_class=HelpFormatter,
        description="Prune the model to --depth layers, load it (--quant auto: on a CPU the fastest precision that "
        "fits the memory budget, bf16 base weights with fp32 LoRA where the CPU has native bf16), attach LoRA "
        "and train on an instruction file (Alpaca, Dolly or GSM8K; JSON or JSONL) or, without --data, on built-in "
        "KJV demo tasks. Writes OUT/update.safetensors (Δ = trained − start, ORIGINAL layer keys), "
        "OUT/adapter.safetensors, OUT/metrics.json and a resumable OUT/checkpoint/.",
        epilog="example: prufed train --model smollm2-135m --depth auto --data alpaca.json --max-steps 60 "
        "--out runs/train",
    )
    train.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model alias ({DEFAULT_MODEL}) or a local Hugging Face LLaMA-family directory (unpruned)")
    train.add_argument("--depth", required=True,
                       help="decoder layers to keep, or 'auto' for the deepest the memory planner fits")
    train.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                       help=f"which layers to keep: {', '.join(STRATEGIES)}")
    train.add_argument("--protect", default="", help="comma-separated ORIGINAL layer indices never dropped, e.g. 0,-1")
    train.add_argument("--profile", default=None,
                       help="with --depth auto: plan for this hardware profile instead of this machine")
    train.add_argument("--budget-gib", type=float, default=None,
                       help="with --depth auto: plan for this memory budget in GiB (wins over --profile)")
    train.add_argument("--data", type=Path, default=None,
                       help="instruction file (JSON array or JSONL); default: built-in KJV demo tasks")
    train.add_argument("--format", dest="data_format", default=None, choices=FORMAT_CHOICES,
                       help="data format; default: detected from the first record's keys")
    train.add_argument("--max-examples", type=int, default=None, help="use at most this many records of --data")
    train.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    train.add_argument("--max-eval-examples", type=int, default=64, help="held-out examples scored before/after")
    train.add_argument("--max-steps", type=int, default=60, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    train.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps (then linear decay to 10%%)")
    train.add_argument("--seq-len", type=int, default=256, help="max tokens per example (prompt + response)")
    train.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    train.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (scale = alpha / r)")
    train.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names that get LoRA")
    train.add_argument("--quant", default="auto", choices=QUANT_CHOICES,
                       help="weight precision; auto = on a CPU the fastest that fits the budget (bf16 where the "
                       "CPU has native bf16, else fp32), on a GPU nf4, with --profile its default_quant")
    train.add_argument("--no-gradient-checkpointing", action="store_true",
                       help="keep activations instead of recomputing them (faster, more memory)")
    train.add_argument("--seed", type=int, default=0, help="seed for LoRA init, data order, split and dropout")
    train.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (0 = never)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/ when it exists")
    train.add_argument("--global-adapter", type=Path, default=None,
                       help="adapter file (prufed-adapter/1) to start from; default: a fresh LoRA init")
    train.add_argument("--round", type=int, default=0, help="federation round recorded in the update file")
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--json", action="store_true", help="print metrics as JSON on stdout")
    train.set_defaults(func=cmd_train)


def parse_depth(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        depth = int(text)
    except ValueError:
        raise ConfigError("--depth", f"must be a positive integer or 'auto', got {text!r}") from None
    if depth < 1:
        raise ConfigError("--depth", f"must be >= 1, got {depth}")
    return depth


def config_from_args(args):
    """Map parsed flags onto a `TrainConfig` (which checks every value and names the flag)."""
    from edge_client.train import TrainConfig

    depth = parse_depth(args.depth)
    if depth != "auto" and (args.profile is not None or args.budget_gib is not None):
        raise ConfigError("--profile" if args.profile is not None else "--budget-gib", "only applies with --depth auto")
    if args.data is not None and not args.data.is_file():
        raise ConfigError("--data", f"{args.data}: no such file")
    if args.global_adapter is not None and not args.global_adapter.is_file():
        raise ConfigError("--global-adapter", f"{args.global_adapter}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"{args.out} exists and is not a directory")
    if args.round < 0:
        raise ConfigError("--round", f"must be >= 0, got {args.round}")
    targets = tuple(part.strip() for part in args.targets.split(",") if part.strip())
    return TrainConfig(
        model=args.model, depth=depth, strategy=args.strategy, protect=parse_protect(args.protect),
        profile=args.profile, budget_gib=args.budget_gib,
        data=str(args.data) if args.data is not None else None, data_format=args.data_format,
        max_examples=args.max_examples, eval_fraction=args.eval_fraction, max_eval_examples=args.max_eval_examples,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, seq_len=args.seq_len, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=targets, quant=args.quant, gradient_checkpointing=not args.no_gradient_checkpointing,
        seed=args.seed, checkpoint_every=args.checkpoint_every,
    )


def _fmt_eval(result: dict | None) -> str:
    return "-" if not result else f"{result['loss']:.4f} (ppl {result['perplexity']:.2f}, {result['tokens']} tokens)"


def cmd_train(args) -> int:
    from edge_client.train import train_local

    config = config_from_args(args)
    result = train_local(config, args.out, global_adapter=args.global_adapter, round=args.round, resume=args.resume)
    metrics = result.metrics
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prufed train -> {args.out}", show_header=False)
    choice = metrics["depth_choice"]
    depth = f"{metrics['depth']}/{metrics['source_num_layers']} ({metrics['strategy']}, {choice['mode']})"
    if choice["mode"] == "auto":
        depth += (f"; budget {choice['budget_bytes'] / 2**30:.2f} GiB from {choice['budget_source']}, "
                  f"predicted peak {choice['predicted_bytes'] / 2**30:.2f} GiB")
    rows = [
        ("depth", depth), ("kept layers", str(metrics["kept_layers"])),
        ("quant", f"{metrics['quant']} ({metrics['quant_detail']}) on {metrics['device']}"),
        ("data", f"{metrics['data']}: {metrics['num_examples']} train, {metrics['num_heldout']} held out, "
                 f"{metrics['dropped_by_truncation']} dropped by --seq-len"),
        ("steps", f"{metrics['steps']} (resumed from {metrics['resumed_from_step']})"),
        ("train loss", f"{metrics['train_loss'][0]:.4f} -> {metrics['train_loss'][-1]:.4f}" if metrics["train_loss"] else "-"),
        ("held-out loss before", _fmt_eval(metrics["eval_before"])),
        ("held-out loss after", _fmt_eval(metrics["eval_after"])),
        ("tokens/s", f"{metrics['tokens_per_s']:.1f} ({metrics['step_time_s']:.2f} s/step)"),
        ("peak memory", f"RSS {metrics['peak_rss_bytes'] / 2**20:.0f} MiB"
         + (f", CUDA {metrics['cuda_max_allocated_bytes'] / 2**20:.0f} MiB" if metrics["cuda_max_allocated_bytes"] else "")),
        ("wall time", f"{metrics['wall_time_s']:.1f} s"),
        ("update", metrics["update_path"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    return 0
