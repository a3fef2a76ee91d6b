"""Minimal safetensors reader/writer over numpy (bf16 through ml_dtypes), tensor by tensor.

The reader memory-maps the file and hands out one tensor at a time, so a loader never holds the
whole checkpoint twice. The writer streams tensors to disk and stamps ``{"format": "pt"}`` into the
metadata, without which transformers refuses the file (SPECS.md section 3).
Format: https://github.com/huggingface/safetensors (8-byte little-endian header length, JSON
header, then raw little-endian tensor bytes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxft.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one ``.safetensors`` file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._header = header
        self._start = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self._header[key]["dtype"]
        if name not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _DTYPES[name]

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only numpy array memory-mapped on its own (no copy): its pages
        are released with the array, so a loader holds at most the tensors it still uses."""
        info = self._header[key]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return np.zeros(shape, self.dtype(key))
        return np.memmap(self.path, dtype=self.dtype(key), mode="r",
                         offset=self._start + begin, shape=shape)


def save_file(
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write tensors (a mapping, or name/array pairs consumed one at a time); returns bytes written.

    With an iterator the header needs shapes first, so pass a mapping of arrays (views are fine).
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dt} to safetensors")
        size = int(arr.size) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    tmp.replace(path)
    return offset
