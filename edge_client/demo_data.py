"""Demo instruction data built at run time from the King James Bible (public domain, `edge_client.corpus`).

Every task has an answer that can be checked against the text itself:
  book      "Which book of the Bible is this verse from?"           input: a verse      -> the book's name
  continue  "Continue the passage with the verse that follows."     input: a verse      -> the next verse
  citation  "Give the chapter and verse of this passage from {B}."  input: a verse      -> "chapter:verse"
The category of each example is the verse's book (66 categories), usable for a Dirichlet non-IID split.
split="train" draws from the corpus's train chapters only, split="heldout" from its held-out chapters.
"""

from __future__ import annotations

import random

from edge_client.corpus import SPLITS, chapters
from edge_client.data import InstructionExample
from prufed.common.errors import ConfigError

TASKS = ("book", "continue", "citation")


def build_demo_examples(count: int, seed: int = 0, split: str = "train") -> list[InstructionExample]:
    """`count` examples, tasks in rotation, verses drawn with `random.Random(seed)`; deterministic."""
    if count < 1:
        raise ConfigError("--max-examples", f"must be >= 1, got {count}")
    if split not in SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    pool = [entry for entry in chapters(split) if len(entry[2]) >= 2]  # "continue" needs a next verse
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        book, chapter, verses = rng.choice(pool)
        position = rng.randrange(len(verses) - 1)
        verse = verses[position]
        task = TASKS[index % len(TASKS)]
        if task == "book":
            example = InstructionExample("Which book of the Bible is this verse from?", verse.text, book, book)
        elif task == "continue":
            example = InstructionExample(
                "Continue the passage with the verse that follows.", verse.text, verses[position + 1].text, book
            )
        else:
            example = InstructionExample(
                f"Give the chapter and verse of this passage from the book of {book}.", verse.text,
                f"{chapter}:{verse.verse}", book,
            )
        examples.append(example)
    return examples
