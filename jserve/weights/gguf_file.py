"""GGUF files: metadata fields and dequantized tensors (numpy), for weights, configs and tokenizers.

The container is parsed directly (magic ``GGUF``, version, counts, typed key/values, tensor infos, aligned
data section) because the ``gguf`` package's reader spends seconds building per-string views of a 50k-token
vocabulary; the ``gguf`` package is still used for ``dequantize`` (Q4_1, Q8_0, K-quants...). Tensors come
back in numpy order (GGUF lists dimensions fastest-first, so a linear weight reads as ``[out, in]``, the
Hugging Face layout). llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` from Hugging Face's
rotate-half RoPE layout to interleaved pairs; :func:`unpermute_rope_rows` undoes it.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["GGUFError", "read_gguf_metadata", "GGUFTensors", "unpermute_rope_rows"]


class GGUFError(ValueError):
    """A GGUF file is missing, unreadable or lacks a needed field (the message names it)."""


# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
               11: "<i8", 12: "<f8"}


class _Parser:
    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFError(f"truncated GGUF file {self.path} at byte {self.pos}") from e
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"truncated GGUF file {self.path}: string of {n} bytes at byte {self.pos}")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _NP_SCALARS:  # numeric arrays in one read
                dt = np.dtype(_NP_SCALARS[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise GGUFError(f"truncated GGUF file {self.path}: array at byte {self.pos}")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"corrupt GGUF file {self.path}: unknown value type {vtype} at byte {self.pos}")


def _parse(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], int]], int, mmap.mmap]:
    """Metadata, ``{name: (ggml type, numpy shape, absolute data offset)}``, data size and the mapping."""
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise GGUFError(f"cannot read GGUF file {path}: {e}") from e
    p = _Parser(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"not a GGUF file (bad magic {bytes(buf[:4])!r}): {path}")
    p.pos = 4
    version = p.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version} in {path}")
    n_tensors, n_kv = p.unpack("Q"), p.unpack("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = p.string()
        meta[key] = p.value(p.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        ndim = p.unpack("I")
        dims = tuple(p.unpack("Q") for _ in range(ndim))
        infos.append((name, p.unpack("I"), dims, p.unpack("Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-p.pos // align) * align
    tensors = {name: (t, tuple(reversed(dims)), data_start + off) for name, t, dims, off in infos}
    return meta, tensors, len(buf) - data_start, buf


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values."""
    meta, _, _, buf = _parse(Path(path))
    buf.close()
    return meta


class GGUFTensors:
    """Name-indexed access to a GGUF file's tensors, dequantized to float32 (F16/F32 kept as they are)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata, self._tensors, _, self._buf = _parse(self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a row-major numpy array (quantized types dequantized to float32)."""
        import gguf

        if name not in self._tensors:
            raise GGUFError(f"tensor {name!r} not found in {self.path}")
        ttype, shape, offset = self._tensors[name]
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * type_size
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            if offset + rows * row_bytes > len(self._buf):
                raise GGUFError(f"truncated GGUF file {self.path}: tensor {name!r} runs past the end")
            raw = np.frombuffer(self._buf, dtype=np.uint8, count=rows * row_bytes, offset=offset)
            raw = raw.reshape(rows, row_bytes)
            if qtype == gguf.GGMLQuantizationType.F32:
                arr = raw.view(np.float32)
            elif qtype == gguf.GGMLQuantizationType.F16:
                arr = raw.view(np.float16)
            else:
                arr = gguf.quants.dequantize(raw, qtype)
            return arr.reshape(shape)
        except GGUFError:
            raise
        except Exception as e:
            raise GGUFError(f"cannot decode tensor {name!r} (ggml type {ttype}) in {self.path}: {e}") from e


def unpermute_rope_rows(
    w: np.ndarray,  # [n_heads * head_dim, ...] rows in llama.cpp's interleaved RoPE order
    n_heads: int,
) -> np.ndarray:  # [n_heads * head_dim, ...] rows in Hugging Face's rotate-half order
    """Invert llama.cpp's ``permute`` of Q/K projection rows (pairs (2i, 2i+1) -> (i, i + head_dim/2))."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    if n_heads * head_dim != rows or head_dim % 2:
        raise GGUFError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
