"""`prufed doctor`: can the edge agent run on this machine, and what would it choose here?

It reports Python and the versions of the agent's stack, CUDA and its device, a Jetson's unified memory, and
whether bitsandbytes 4-bit and bf16 work. Each of those two is TRIED on a tiny tensor by the probes that training
itself uses (`edge_client.model.probe_bnb_4bit`, `probe_bf16`), never guessed from versions. It also names the
nearest hardware profile. With `--model M` it adds the precision, memory budget and depth that `prufed edge run
--model M` would choose, from the agent's own planning call (`agent_plan`). Exit 0 when the agent can run here,
1 with a one-line reason on stderr when it cannot.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from prufed.cli.extras import missing_extras, missing_extras_message
from prufed.cli.help import HelpFormatter

GIB = 2**30
#: Versions reported: the agent's stack. None = not installed.
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "numpy")
EPILOG = """examples:
  prufed doctor                          # a table; exit 1 with the reason when the agent cannot run
  prufed doctor --json                   # the same as JSON on stdout (CI and `make demo` run this)
  prufed doctor --model smollm2-135m     # also: the precision, budget and depth `prufed edge run` would pick
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check that the edge agent can run here, and what it would choose",
        formatter_class=HelpFormatter, epilog=EPILOG,
        description="Report Python, torch, transformers, peft, bitsandbytes and onnxruntime versions; CUDA and its "
        "device; a Jetson's unified memory; whether bitsandbytes 4-bit and bf16 work (each tried on a tiny "
        "tensor, as training would use it); the nearest hardware profile. With --model, also the precision, "
        "memory budget and depth the edge agent would choose, and why. Exit 1 with a one-line reason when the "
        "agent cannot run.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--model", default=None,
                        help="also plan this base model (alias or local HF directory) as `prufed edge run --model` "
                        "would; the default model is converted on first use (~30 s)")
    parser.set_defaults(func=cmd_doctor)


def package_versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (from metadata: nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def agent_plan(model: str, spec) -> dict[str, Any]:
    """What `prufed edge run --model M` (defaults otherwise: --depth auto, --quant auto) plans on `spec`: the
    agent's own planning call (`edge_client.agent.plan_layers`, which is `edge_client.planning.plan_training`).

    Only the planning fields of the agent's config are read; nothing connects anywhere.
    """
    from edge_client.agent import AgentConfig, plan_layers
    from edge_client.planning import quant_description

    plan, choice = plan_layers(AgentConfig(aggregator="", state_dir=Path(), model=model), spec)
    quant, depth, layers, budget = choice["quant"], plan.depth, plan.source_num_layers, choice["budget_bytes"]
    memory = "unified" if spec.unified_memory else spec.accelerator
    return {
        "model": model, "quant": quant, "depth": depth, "num_layers": layers, "kept_layers": list(plan.kept_layers),
        "strategy": plan.strategy, "budget_bytes": budget, "predicted_bytes": choice["predicted_bytes"],
        "choice": choice,
        "why": f"{quant} ({quant_description(quant)}): {choice['quant_source']}; budget {budget / GIB:.2f} GiB = "
               f"{spec.budget_fraction:g} x {spec.available_memory_bytes / GIB:.2f} GiB {memory} memory free now; "
               f"depth {depth}/{layers}: the deepest whose predicted peak training memory "
               f"({choice['predicted_bytes'] / GIB:.2f} GiB) fits the budget",
    }


def diagnose(model: str | None = None) -> dict[str, Any]:
    """The whole report; `reason` is the first thing that stops the agent (None when it can run)."""
    from edge_client.core.memory import BudgetTooSmall
    from edge_client.model import probe_bf16, probe_bnb_4bit
    from edge_client.planning import auto_quant_candidates
    from edge_client.profiling import probe_cuda, profile_device

    problems: list[str] = []
    missing = missing_extras(("edge",))
    if missing:
        problems.append(missing_extras_message("edge run", missing))
    spec = profile_device()
    cuda = probe_cuda()
    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "packages": package_versions(), "missing_extras": missing,
        "cuda": None if cuda is None else {**asdict(cuda), "torch_cuda": torch.version.cuda},
        "jetson": None if spec.jetson_model is None and spec.l4t_release is None else {
            "model": spec.jetson_model, "l4t_release": spec.l4t_release, "unified_memory": spec.unified_memory},
        "memory": {"accelerator": spec.accelerator, "unified_memory": spec.unified_memory,
                   "total_bytes": spec.total_memory_bytes, "available_bytes": spec.available_memory_bytes,
                   "budget_fraction": spec.budget_fraction, "budget_bytes": spec.budget_bytes},
        "bnb_4bit": asdict(probe_bnb_4bit()), "bf16": asdict(probe_bf16()),
        "quant_candidates": list(auto_quant_candidates(spec)), "nearest_profile": spec.nearest_profile,
    }
    if model is not None and not missing:
        try:
            report["plan"] = agent_plan(model, spec)
        except BudgetTooSmall as exc:
            problems.append(f"no depth of {model} fits this device: {exc}")
    report["ok"] = not problems
    report["reason"] = problems[0] if problems else None
    return report


def _bytes(value: int | None) -> str:
    return "absent" if value is None else f"{value / GIB:.2f} GiB"


def _print_text(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def mark(probe: dict[str, Any]) -> str:
        return f"{'works' if probe['ok'] else 'FAILS'}: {probe['detail']}"

    table = Table(title="prufed doctor", show_header=False)
    table.add_row("python", f"{report['python']} ({report['executable']})")
    for name, version in report["packages"].items():
        table.add_row(name, version or "not installed")
    cuda = report["cuda"]
    table.add_row("cuda", "absent" if cuda is None else
                  f"{cuda['name']} (capability {cuda['capability']}, {_bytes(cuda['total_bytes'])}, "
                  f"CUDA {cuda['torch_cuda']})")
    jetson = report["jetson"]
    table.add_row("jetson", "no" if jetson is None else
                  f"{jetson['model']} L4T {jetson['l4t_release']}, unified memory {jetson['unified_memory']}")
    memory = report["memory"]
    table.add_row("memory", f"{_bytes(memory['available_bytes'])} free of {_bytes(memory['total_bytes'])} "
                            f"({memory['accelerator']}{', unified' if memory['unified_memory'] else ''}); "
                            f"budget {_bytes(memory['budget_bytes'])}")
    table.add_row("bitsandbytes 4-bit", mark(report["bnb_4bit"]))
    table.add_row("bf16", mark(report["bf16"]))
    table.add_row("--quant auto picks from", ", ".join(report["quant_candidates"]) + " (fastest first)")
    table.add_row("nearest profile", report["nearest_profile"] or "none")
    if "plan" in report:
        plan = report["plan"]
        table.add_row(f"plan for {plan['model']}", f"{plan['quant']}, depth {plan['depth']}/{plan['num_layers']}, "
                                                   f"budget {_bytes(plan['budget_bytes'])}")
        table.add_row("why", plan["why"])
    table.add_row("agent can run", "yes" if report["ok"] else f"NO: {report['reason']}")
    Console(width=max(110, Console().width)).print(table)


def cmd_doctor(args) -> int:
    report = diagnose(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    if not report["ok"]:
        print(f"doctor: the agent cannot run here: {report['reason']}", file=sys.stderr)
        return 1
    return 0
