"""Instruction data: formats, prompt masking, truncation, held-out split, batching order, demo tasks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import build_tiny_tokenizer

from edge_client.corpus import kjv_verses, split_of
from edge_client.data import (
    IGNORE_INDEX,
    InstructionExample,
    batch_indices,
    format_prompt,
    load_examples,
    split_heldout,
    tokenize_examples,
)
from edge_client.demo_data import build_demo_examples
from prufed.common.errors import ConfigError

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
DOLLY = [{"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}]
GSM8K = [{"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}]


def write_json(path, records, jsonl: bool):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_formats_are_detected_from_the_first_record(tmp_path, jsonl):
    alpaca = load_examples(write_json(tmp_path / "a", ALPACA, jsonl))
    assert alpaca == [InstructionExample("Name a colour.", "", "Blue"), InstructionExample("Add the numbers.", "2 and 3", "5")]
    dolly = load_examples(write_json(tmp_path / "d", DOLLY, jsonl))
    assert dolly == [InstructionExample("Summarise.", "A long text.", "Short.", "summarization")]
    gsm = load_examples(write_json(tmp_path / "g", GSM8K, jsonl))
    assert gsm == [InstructionExample("What is 6 times 7?", "", "6*7=42\n#### 42")]


def test_forced_format_reads_its_keys_and_rejects_others(tmp_path):
    path = write_json(tmp_path / "d.jsonl", DOLLY, jsonl=True)
    assert load_examples(path, fmt="dolly")[0].input == "A long text."
    with pytest.raises(ConfigError, match=r"--data.*record 0 lacks \['output'\].*--format alpaca"):
        load_examples(path, fmt="alpaca")
    with pytest.raises(ConfigError, match="^--format"):
        load_examples(path, fmt="sharegpt")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("   \n\n", "empty"),
        ("[]", "no records"),
        ("[{\"instruction\": 1", "not valid JSON"),
        ("{\"a\": 1}\nnot json\n", "line 2"),
        ("[1, 2]", "cannot detect"),
        (json.dumps([{"text": "hello"}]), "cannot detect"),
        (json.dumps([ALPACA[0], {"instruction": 3, "output": "x"}]), "record 1 has a non-string"),
        (json.dumps([ALPACA[0], [1]]), "record 1 is a list"),
    ],
)
def test_bad_files_name_the_flag(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_examples(path)
    assert info.value.field in ("--data", "--format")


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="^--data: .*no such file"):
        load_examples(tmp_path / "absent.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="^--data: .*unreadable"):
        load_examples(binary)


def test_prompt_template_with_and_without_input():
    with_input = format_prompt(InstructionExample("Add.", "2 and 3", "5"))
    assert "paired with an input" in with_input and "### Input:\n2 and 3\n\n### Response:\n" in with_input
    without = format_prompt(InstructionExample("Name a colour.", "  ", "Blue"))
    assert "### Input" not in without and without.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


def test_labels_mask_exactly_the_prompt_tokens(tokenizer):
    examples = [InstructionExample("Add.", "2 and 3", "five"), InstructionExample("Colour?", "", "Blue sky")]
    rows = tokenize_examples(examples, tokenizer, max_len=512)
    assert rows.dropped == 0 and len(rows) == 2
    for example, row in zip(examples, rows):
        prompt_len = len(tokenizer(format_prompt(example))["input_ids"])
        response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"][prompt_len:] == response
        assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert row["labels"][prompt_len:] == response  # every response token + EOS is a target
        assert tokenizer.decode(row["input_ids"][:prompt_len]) == format_prompt(example)


def test_truncation_cuts_the_response_and_drops_prompt_only_examples(tokenizer):
    example = InstructionExample("Say a long thing.", "", "x" * 100)
    prompt_len = len(tokenizer(format_prompt(example))["input_ids"])
    cut = tokenize_examples([example], tokenizer, max_len=prompt_len + 5)
    assert len(cut[0]["input_ids"]) == prompt_len + 5 and cut[0]["labels"][-5:] != [IGNORE_INDEX] * 5
    assert tokenizer.eos_token_id not in cut[0]["input_ids"][prompt_len:]  # the end was cut off
    dropped = tokenize_examples([example, InstructionExample("Hi", "", "yo")], tokenizer, max_len=prompt_len)
    assert dropped.dropped == 1 and len(dropped) == 1 and dropped[0]["labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(ConfigError, match="--seq-len"):
        tokenize_examples([example], tokenizer, max_len=1)


def test_heldout_split_is_deterministic_disjoint_and_sized():
    examples = [InstructionExample(f"q{i}", "", f"a{i}") for i in range(50)]
    train, held = split_heldout(examples, 0.2, seed=3)
    assert (train, held) == split_heldout(examples, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and set(train).isdisjoint(held)
    assert set(train) | set(held) == set(examples)
    assert [examples.index(e) for e in held] == sorted(examples.index(e) for e in held)  # file order kept
    assert split_heldout(examples, 0.2, seed=4)[1] != held
    assert split_heldout(examples, 0.0, seed=3) == (examples, [])
    assert len(split_heldout(examples[:3], 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(ConfigError, match="--eval-fraction"):
        split_heldout(examples, 1.0)


def test_batch_order_is_a_pure_function_of_position():
    stream = [i for position in range(7) for i in batch_indices(10, 3, seed=1, position=position)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # whole epochs
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    assert batch_indices(10, 3, seed=1, position=5) == stream[15:18]
    assert batch_indices(10, 3, seed=2, position=0) != stream[:3]
    assert batch_indices(2, 5, seed=0, position=0)[:2] != [] and len(batch_indices(2, 5, seed=0, position=0)) == 5


def _sources(example, split: str):
    """The corpus verses (in `split` chapters of the example's book) whose text is the example's input."""
    found = [(i, v) for i, v in enumerate(kjv_verses())
             if v.text == example.input and v.book == example.category and split_of(v.book, v.chapter) == split]
    assert found, f"{example.input!r} is not a {split} verse of {example.category}"
    return found


def test_demo_examples_have_checkable_answers():
    examples = build_demo_examples(60, seed=0)
    assert examples == build_demo_examples(60, seed=0) and examples != build_demo_examples(60, seed=1)
    canonical = kjv_verses()
    kinds = Counter()
    for example in examples:
        sources = _sources(example, "train")
        if example.instruction.startswith("Which book"):
            kinds["book"] += 1
            assert example.output == example.category
        elif example.instruction.startswith("Continue"):
            kinds["continue"] += 1
            assert any(canonical[i + 1].text == example.output and canonical[i + 1].chapter == v.chapter
                       for i, v in sources)
        else:
            kinds["citation"] += 1
            assert example.category in example.instruction
            assert example.output in {f"{v.chapter}:{v.verse}" for _, v in sources}
    assert kinds == {"book": 20, "continue": 20, "citation": 20}
    assert len({example.category for example in examples}) > 10  # many books: usable for non-IID splits


def test_demo_heldout_split_uses_heldout_chapters():
    for example in build_demo_examples(30, seed=0, split="heldout"):
        _sources(example, "heldout")
    with pytest.raises(ConfigError):
        build_demo_examples(0)
    with pytest.raises(ConfigError, match="split"):
        build_demo_examples(3, split="test")
