"""Instruction data: load Alpaca / Dolly / GSM8K files, render the prompt, tokenize with prompt masking.

Formats (JSON array or JSONL, detected from the first record's keys, or forced with `--format`):
  alpaca  {"instruction", "input"?, "output"}
  dolly   {"instruction", "context"?, "response", "category"?}
  gsm8k   {"question", "answer"}

Prompt template (Alpaca; the "### Input:" block is left out when the input is empty):

    Below is an instruction that describes a task, paired with an input that provides further context. Write a \
    response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<eos>

Without an input the first line reads "Below is an instruction that describes a task. Write a response that
appropriately completes the request." Only the response and the EOS token are trained on: every prompt token has
label -100. A sequence longer than `max_len` tokens is cut at the end; an example whose prompt alone fills
`max_len` (no response token left) is dropped and counted.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prufed.common.errors import ConfigError

IGNORE_INDEX = -100
FORMATS: dict[str, tuple[str, ...]] = {
    # format -> (instruction key, input key, output key); "" when the format has no such field.
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "gsm8k": ("question", "", "answer"),
}
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class InstructionExample:
    instruction: str
    input: str
    output: str
    category: str = ""


class TokenizedExamples(list):
    """A list of `{input_ids, labels}` rows that also counts the examples dropped by truncation."""

    def __init__(self, rows=(), dropped: int = 0):
        super().__init__(rows)
        self.dropped = dropped


def format_prompt(example: InstructionExample) -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (see the module docstring)."""
    if example.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=example.instruction.strip(), input=example.input.strip())
    return PROMPT_NO_INPUT.format(instruction=example.instruction.strip())


def _read_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("--data", f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--data", f"{path}: unreadable ({exc})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ConfigError("--data", f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError("--data", f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError("--data", f"{path}: line {number} is not valid JSON Lines ({exc.msg})") from None
    if not records:
        raise ConfigError("--data", f"{path}: holds no records")
    return records


def detect_format(record: object, source: str = "data") -> str:
    """The format whose required keys the record has (alpaca, dolly, gsm8k)."""
    if isinstance(record, dict):
        for name, (instruction, _, output) in FORMATS.items():
            if instruction in record and output in record:
                return name
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(
        "--format", f"{source}: cannot detect the format from the first record's keys {keys}; expected "
        "alpaca (instruction/input/output), dolly (instruction/context/response) or gsm8k (question/answer)"
    )


def load_examples(path: str | os.PathLike[str], fmt: str | None = None) -> list[InstructionExample]:
    """Read every record of an instruction file (JSON array or JSONL) in the given or detected format."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    records = _read_records(path)
    fmt = fmt or detect_format(records[0], str(path))
    instruction_key, input_key, output_key = FORMATS[fmt]
    examples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError("--data", f"{path}: record {index} is a {type(record).__name__}, not an object")
        missing = [key for key in (instruction_key, output_key) if key not in record]
        if missing:
            raise ConfigError("--data", f"{path}: record {index} lacks {missing} required by --format {fmt}")
        fields = [record[instruction_key], record.get(input_key, "") if input_key else "", record[output_key]]
        if not all(isinstance(value, str) for value in fields):
            raise ConfigError("--data", f"{path}: record {index} has a non-string instruction, input or output")
        category = record.get("category", "")
        examples.append(InstructionExample(*fields, category=category if isinstance(category, str) else ""))
    return examples


def tokenize_examples(examples: Sequence[InstructionExample], tokenizer, max_len: int) -> TokenizedExamples:
    """Rows `{input_ids, labels}`: prompt + response + EOS, labels -100 on the prompt, cut to `max_len` tokens.

    Prompt and response are tokenized separately, so the mask boundary is exact whatever the tokenizer merges.
    """
    if max_len < 2:
        raise ConfigError("--seq-len", f"must be >= 2, got {max_len}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("--model", "the tokenizer has no EOS token")
    rows, dropped = [], 0
    for example in examples:
        prompt = tokenizer(format_prompt(example), add_special_tokens=True)["input_ids"]
        response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) >= max_len:
            dropped += 1
            continue
        ids = (prompt + response)[:max_len]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        rows.append({"input_ids": ids, "labels": labels})
    return TokenizedExamples(rows, dropped)


def split_heldout(
    examples: Sequence[InstructionExample], fraction: float, seed: int = 0
) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """(train, heldout): a seeded random `fraction` of the examples (at least 1 when fraction > 0) held out.

    Both parts keep the file order; the same inputs always give the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError("--eval-fraction", f"must be in [0, 1), got {fraction}")
    count = len(examples)
    held = 0 if fraction == 0 or count < 2 else min(count - 1, max(1, round(fraction * count)))
    chosen = set(random.Random(seed).sample(range(count), held))
    train = [example for i, example in enumerate(examples) if i not in chosen]
    heldout = [example for i, example in enumerate(examples) if i in chosen]
    return train, heldout


def batch_indices(num_rows: int, batch_size: int, seed: int, position: int) -> list[int]:
    """Row indices of the `position`-th batch of an endless stream of seeded per-epoch shuffles.

    The stream is perm(seed, 0) ++ perm(seed, 1) ++ ...; a batch may straddle two epochs. Being a pure function
    of `position`, the data order after a resume is exactly that of an uninterrupted run.
    """
    if num_rows < 1:
        raise ConfigError("--data", "no training examples left after truncation and the held-out split")
    start = position * batch_size
    out: list[int] = []
    epoch, offset = divmod(start, num_rows)
    while len(out) < batch_size:
        order = list(range(num_rows))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.extend(order[offset : offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


LENGTH_GROUP_BATCHES = 16  #: batches whose rows are sorted by length together (a window of 16 × batch_size rows)


def grouped_batch_indices(lengths: Sequence[int], batch_size: int, seed: int, position: int,
                          group: int = LENGTH_GROUP_BATCHES) -> list[int]:
    """The `position`-th batch of `batch_indices`' stream, re-cut so that rows of similar length share a batch.

    Window w = positions [w·group, (w+1)·group) holds exactly the rows `batch_indices` would give those positions
    (the same examples, the same number of times); they are sorted by length (longest first, ties by index), cut
    into `group` batches, and the batches are put in a seeded order. A batch then pads to a length close to each of
    its rows', so right-padding costs little compute (HF's LengthGroupedSampler does the same with megabatches).
    Pure in `position`: a resume sees the same batches.
    """
    window, slot = divmod(position, group)
    rows = batch_indices(len(lengths), batch_size * group, seed, window)
    ordered = sorted(rows, key=lambda i: (-lengths[i], i))
    batches = [ordered[k * batch_size:(k + 1) * batch_size] for k in range(group)]
    random.Random(f"{seed}:group:{window}").shuffle(batches)
    return batches[slot]
