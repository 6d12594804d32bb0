"""Shared pieces of the experiment scripts: task data, a fixed-budget LoRA fine-tune, evaluation, tables.

Everything here runs in-process on an already loaded (pruned) model, so an experiment loads the base weights once
and never round-trips adapters through files. Fine-tuning is plain AdamW on the prompt-masked next-token loss
(`edge_client.data.tokenize_examples` masks the prompt), the same objective as `edge_client.train`.
"""

from __future__ import annotations

import copy
import csv
import os
import random
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_client.evaluate import EvalResult, batched, masked_loss

TASKS = ("alpaca", "gsm8k")
ANSWER_MARK = "####"


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TaskData:
    """One task's train pool, held-out evaluation rows and (GSM8K) generation examples with gold answers."""

    name: str
    train: list  # list[InstructionExample]
    heldout: list  # list[InstructionExample]
    generate: list  # list[tuple[InstructionExample, str]]: (example without answer, gold final number)


def final_number(text: str) -> str | None:
    """The number after the last '####' (GSM8K's answer mark), commas and a trailing '.' removed; else None."""
    if ANSWER_MARK not in text:
        return None
    match = re.search(r"-?[\d,]*\.?\d+", text.rsplit(ANSWER_MARK, 1)[1])
    return match.group(0).replace(",", "").rstrip(".") if match else None


def load_task(name: str, *, alpaca: str | None, gsm8k_train: str | None, gsm8k_test: str | None,
              heldout: int, generate: int, demo_count: int = 400) -> TaskData:
    """Real data when its path is given, else the built-in demo data (KJV instruction pairs) for either task.

    Alpaca: a fixed (seed 0) random 5% is held out (the first `heldout` of it scored), the rest is the train pool,
    shuffled (seed 0). GSM8K: the test file is held out (its first `heldout` rows scored, the first `generate`
    rows generated), the shuffled train file is the pool.
    """
    from edge_client.data import InstructionExample, load_examples, split_heldout
    from edge_client.demo_data import build_demo_examples

    if name == "alpaca" and alpaca:
        train, held = split_heldout(load_examples(alpaca, fmt="alpaca"), 0.05, seed=0)
        random.Random(0).shuffle(train)
    elif name == "gsm8k" and gsm8k_train and gsm8k_test:
        train, held = load_examples(gsm8k_train, fmt="gsm8k"), load_examples(gsm8k_test, fmt="gsm8k")
        random.Random(0).shuffle(train)
    else:
        # The two demo "tasks" differ in split so the smoke runs still exercise both code paths.
        train = build_demo_examples(demo_count, seed=0 if name == "alpaca" else 1, split="train")
        held = build_demo_examples(max(heldout, generate, 1), seed=0 if name == "alpaca" else 1, split="heldout")
    gen = []
    if name == "gsm8k":
        for example in held[:generate]:
            gold = final_number(example.output)
            if gold is not None:
                gen.append((InstructionExample(example.instruction, example.input, "", example.category), gold))
    return TaskData(name, train, held[:heldout], gen)


def category_labels(examples: Sequence, top: int = 8) -> list[str]:
    """A label per example for a non-IID split: its `category`, else the instruction's first word (top-k, rest 'other')."""
    raw = [(getattr(e, "category", "") or (e.instruction.split() or ["?"])[0]).lower().strip(":,.") for e in examples]
    common = {word for word, _ in Counter(raw).most_common(top)}
    return [word if word in common else "other" for word in raw]


def tokenize(examples: Sequence, tokenizer, max_len: int) -> list[dict]:
    from edge_client.data import tokenize_examples

    rows = tokenize_examples(list(examples), tokenizer, max_len)
    return [row for row in rows if any(label != -100 for label in row["labels"][1:])]


# ---------------------------------------------------------------------------------------------------- models


