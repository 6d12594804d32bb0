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
MAX_HEADER_DEPTH = 8
"""Deepest object/list nesting a safetensors header may have (a valid one has 3: header, entry, shape)."""
HEADER_METADATA_ALLOWANCE = 64 * 1024
"""Bytes of `__metadata__` and padding a header may hold beyond its tensor entries (see `header_cap`)."""
_ENTRY_OVERHEAD = 96  # '"":{"dtype":"BF16","shape":[],"data_offsets":[,]},' plus two 20-digit offsets, rounded up
_DIM_BYTES = 22  # one shape dimension: up to 20 digits and a comma, rounded up


class SafetensorsHeaderError(ValueError):
    """The file does not start with a valid safetensors header."""


def header_cap(index: TensorIndex) -> int:
    """Largest JSON header length a file with this tensor index needs, in bytes:

        Σ_tensors (len(name) + 96 + 22·ndim) + 64 KiB (metadata)

    so a header can be refused before a byte of it is parsed (safetensors itself allows 100 MB)."""
    return HEADER_METADATA_ALLOWANCE + sum(len(name.encode()) + _ENTRY_OVERHEAD + _DIM_BYTES * len(shape)
                                           for name, shape, _dtype in index)


def json_depth(raw: bytes) -> int:
    """Deepest nesting of objects/lists in JSON text, counted without parsing (brackets inside strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def loads_bounded(raw: bytes | str, max_depth: int) -> Any:
    """json.loads after checking the nesting depth (deep nesting would hit Python's recursion limit)."""
    data = raw.encode() if isinstance(raw, str) else raw
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than {max_depth}")
    return json.loads(data)


def safetensors_index(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES, *,
                      label: str | None = None) -> TensorIndex:
    """Read only the safetensors header (8-byte little-endian length + JSON), never the tensor bytes.

    Headers longer than `max_header_bytes` or nested deeper than `MAX_HEADER_DEPTH` are refused before parsing.
    `label` names the file in error messages instead of its path (a server must not reveal its paths).
    """
    name = label or str(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise SafetensorsHeaderError(f"{name}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > max_header_bytes:
            raise SafetensorsHeaderError(f"{name}: header length {length} exceeds {max_header_bytes}")
        raw = handle.read(length)
    try:
        header = loads_bounded(raw, MAX_HEADER_DEPTH)
        return tuple(sorted((key, tuple(int(d) for d in info["shape"]), str(info["dtype"]))
                            for key, info in header.items() if key != "__metadata__"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SafetensorsHeaderError(f"{name}: malformed safetensors header ({exc})") from exc


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
