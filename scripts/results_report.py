"""Build every table and plot of docs/results.md from the grid's cell files (nothing is typed by hand).

  python scripts/results_report.py                       # rewrites the generated blocks of docs/results.md
  python scripts/results_report.py --check               # exit 1 if docs/results.md is not what the cells give

docs/results.md holds hand-written prose and blocks delimited by `<!-- BEGIN name -->` / `<!-- END name -->`; each
block is regenerated here from docs/results/data/*.json (one file per finished cell, written by
scripts/exp_pruning_strategies.py and scripts/exp_hetero_vs_homo.py). Figures go to docs/img/exp_*.png.

Statistics: for each comparison the per-seed difference (same training and partition seed, so the pair shares the
data split and the initial adapter) is averaged over the seeds present in both; the 95% interval is the Student t
interval mean ± t(0.975, n−1)·sd/√n. With one seed there is no interval ("1 seed"). Loss: nats per answer token
on the same held-out examples in every cell.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _exp_common as common

from prufed.cli.help import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
#: Student t quantiles t(0.975, df) for df = 1..30 (beyond: 1.96 is within 2%).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def ci95(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% t interval or None for n < 2, n)."""
    n = len(values)
    if n == 0:
        return float("nan"), None, 0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None, 1
    t = T975[n - 2] if n - 2 < len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n), n


