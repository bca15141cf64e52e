"""Reading a safetensors header on its own, so that a remote object's tensors can be fetched
by byte range.

Why our own parser: the safetensors package opens whole local files (or whole byte strings);
it has no call that takes just the header. The format is small and documented: an 8-byte
little-endian header length N, then N bytes of JSON mapping each tensor name to its dtype,
shape and [begin, end) offsets in the data section that follows. Everything is checked, so a
truncated or corrupt object is refused before any tensor byte is trusted.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from mixserve.errors import CheckpointError

LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 << 20  # the limit the safetensors package itself enforces
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the object
    end: int  # exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def header_length(first_bytes: bytes, where: str) -> int:
    """N from the object's first 8 bytes."""
    if len(first_bytes) < LENGTH_BYTES:
        raise CheckpointError(f"{where} is too short to be a safetensors file ({len(first_bytes)} bytes)")
    (n,) = struct.unpack("<Q", first_bytes[:LENGTH_BYTES])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where} is not a safetensors file (header length {n})")
    return n


def parse_header(header: bytes, object_size: int, where: str) -> dict[str, TensorEntry]:
    """Tensor entries from the JSON header; checks that the offsets tile the data section exactly
    and that the object is as long as the header says (a truncated upload fails here)."""
    try:
        table = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} has a corrupt safetensors header ({exc})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{where} has a corrupt safetensors header (not a JSON object)")
    data_start = LENGTH_BYTES + len(header)
    entries: dict[str, TensorEntry] = {}
    for name, info in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: header entry {name!r} is malformed ({exc})") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != expected:
            raise CheckpointError(f"{where}: tensor {name!r} has offsets {begin}..{end} that do not fit its shape")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    spans = sorted((e.start, e.end) for e in entries.values())
    cursor = data_start
    for start, end in spans:
        if start != cursor:
            raise CheckpointError(f"{where}: tensor data overlaps or leaves gaps (corrupt header)")
        cursor = end
    if object_size != cursor:
        kind = "truncated" if object_size < cursor else "longer than its header says"
        raise CheckpointError(f"{where} is {kind}: {object_size} bytes, the header describes {cursor}")
    return entries


def tensor_from_bytes(entry: TensorEntry, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """The tensor in `data` (exactly entry.nbytes, little-endian as safetensors stores it)."""
    if len(data) != entry.nbytes:
        raise CheckpointError(f"tensor {entry.name}: got {len(data)} bytes, expected {entry.nbytes}")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    flat = torch.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=DTYPES[entry.dtype])
    return flat.reshape(entry.shape)
