"""`prufed export-onnx` and `prufed generate`.

`generate --onnx` runs on onnxruntime, numpy, tokenizers and jinja2 alone: nothing on that path imports torch
(tests/test_onnx_generate.py checks the boundary). Torch is imported only inside the export and --model handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_client.core.pruning import DEFAULT_STRATEGY, STRATEGIES
from prufed.cli.help import HelpFormatter
from prufed.cli.quiet import count_progress, step_progress
from prufed.common.errors import ConfigError
from prufed.common.models import DEFAULT_MODEL

# edge_client.onnx_export's defaults (not imported here: that module pulls in torch, and --help must stay instant)
INT4_BLOCK_SIZE = 32

MODEL_HELP = (f"model alias ({DEFAULT_MODEL}) or a local Hugging Face LLaMA-family directory: the UNPRUNED base "
              "(with --pruning or --keep), or a `prufed prune` output (its pruning.json names the base)")


def register(subparsers) -> None:
    fmt = HelpFormatter

    export = subparsers.add_parser(
        "export-onnx", help="export a pruned, LoRA-merged model to ONNX with a KV cache", formatter_class=fmt,
        description="Build the pruned model, merge the global adapter's kept-layer slice into it, export a "
        "decoder with KV-cache inputs/outputs, and check onnxruntime against PyTorch (max |logit diff| <= "
        "2e-5 x max(1, max |logit|) in fp32, with a left-padded batch and a cached decode step). Writes model.onnx, "
        "the tokenizer, pruning.json and export.json to --out; --int4 / --int8 add quantized copies for devices.",
        epilog="examples:\n  prufed export-onnx --model smollm2-135m --keep 20 --adapter runs/global.safetensors "
        "--out runs/onnx-20 --int4\n  prufed prune --keep 20 --strategy contribution --out runs/pruned-20 && "
        "prufed export-onnx --model runs/pruned-20 --out runs/onnx-20 --int4",
    )
    export.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    export.add_argument("--pruning", type=Path, default=None,
                        help="directory holding pruning.json (e.g. `prufed prune` output); excludes --keep")
    export.add_argument("--keep", type=int, default=None, help="layers to keep (with --strategy); excludes --pruning")
    export.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, metavar="S",
                        help=f"pruning strategy for --keep: {', '.join(STRATEGIES)}")
    export.add_argument("--adapter", type=Path, default=None,
                        help="global adapter (prufed-adapter/1 safetensors, ORIGINAL layer keys) to merge")
    export.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    export.add_argument("--int4", action="store_true",
                        help="also write model.int4.onnx: weight-only 4-bit (onnxruntime MatMulNBits, one scale and "
                        "zero point per --int4-block-size weights), the smallest and fastest copy for devices")
    export.add_argument("--int4-block-size", type=int, default=INT4_BLOCK_SIZE,
                        help="weights per int4 scale (power of two >= 16; smaller = closer to fp32, larger file)")
    export.add_argument("--int4-algorithm", default="hqq", choices=("hqq", "rtn"),
                        help="int4 rounding: hqq fits each block's scale and zero point to the weights (no data "
                        "needed), rtn rounds to nearest between the block's min and max (faster to export)")
    export.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx (onnxruntime dynamic int8 with per-tensor activation "
                        "scales; the MLP down-projections stay fp32)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (TorchScript exporter: 7..20)")
    export.add_argument("--json", action="store_true", help="print export.json on stdout")
    export.set_defaults(func=cmd_export)

    generate = subparsers.add_parser(
        "generate", help="generate text from an ONNX export (no torch) or a PyTorch model", formatter_class=fmt,
        description="Greedy (temperature 0) or top-p sampling with a KV cache. Prints only the generated text "
        "on stdout; diagnostics go to stderr. --onnx needs only onnxruntime, numpy, tokenizers and jinja2.",
        epilog='example: prufed generate --onnx runs/onnx-20 --chat --prompt "Who was Moses?" --max-new-tokens 48',
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", type=Path, help="directory written by `prufed export-onnx`")
    source.add_argument("--model", help="PyTorch model alias or directory (a pruned directory works too)")
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (stops at eos)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples from softmax(z/T)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling, in (0, 1]")
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    precision = generate.add_mutually_exclusive_group()
    precision.add_argument("--int4", action="store_true", help="with --onnx: run model.int4.onnx")
    precision.add_argument("--int8", action="store_true", help="with --onnx: run model.int8.onnx")
    generate.add_argument("--threads", type=int, default=None, help="intra-op threads; unset = onnxruntime/torch choose")
    generate.set_defaults(func=cmd_generate)


def cmd_export(args: argparse.Namespace) -> int:
    if args.keep is not None and args.keep < 1:
        raise ConfigError("--keep", f"must be >= 1, got {args.keep}")
    if args.adapter is not None and not args.adapter.is_file():
        raise ConfigError("--adapter", f"no such file: {args.adapter}")
    from edge_client.global_adapter import resolve_source
    from edge_client.onnx_export import export_onnx

    with step_progress("resolving model") as stage:
        source = resolve_source(args.model, args.pruning, args.keep, args.strategy)
        assert source is not None  # without full_depth, resolve_source returns a source or raises
        info = export_onnx(source, args.out, adapter=args.adapter, int8=args.int8, int4=args.int4,
                           int4_block_size=args.int4_block_size, int4_algorithm=args.int4_algorithm, opset=args.opset,
                           on_stage=stage)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fp32 = info["parity"]["fp32"]
    print(f"exported {info['num_layers']}/{info['source_num_layers']} layers ({info['strategy']}) -> {args.out}")
    print(f"parity fp32: prefill {fp32['prefill_max_abs_diff']:.2e}, decode {fp32['decode_max_abs_diff']:.2e} "
          f"(max |logit diff|, tolerance {info['parity']['tolerance_fp32_abs']:.2g})")
    for name in ("int8", "int4"):
        if name in info["parity"]:
            check = info["parity"][name]
            print(f"parity {name}: prefill {check['prefill_max_abs_diff']:.2e} (max |logit| "
                  f"{check['max_abs_logit']:.1f}), argmax agreement {check['argmax_agreement']:.3f}")
    return 0


def _check_generate(args: argparse.Namespace):
    from edge_client.onnx_generate import SamplingConfig

    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads", f"must be >= 1, got {args.threads}")
    for flag in ("int8", "int4"):
        if getattr(args, flag) and args.onnx is None:
            raise ConfigError(f"--{flag}", "only applies with --onnx")
    if args.seed is not None and args.temperature == 0:
        print("note: --seed has no effect with greedy decoding (--temperature 0)", file=sys.stderr)
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    config = _check_generate(args)
    if args.onnx is not None:
        from edge_client.onnx_generate import OnnxGenerator

        if not args.onnx.is_dir():
            raise ConfigError("--onnx", f"no such directory: {args.onnx}")
        precision = "int4" if args.int4 else "int8" if args.int8 else "fp32"
        generator = OnnxGenerator(args.onnx, precision=precision, threads=args.threads)
        with count_progress("generating", config.max_new_tokens) as advance:
            text = generator.generate(args.prompt, config, chat=args.chat, on_token=advance)
    else:
        text = _generate_torch(args, config)
    print(text)
    return 0


def _generate_torch(args: argparse.Namespace, config) -> str:
    """The same decoding with PyTorch/transformers `generate` (the reference the ONNX path must match)."""
    import torch

    from edge_client.model import load_model_dir
    from prufed.common.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_dir(resolve_model(args.model), "fp32")
    model.eval()
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    input_ids = torch.tensor([ids])
    sampling = {"do_sample": False}
    if config.temperature > 0:
        sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": None}
        if config.seed is not None:
            torch.manual_seed(config.seed)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