def tiny_model_dir(path: Path, num_layers: int = 8) -> Path:
    """A tiny random LLaMA (hidden 64) with a byte-level tokenizer, saved to `path` (the --smoke model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {f"<{i}>": i for i in range(3)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet())[: 256 - 3]:
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<0>", bos_token="<1>", eos_token="<2>")
    tokenizer.save_pretrained(path)
    return path


def model_dir_for(args) -> Path:
    """The model an experiment runs on: the tiny random one under `--smoke`, else `--model` (name or path).

    Also applies `--threads` (when the script has it) and creates `--out`.
    """
    from edge_client.layer_scores import source_model_dir

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return tiny_model_dir(args.out / "tiny-model") if args.smoke else source_model_dir(args.model)


def run_cli(run: Callable[[], int]) -> int:
    """Run a script body; a `PrufedError` (bad flag, missing file) becomes one `error:` line and exit code 2."""
    from prufed.common.errors import PrufedError

    try:
        return run()
    except PrufedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def pruned_copy(base: torch.nn.Module, kept_layers: Sequence[int]) -> torch.nn.Module:
    """A deep copy of `base` with only `kept_layers` (original indices); `base` is untouched."""
    from edge_client.model import prune_model

    model = copy.deepcopy(base)
    if list(kept_layers) != list(range(len(model.model.layers))):
        prune_model(model, tuple(kept_layers))
    return model


def finetune(model: torch.nn.Module, rows: Sequence[Mapping], *, steps: int, batch_size: int, lr: float, seed: int,
             pad_id: int) -> list[float]:
    """`steps` AdamW steps (lr, no weight decay, gradient norm clipped to 1) of the prompt-masked next-token loss,
    with the product's CPU-fast primitives (`edge_client.train.steps`): length-grouped batches of `rows` (seeded
    per-epoch shuffles re-cut by length, so little compute goes to padding) and the vocabulary projection only at
    trained positions (the same mean NLL per answer token). Only parameters with requires_grad (the fp32 LoRA
    factors) are updated; batches go to the model's device. Returns the per-step training losses.
    """
    from edge_client.train.steps import micro_batches, train_step, trained_position_loss

    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        micro = micro_batches(rows, pad_id, batch_size, 1, seed, step, grouped=True)
        loss, _ = train_step(model, micro, params, optimizer, device=device, loss_fn=trained_position_loss)
        losses.append(loss)
    model.eval()
    return losses


#: What `finetune` does, recorded in every cell's config (a cell trained otherwise is not the same cell).
TRAINER = "AdamW, length-grouped batches, loss at trained positions (edge_client.train.steps)"


def evaluate_rows(model: torch.nn.Module, rows: Sequence[Mapping], pad_id: int, batch_size: int = 8) -> EvalResult:
    return masked_loss(model, batched(list(rows), pad_id, batch_size))


@torch.inference_mode()
def exact_match(model: torch.nn.Module, tokenizer, items: Sequence[tuple], max_new_tokens: int) -> float:
    """Fraction of (example, gold) whose greedy completion's number after '####' equals gold."""
    from edge_client.data import format_prompt

    if not items:
        return float("nan")
    hits = 0
    for example, gold in items:
        ids = tokenizer(format_prompt(example), return_tensors="pt").to(next(model.parameters()).device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += final_number(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)) == gold
    return hits / len(items)