def fmt_ci(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    mean, half, n = ci95(values)
    if n == 0:
        return "–"
    sign = "+" if signed else ""
    if half is None:
        return f"{mean:{sign}.{digits}f} (1 seed)"
    return f"{mean:{sign}.{digits}f} ± {half:.{digits}f}"


def fmt_interval(values: Sequence[float], digits: int = 3) -> str:
    """mean [lo, hi] (n) of paired differences; a bold mark when the interval excludes 0."""
    mean, half, n = ci95(values)
    if n == 0:
        return "–"
    if half is None:
        return f"{mean:+.{digits}f} (1 seed)"
    lo, hi = mean - half, mean + half
    text = f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"**{text}**" if hi < 0 or lo > 0 else text


def load_cells(data_dir: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(data_dir.glob("*.json"))]


# ---------------------------------------------------------------------------------------------------- experiment 1


def exp1_blocks(cells: list[dict]) -> dict[str, str]:
    finetune = [c for c in cells if c["experiment"] == "pruning" and c["run"] == "finetune"]
    refs = {c["task"]: c["depth"][0] for c in cells if c["experiment"] == "pruning" and c["run"] == "reference"}
    if not finetune:
        return {"exp1": "_No experiment 1 cell has finished yet._"}
    by = defaultdict(dict)  # (task, depth, strategy) -> seed -> row
    for c in finetune:
        by[(c["task"], c["depths"][0], c["strategy"])][c["seed"]["training"]] = c["depth"][0]
    tasks = [t for t in common.TASKS if any(k[0] == t for k in by)]
    depths = sorted({k[1] for k in by}, reverse=True)
    strategies = sorted({k[2] for k in by})
    steps = sorted({c["budget"]["optimizer_steps_per_client"] for c in finetune})
    batch = sorted({c["budget"]["examples_per_step"] for c in finetune})
    held = sorted({c["heldout_examples"] for c in finetune})
    out = [f"Budget: {', '.join(map(str, steps))} AdamW steps x batch {', '.join(map(str, batch))} per fine-tune; "
           f"{', '.join(map(str, held))} held-out examples per task; {len(finetune)} fine-tune cells."]
    for task in tasks:
        ref = refs.get(task)
        ref_text = (f"Unpruned reference: loss {ref['loss']:.3f}"
                    + (f", GSM8K exact match {ref['exact_match']:.2f} on {ref.get('exact_match_questions')} questions"
                       if ref and ref.get("exact_match") is not None else "") if ref else "Unpruned reference: not yet run")
        header = ["strategy"] + [f"d={d} before" for d in depths] + [f"d={d} after (mean ± 95% CI)" for d in depths]
        rows = []
        for s in strategies:
            row = [s]
            for d in depths:
                seeds = by.get((task, d, s), {})
                row.append(f"{next(iter(seeds.values()))['before_loss']:.3f}" if seeds else "–")
            for d in depths:
                seeds = by.get((task, d, s), {})
                row.append(fmt_ci([r["loss"] for r in seeds.values()]) + (f" (n={len(seeds)})" if len(seeds) > 1 else ""))
            rows.append(row)
        out += ["", f"**{task}** ({ref_text}), held-out loss in nats per answer token:", "",
                common.markdown_table(header, rows)]
        # Paired differences against the strategy with the lowest mean after-loss at each depth.
        pair_rows = []
        for d in depths:
            means = {s: statistics.fmean(r["loss"] for r in by[(task, d, s)].values())
                     for s in strategies if by.get((task, d, s))}
            if not means:
                continue
            best = min(means, key=lambda s: means[s])
            for s in strategies:
                if s == best or not by.get((task, d, s)):
                    continue
                common_seeds = set(by[(task, d, s)]) & set(by[(task, d, best)])
                diffs = [by[(task, d, s)][k]["loss"] - by[(task, d, best)][k]["loss"] for k in sorted(common_seeds)]
                pair_rows.append([f"d={d}", f"{s} − {best}", fmt_interval(diffs)])
        if pair_rows:
            out += ["", f"Paired differences (same seed) against the best strategy at each depth, {task}; "
                    "bold = the 95% interval excludes 0:", "",
                    common.markdown_table(["depth", "difference", "mean [95% CI]"], pair_rows)]
        ems = [(s, d, r) for (t, d, s), seeds in by.items() if t == task for r in seeds.values()
               if "exact_match" in r or "exact_match_note" in r]
        if task == "gsm8k" and ems:
            measured = [(s, d, r["exact_match"]) for s, d, r in ems if r.get("exact_match") is not None]
            skipped = len(ems) - len(measured)
            out += ["", f"GSM8K exact match: measured for {len(measured)} fine-tuned models"
                    + (" (" + ", ".join(f"{s}@{d}: {em:.2f}" for s, d, em in sorted(measured)) + ")" if measured else "")
                    + f"; skipped for {skipped} whose answer-token loss is above the threshold "
                    f"({sorted({c['config'].get('em_max_loss') for c in finetune if c['task'] == 'gsm8k'})[0]} nats)."]
    out += ["", "![pruning strategies](img/exp_pruning_strategies.png)"]
    return {"exp1": "\n".join(out)}


def render_exp1_plot(cells: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finetune = [c for c in cells if c["experiment"] == "pruning" and c["run"] == "finetune"]
    if not finetune:
        return False
    tasks = [t for t in common.TASKS if any(c["task"] == t for c in finetune)]
    strategies = sorted({c["strategy"] for c in finetune})
    depths = sorted({c["depths"][0] for c in finetune}, reverse=True)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    width = 0.8 / len(depths)
    for ax, task in zip(axes[0], tasks):
        for j, depth in enumerate(depths):
            xs = [i + (j - (len(depths) - 1) / 2) * width for i in range(len(strategies))]
            stats = [ci95([c["depth"][0]["loss"] for c in finetune if c["task"] == task and c["strategy"] == s
                           and c["depths"][0] == depth]) for s in strategies]
            ax.bar(xs, [m for m, _, _ in stats], width, yerr=[h or 0 for _, h, _ in stats], capsize=2,
                   label=f"{depth} layers, after")
            before = [next((c["depth"][0]["before_loss"] for c in finetune if c["task"] == task
                            and c["strategy"] == s and c["depths"][0] == depth), float("nan")) for s in strategies]
            ax.scatter(xs, before, marker="_", s=80, color="k", zorder=3, label="before" if j == 0 else None)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("held-out loss (nats/answer token)")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- experiment 2


def regime_key(cell: dict) -> tuple[str, tuple[int, ...]]:
    return cell["strategy"], tuple(cell["depths"])


def exp2_tables(cells: list[dict]) -> tuple[dict[str, str], list[dict]]:
    """(blocks, regimes) with per-regime tables: final loss per run and depth, paired differences."""
    hetero = [c for c in cells if c["experiment"] == "hetero"]
    homog = defaultdict(dict)  # (strategy or none, depth) -> seed -> loss
    for c in hetero:
        if c["mode"] == "homogeneous":
            homog[(c["strategy"], c["depths"][0])][c["seed"]["training"]] = c["depth"][0]["loss"]
    regimes: dict = defaultdict(lambda: defaultdict(dict))  # regime -> run -> seed -> {depth: loss}
    curves: dict = defaultdict(list)  # (regime, run, depth) -> [(round, loss)]
    for c in hetero:
        if c["mode"] == "homogeneous":
            continue
        regimes[regime_key(c)][c["run"]][c["seed"]["training"]] = {r["depth"]: r["loss"] for r in c["depth"]}
        for r in c["depth"]:
            for point in r.get("curve", []):
                curves[(regime_key(c), c["run"], r["depth"])].append((point["round"], point["loss"]))
    num_layers = max((c["depths"][0] for c in hetero if c["strategy"] == "none"), default=None)
    blocks, summaries = {}, []
    for (strategy, depths), runs in sorted(regimes.items(), key=lambda kv: (kv[0][0] != "contribution", kv[0])):
        name = f"exp2-{strategy}-{'-'.join(map(str, depths))}"
        table_runs = dict(runs)
        for d in depths:  # homogeneous: one cell per depth, shared across regimes at full depth
            key = ("none" if d == num_layers else strategy, d)
            for seed, loss in homog.get(key, {}).items():
                table_runs.setdefault("homogeneous", {}).setdefault(seed, {})[d] = loss
        order = sorted(table_runs, key=run_order)
        header = ["run"] + [f"{d} layers" for d in depths] + ["seeds"]
        rows = [[run] + [fmt_ci([v[d] for v in table_runs[run].values() if d in v]) for d in depths]
                + [str(len(table_runs[run]))] for run in order]
        text = ["Held-out loss of each depth's global after the last round (nats per answer token, mean ± 95% CI "
                "over seeds):", "", common.markdown_table(header, rows)]
        for baseline in ("fedavg-group", "homogeneous"):
            if baseline not in table_runs:
                continue
            pair_rows = []
            for run in order:
                if run == baseline:
                    continue
                cols = []
                for d in depths:
                    seeds = sorted(s for s in table_runs[run] if s in table_runs[baseline]
                                   and d in table_runs[run][s] and d in table_runs[baseline][s])
                    cols.append(fmt_interval([table_runs[run][s][d] - table_runs[baseline][s][d] for s in seeds]))
                pair_rows.append([f"{run} − {baseline}"] + cols)
            text += ["", f"Paired differences against `{baseline}` (same seed; negative = better than {baseline}; "
                     "bold = the 95% interval excludes 0):", "",
                     common.markdown_table(["comparison"] + [f"{d} layers" for d in depths], pair_rows)]
        text += ["", f"![{strategy} {'/'.join(map(str, depths))}](img/{exp2_figure(strategy, depths)})"]
        blocks[name] = "\n".join(text)
        summaries.append({"name": name, "strategy": strategy, "depths": depths, "runs": table_runs,
                          "curves": {(run, d): pts for (reg, run, d), pts in curves.items() if reg == (strategy, depths)}})
    return blocks, summaries


def exp2_figure(strategy: str, depths: Sequence[int]) -> str:
    return f"exp_hetero_{strategy}_{'-'.join(map(str, depths))}.png"


def run_order(run: str) -> tuple[int, str]:
    prefixes = ["homogeneous", "fedavg-group", "local", "heteagg", "mixed", "additive"]
    return next((i for i, p in enumerate(prefixes) if run.startswith(p)), len(prefixes)), run


def exp2_findings(summaries: list[dict]) -> str:
    """Issue 16's goal per regime, checked mechanically: the best new mode at or below fedavg-group at every pruned
    depth (95% CI of the paired difference below 0) and within 1% of homogeneous at full depth."""
    lines = []
    for summary in summaries:
        runs, depths = summary["runs"], summary["depths"]
        full, pruned = depths[0], depths[1:]
        if "fedavg-group" not in runs:
            continue
        verdicts = []
        for run in sorted(runs, key=run_order):
            if not run.startswith(("mixed", "additive", "heteagg")):
                continue
            ok, parts = True, []
            for d in pruned:
                seeds = sorted(s for s in runs[run] if s in runs["fedavg-group"] and d in runs[run][s])
                diffs = [runs[run][s][d] - runs["fedavg-group"][s][d] for s in seeds]
                mean, half, n = ci95(diffs)
                if n < 2 or half is None or mean + half >= 0:
                    ok = False
                parts.append(f"{d} layers {fmt_interval(diffs).strip('*')}")
            homog = runs.get("homogeneous", {})
            seeds = sorted(s for s in runs[run] if s in homog and full in homog[s] and full in runs[run][s])
            rel = [runs[run][s][full] / homog[s][full] - 1 for s in seeds]
            rel_mean = statistics.fmean(rel) if rel else float("nan")
            ok = ok and bool(rel) and rel_mean <= 0.01
            verdicts.append(f"- `{run}`: {'**meets**' if ok else 'does not meet'} the goal — vs fedavg-group: "
                            + "; ".join(parts) + (f"; full depth vs homogeneous: {100 * rel_mean:+.2f}% "
                                                  f"({len(rel)} seeds)" if rel else "; no homogeneous pair yet"))
        lines += [f"Regime `{summary['strategy']}` {'/'.join(map(str, depths))}:", "", *verdicts, ""]
    return "\n".join(lines).strip() or "_No experiment 2 cell has finished yet._"


def render_exp2_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = summary["depths"]
    fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths), 3.6), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for (run, d), points in sorted(summary["curves"].items(), key=lambda kv: run_order(kv[0][0])):
            if d != depth or not points:
                continue
            by_round = defaultdict(list)
            for rnd, loss in points:
                by_round[rnd].append(loss)
            rounds = sorted(by_round)
            ax.plot(rounds, [statistics.fmean(by_round[r]) for r in rounds], marker="o", ms=3, label=run)
        homog = [v[depth] for v in summary["runs"].get("homogeneous", {}).values() if depth in v]
        if homog:
            ax.axhline(statistics.fmean(homog), ls="--", color="k", lw=1, label="homogeneous (end)")
        local = [v[depth] for v in summary["runs"].get("local", {}).values() if depth in v]
        if local:
            ax.axhline(statistics.fmean(local), ls=":", color="grey", lw=1, label="local (end)")
        ax.set_title(f"{depth} layers")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (nats/answer token)")
        ax.legend(fontsize=6)
    fig.suptitle(f"{summary['strategy']} {'/'.join(map(str, depths))}: mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the grid


def planned_cells() -> dict[str, set[str]]:
    """File names of every cell the default grid commands plan (the grid's denominator), per experiment."""
    import exp_hetero_vs_homo as exp2
    import exp_pruning_strategies as exp1

    from prufed.common.models import read_model_config, resolve_model

    num_layers = int(read_model_config(resolve_model(None))["num_hidden_layers"])
    args2 = exp2.parse_args([])
    names2 = {f"{cell.name(exp2.budget_tag(args2))}.json" for cell in exp2.plan_cells(args2, num_layers)}
    args1 = exp1.parse_args([])
    names1 = {exp1.cell_file(args1, *cell) for cell in exp1.plan_cells(args1, num_layers)}
    return {"hetero": names2, "pruning": names1}


def cell_kind(experiment: str, name_or_run: str, groups: int) -> tuple[str, str, int]:
    """Cells of one kind cost about the same: (experiment, run family, number of depth groups)."""
    run = name_or_run
    family = "heteagg" if run.startswith("heteagg") else run.split("-")[0] if run.startswith(("mixed", "additive")) \
        else run
    return experiment, family, groups


def layer_steps(name: str) -> int:
    """Σ over clients of the layers each trains, for an experiment-2 cell file name: its cost scales with it
    (3 groups of 2 clients; homogeneous and the 30-layer model: all 6 clients at the cell's one depth)."""
    depths = [int(d) for d in name.split("__")[3].split("-")]
    return 2 * sum(depths) if len(depths) > 1 else 6 * depths[0]


def in_progress(state_dir: Path | None) -> list[dict]:
    """Unfinished experiment-2 cells: name, rounds done and CPU seconds so far, from their round checkpoints."""
    import torch

    out = []
    for path in sorted(state_dir.glob("*.pt")) if state_dir and state_dir.is_dir() else []:
        try:
            payload = torch.load(path, weights_only=False, map_location="cpu")
        except Exception:  # a checkpoint being replaced right now: skip it this time
            continue
        out.append({"name": path.stem + ".json", "round": payload["round"], "rounds": payload["config"]["rounds"],
                    "cpu": payload.get("cpu_seconds"), "wall": payload.get("seconds")})
    return out


def status_block(cells: list[dict], files: Iterable[str], planned: dict[str, set[str]] | None,
                 running: Sequence[dict] = ()) -> str:
    """Cells done, where they ran, and the time left estimated from measured costs.

    Time left is in CPU hours (process time, which does not depend on how loaded the machine was) and as wall
    hours on 2 idle cores = CPU hours / 2 (the cells run 2 torch threads). An experiment-2 cell is estimated from
    the finished cells' CPU seconds per layer-step (Σ over clients of the layers trained, `layer_steps`), else from
    the CPU per round of the cells in progress; an experiment-1 cell from the finished experiment-1 cells."""
    files = set(files)
    per_layer = [c["cpu_seconds"] / layer_steps(cell_file_name(c)) for c in cells
                 if c["experiment"] == "hetero" and c.get("cpu_seconds")]
    if not per_layer:
        per_layer = [r["cpu"] / r["round"] * r["rounds"] / layer_steps(r["name"]) for r in running
                     if r["cpu"] and r["round"]]
    exp1_cpu = [c["cpu_seconds"] for c in cells if c["experiment"] == "pruning" and c["run"] == "finetune"
                and c.get("cpu_seconds")]
    machines = sorted({f"{c['machine']['cpu']} ({c['machine']['cores']} cores)"
                       + (f", {c['machine']['gpu']}" if c["machine"].get("gpu") else "") for c in cells})
    precisions = sorted({f"{c['device']}, {c['precision']}" for c in cells})
    commits = sorted({c["git_commit"][:10] for c in cells})
    wall = sum(c["wall_seconds"] for c in cells)
    cpu_total = sum(c.get("cpu_seconds") or 0 for c in cells)
    lines = [f"Cells finished: **{len(cells)}**; {wall / 3600:.2f} h of cell wall time and {cpu_total / 3600:.2f} "
             f"CPU hours in all, on {'; '.join(machines) or '–'} ({'; '.join(precisions) or '–'}); commits "
             f"{', '.join(commits) or '–'}."]
    if running:
        lines += ["", "In progress: " + "; ".join(
            f"`{r['name'].removesuffix('.json')}` after round {r['round']} of {r['rounds']} ({(r['cpu'] or 0) / 60:.0f} "
            f"CPU min, {(r['wall'] or 0) / 60:.0f} wall min)" for r in running) + "."]
    if planned:
        rows = []
        for experiment, names in planned.items():
            todo = sorted(names - files)
            if experiment == "hetero":
                cost = statistics.fmean(per_layer) if per_layer else None
                estimate = sum(layer_steps(n) for n in todo) * cost if cost else None
            else:
                estimate = len([n for n in todo if "__finetune__" in n]) * statistics.fmean(exp1_cpu) if exp1_cpu \
                    else None
            rows.append([experiment, f"{len(names & files)} / {len(names)}",
                         "not yet timed" if estimate is None else f"{estimate / 3600:.1f}",
                         "–" if estimate is None else f"{estimate / 7200:.1f}"])
        lines += ["", common.markdown_table(["experiment", "cells done / planned", "CPU hours left",
                                             "≈ hours left on 2 idle cores"], rows)]
    return "\n".join(lines)


def cell_file_name(cell: dict) -> str:
    """The file name an experiment-2 cell was written under (see exp_hetero_vs_homo.Cell.name)."""
    budget = cell["budget"]
    return common.cell_name(cell["experiment"], cell["run"], cell["strategy"], cell["depths"],
                            f"s{cell['seed']['training']}p{cell['seed']['partition']}",
                            f"r{budget['rounds']}x{budget['local_steps']}b{budget['examples_per_step']}") + ".json"


BLOCK = re.compile(r"<!-- BEGIN (?P<name>[\w.-]+) -->\n.*?<!-- END (?P=name) -->", re.S)


def fill(text: str, blocks: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group("name")
        body = blocks.get(name, "_No finished cell for this block yet._")
        return f"<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "docs/results/data", help="cell files")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/results.md", help="the document to fill in")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs/img", help="where the figures go")
    parser.add_argument("--no-plan", action="store_true",
                        help="do not count planned cells (needs the default model to resolve)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the running grid's --state-dir: its round checkpoints show the cells in progress")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the document is stale")
    args = parser.parse_args(argv)
    cells = load_cells(args.data_dir)
    blocks = exp1_blocks(cells)
    exp2_blocks, summaries = exp2_tables(cells)
    blocks |= exp2_blocks
    blocks["exp2-findings"] = exp2_findings(summaries)
    blocks["grid-status"] = status_block(cells, (p.name for p in args.data_dir.glob("*.json")),
                                         None if args.no_plan else planned_cells(), in_progress(args.state_dir))
    text = args.doc.read_text(encoding="utf-8")
    figures = []
    if not args.check:
        args.img_dir.mkdir(parents=True, exist_ok=True)
        if render_exp1_plot(cells, args.img_dir / "exp_pruning_strategies.png"):
            figures.append("exp_pruning_strategies.png")
        for summary in summaries:
            name = exp2_figure(summary["strategy"], summary["depths"])
            render_exp2_plot(summary, args.img_dir / name)
            figures.append(name)
    new = fill(text, blocks)
    if args.check:
        if new != text:
            print(f"{args.doc} is stale: rerun scripts/results_report.py", file=sys.stderr)
            return 1
        return 0
    from prufed.common.fsio import atomic_write_text

    atomic_write_text(args.doc, new)
    print(f"{args.doc}: {len(cells)} cells, blocks {', '.join(sorted(blocks))}; figures {', '.join(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
