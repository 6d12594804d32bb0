"""Wire helpers shared by the aggregator and the edge client: the safetensors tensor index and file chunking."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TensorIndex = tuple[tuple[str, tuple[int, ...], str], ...]
"""Sorted (name, shape, safetensors dtype tag) triples: what an upload header declares."""

CHUNK_CAP_BYTES = 4 * 1024 * 1024
"""gRPC's default message cap; one data chunk never exceeds it."""
# scripts/bench_transport.py (16 MiB LLaMA-7B r=8 delta, 2 loaded CPU cores): UploadUpdate throughput is flat
# within noise from 512 KiB to 4 MiB chunks, while server peak RSS grows with the chunk (the spool queues 4 of
# them: 366 MiB at 1 MiB vs 416 MiB at 4 MiB - 64 KiB). 1 MiB keeps memory low at no measured cost.
DEFAULT_CHUNK_BYTES = 1024 * 1024
MESSAGE_CAP_BYTES = CHUNK_CAP_BYTES + 64 * 1024
"""Max gRPC message both ways: one chunk plus protobuf framing and header fields."""
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class SafetensorsHeaderError(ValueError):
    """The file does not start with a valid safetensors header."""


def safetensors_index(path: str | Path) -> TensorIndex:
    """Read only the safetensors header (8-byte little-endian length + JSON), never the tensor bytes."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise SafetensorsHeaderError(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsHeaderError(f"{path}: header length {length} exceeds {MAX_HEADER_BYTES}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        return tuple(sorted((name, tuple(int(d) for d in info["shape"]), str(info["dtype"]))
                            for name, info in header.items() if name != "__metadata__"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SafetensorsHeaderError(f"{path}: malformed safetensors header ({exc})") from exc


def iter_chunks(path: str | Path, chunk_size: int) -> Iterator[bytes]:
    """The file's bytes in chunks of at most `chunk_size`."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            yield block


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes that depend only on the content: sorted names, sorted-key JSON header.

    `safetensors.torch.save` orders metadata by a per-process random hash, so identical content can hash
    differently; content-addressed blobs, idempotent closes and replayed uploads need byte equality.
    """
    import torch

    tags = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": tags[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset,
                                                                                                  offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