# ---------------------------------------------------------------------------------------------------- output


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count, NaNs left out."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt(mean: float, std: float, digits: int = 3) -> str:
    return "n/a" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(total: int, description: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(advance, close) of a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True))
    task = bar.add_task(description, total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar.stop


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": str(torch.get_num_threads())}


# ---------------------------------------------------------------------------------------------------- the grid
#
# Every cell (experiment, run, strategy, depths, seed, budget) is one small JSON file under --data-dir, written
# atomically when the cell is finished; a rerun skips it. A long cell also checkpoints after each round under
# --state-dir (not committed), so an interrupted run resumes from its last finished round.


def resolve_device(flag: str) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda" (auto = cuda when torch sees a GPU)."""
    from prufed.common.errors import ConfigError

    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for but torch sees no GPU")
    if flag not in ("cpu", "cuda"):
        raise ConfigError("--device", f"must be auto, cpu or cuda, got {flag!r}")
    return flag


def resolve_precision(flag: str, device: str) -> str:
    """--precision auto|bf16|fp32 of the frozen base weights (LoRA and optimizer state stay fp32).

    auto = bf16 where the hardware multiplies bf16 (`edge_client.model.native_bf16`: Ampere+ GPUs, CPUs with AMX or
    AVX512-BF16; measured here: 1.45 vs 2.24 s per SmolLM2 step), else fp32.
    """
    from edge_client.model import native_bf16
    from prufed.common.errors import ConfigError

    if flag not in ("auto", "bf16", "fp32"):
        raise ConfigError("--precision", f"must be auto, bf16 or fp32, got {flag!r}")
    if flag != "auto":
        return flag
    return "bf16" if native_bf16(device) else "fp32"


def add_grid_flags(parser) -> None:
    """The flags every grid experiment shares."""
    parser.add_argument("--data-dir", type=Path, default=Path("docs/results/data"),
                        help="one JSON file per finished cell (committed); finished cells are skipped")
    parser.add_argument("--state-dir", type=Path, default=Path("runs/grid-state"),
                        help="per-round checkpoints of unfinished cells (resumed on the next run)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto",
                        help="base weights: auto (bf16 where the device has native bf16 matmul), bf16 or fp32")
    parser.add_argument("--max-cells", type=int, default=0, help="stop after this many cells (0 = all)")
    parser.add_argument("--list", action="store_true", help="print the cells (done or to do) and exit")


def git_commit() -> str:
    """HEAD of the repo these scripts live in, with '+dirty' when tracked files differ from it; $PRUFED_GIT_COMMIT
    when set (a grid run from an exported snapshot of a commit, so that later edits cannot leak into it)."""
    import subprocess

    if os.environ.get("PRUFED_GIT_COMMIT"):
        return os.environ["PRUFED_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cell_name(experiment: str, run: str, strategy: str, depths: Sequence[int], seed: str, budget: str,
              task: str = "") -> str:
    """The cell's file stem, e.g. hetero__mixed-auto__contribution__30-20-10__alpaca__s0p0__r10x10b4."""
    parts = [experiment, run, strategy, "-".join(str(d) for d in depths)] + ([task] if task else []) + [seed, budget]
    return "__".join(parts)


def read_cell(path: Path, config: Mapping) -> dict | None:
    """The finished cell at `path`, or None; a cell made under another configuration is an error, not a skip."""
    import json

    from prufed.common.errors import ConfigError

    if not path.is_file():
        return None
    cell = json.loads(path.read_text(encoding="utf-8"))
    if cell.get("config") != dict(config):
        changed = sorted(k for k in set(config) | set(cell.get("config", {}))
                         if cell.get("config", {}).get(k) != config.get(k))
        raise ConfigError("--data-dir", f"{path.name} was made with other settings ({', '.join(changed)}); "
                          "use another --data-dir or delete the file")
    return cell



def cells_to_run(args, cells: Sequence, file_of: Callable[[Any], Path], config_of: Callable[[Any], Mapping],
                 what: str) -> list:
    """The cells without a finished file of the same configuration, at most `--max-cells` of them; with `--list`,
    print each cell's file name and whether it is done."""
    todo = []
    for cell in cells:
        path = file_of(cell)
        done = read_cell(path, config_of(cell)) is not None
        if args.list:
            print(f"{'done' if done else 'todo'}  {path.name}")
        if not done:
            todo.append(cell)
    if args.max_cells:
        todo = todo[:args.max_cells]
    log(f"{len(cells)} cells, {len(todo)} to run now ({what})")
    return todo

def write_cell(path: Path, cell: Mapping) -> None:
    import json

    from prufed.common.fsio import atomic_write_text

    atomic_write_text(path, json.dumps(cell, indent=1, sort_keys=True) + "\n")


def save_checkpoint(path: Path, payload: Mapping) -> None:
    from prufed.common.fsio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)


def load_checkpoint(path: Path, config: Mapping) -> dict | None:
    """A checkpoint of the same configuration, else None (a stale or unreadable one is ignored: restart clean)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=False)
    except Exception:  # a torn file cannot happen (atomic writes); any unreadable one means: restart the cell
        return None
    return payload if payload.get("config") == dict(config) else None


def cell_meta(device: str, precision: str) -> dict:
    """What every cell records about where and how it ran."""
    import platform

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else ""
    return {"git_commit": git_commit(), "device": device, "precision": f"{precision} base weights, fp32 LoRA + AdamW",
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}, "versions": versions()}
