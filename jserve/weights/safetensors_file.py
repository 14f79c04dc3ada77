"""Safetensors checkpoints (single file or sharded with ``model.safetensors.index.json``) read as memory-mapped
numpy arrays, with errors that name the file and tensor.

The format is parsed directly (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then raw little-endian data), so bfloat16 works without torch
(via ``ml_dtypes``) and a truncated or corrupt file is reported precisely instead of failing deep inside a
library.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "SafetensorsCheckpoint", "find_safetensors"]


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, truncated or corrupt (the message names the file/tensor)."""


_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


def _is_count(v: object) -> bool:
    """An integer >= 0 read from JSON (a bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _File:
    """One safetensors file: its parsed header and a lazy memory map."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise SafetensorsError(f"safetensors file not found: {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"truncated safetensors file {path}: {size} bytes, no header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"corrupt or truncated safetensors file {path}: header length {n} exceeds file size {size}"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise SafetensorsError(f"corrupt safetensors header in {path}: {e}") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"corrupt safetensors header in {path}: not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self.data_start
        for name, info in header.items():
            try:
                dt_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            except (KeyError, TypeError) as e:
                raise SafetensorsError(f"corrupt header entry for tensor {name!r} in {path}: {info!r}") from e
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
                raise SafetensorsError(f"corrupt header entry for tensor {name!r} in {path}: shape must be a list of "
                                       f"integers >= 0, got {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
                raise SafetensorsError(f"corrupt header entry for tensor {name!r} in {path}: data_offsets must be "
                                       f"two integers >= 0, got {offsets!r}")
            shape, (begin, end) = tuple(shape), offsets
            if not isinstance(dt_name, str) or dt_name not in _DTYPES:
                raise SafetensorsError(f"tensor {name!r} in {path} has unsupported dtype {dt_name!r}")
            dt = _DTYPES[dt_name]
            expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if end - begin != expected:
                raise SafetensorsError(
                    f"corrupt header for tensor {name!r} in {path}: offsets {begin}..{end} hold {end - begin} "
                    f"bytes, shape {list(shape)} {dt_name} needs {expected}"
                )
            if end > data_len:
                raise SafetensorsError(
                    f"truncated safetensors file {path}: tensor {name!r} ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.entries[name] = (dt, shape, int(begin), int(end))
        self._mm: np.memmap | None = None

    def get(self, name: str) -> np.ndarray:
        dt, shape, begin, end = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self.data_start + begin : self.data_start + end].view(dt).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, by name."""

    def __init__(self, files: list[Path]):
        self.files = [_File(p) for p in files]
        self._where: dict[str, _File] = {}
        for f in self.files:
            for name in f.entries:
                if name in self._where:
                    raise SafetensorsError(f"tensor {name!r} appears in both {self._where[name].path} and {f.path}")
                self._where[name] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].entries[name][0]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise SafetensorsError(f"tensor {name!r} not found in {[str(f.path) for f in self.files]}")
        return self._where[name].get(name)


def find_safetensors(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (index first, then single, then all)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise SafetensorsError(f"corrupt index {index}: {e!r}") from e
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"corrupt index {index}: field 'weight_map' must be an object of tensor name to "
                                   f"file name, got {type(weight_map).__name__}")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise SafetensorsError(f"corrupt index {index}: field 'weight_map' maps tensor {bad[0]!r} to {bad[1]!r}, "
                                   "not a file name")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise SafetensorsError(f"{index} lists shard(s) not found in {model_dir}: {missing}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = f" (found {others}: only safetensors are supported)" if others else ""
    raise SafetensorsError(f"no safetensors weights in model directory {model_dir}{hint}")
