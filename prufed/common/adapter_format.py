"""Adapter files: safetensors with ORIGINAL-layer keys (see `prufed.common.adapter_keys`) and typed metadata.

Metadata (all safetensors metadata values are strings):
  format        `prufed-adapter/1` (a global adapter) or `prufed-delta/1` (a client update Δ = local − global)
  num_examples  decimal integer > 0 (updates only)
  kept_layers   JSON list of ORIGINAL layer indices the tensors cover
  base_model    fingerprint of the base model (`prufed.common.models.fingerprint_model_dir`)
  round         decimal integer, the federation round the tensors belong to
  lora          optional JSON {"r", "alpha", "targets"} so a reader can rebuild the PEFT config
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prufed.common.errors import PrufedError
from prufed.common.fsio import atomic_path

GLOBAL_FORMAT = "prufed-adapter/1"
DELTA_FORMAT = "prufed-delta/1"
FORMATS = (GLOBAL_FORMAT, DELTA_FORMAT)


class AdapterFormatError(PrufedError):
    """An adapter file whose metadata is missing or malformed."""


@dataclass(frozen=True)
class AdapterMeta:
    """Typed view of an adapter file's metadata."""

    format: str
    kept_layers: tuple[int, ...]
    base_model: str = ""
    round: int = 0
    num_examples: int | None = None
    lora: dict[str, Any] = field(default_factory=dict)  # LoRA hyper-parameters (r, alpha, targets)
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        meta = {
            "format": self.format,
            "kept_layers": json.dumps(list(self.kept_layers)),
            "base_model": self.base_model,
            "round": str(int(self.round)),
        }
        if self.num_examples is not None:
            meta["num_examples"] = str(int(self.num_examples))
        if self.lora:
            meta["lora"] = json.dumps(self.lora, sort_keys=True)
        meta.update({key: str(value) for key, value in self.extra.items()})
        return meta

    @classmethod
    def from_strings(cls, meta: Mapping[str, str] | None, source: str = "adapter") -> AdapterMeta:
        meta = dict(meta or {})
        fmt = meta.pop("format", None)
        if fmt not in FORMATS:
            raise AdapterFormatError(f"{source}: metadata 'format' is {fmt!r}, expected one of {FORMATS}")
        try:
            kept = tuple(int(i) for i in json.loads(meta.pop("kept_layers")))
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterFormatError(f"{source}: metadata 'kept_layers' missing or not a JSON list of ints") from exc
        num_examples = None
        if "num_examples" in meta:
            text = meta.pop("num_examples")
            if not text.isdecimal():
                raise AdapterFormatError(f"{source}: metadata 'num_examples' must be a decimal integer, got {text!r}")
            num_examples = int(text)
        elif fmt == DELTA_FORMAT:
            raise AdapterFormatError(f"{source}: an update must carry metadata 'num_examples'")
        round_text = meta.pop("round", "0")
        if not round_text.lstrip("-").isdecimal():
            raise AdapterFormatError(f"{source}: metadata 'round' must be an integer, got {round_text!r}")
        lora = json.loads(meta.pop("lora")) if "lora" in meta else {}
        return cls(
            format=fmt,
            kept_layers=kept,
            base_model=meta.pop("base_model", ""),
            round=int(round_text),
            num_examples=num_examples,
            lora=lora,
            extra=meta,
        )


def save_adapter(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: AdapterMeta) -> Path:
    """Write tensors + metadata atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    contiguous = {key: value.detach().contiguous().cpu() for key, value in sorted(tensors.items())}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=meta.to_strings())
    return path


def read_meta(path: str | os.PathLike[str]) -> AdapterMeta:
    """Read only the header's metadata (no tensor bytes)."""
    with safe_open(str(path), framework="pt") as handle:
        return AdapterMeta.from_strings(handle.metadata(), source=str(path))


def load_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Load every tensor and the typed metadata."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such adapter file")
    try:
        meta = read_meta(path)
        return load_file(str(path)), meta
    except AdapterFormatError:
        raise
    except Exception as exc:  # safetensors raises bare Exceptions for corrupt headers
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
