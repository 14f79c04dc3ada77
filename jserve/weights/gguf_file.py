"""GGUF files: metadata fields and dequantized tensors (numpy), for weights, configs and tokenizers.

Uses the ``gguf`` package's reader (memory-mapped) and ``gguf.quants.dequantize`` for quantized tensors
(Q4_1, Q8_0, ...). Tensors come back in numpy order (GGUF lists dimensions fastest-first, so a linear
weight reads as ``[out_features, in_features]``, the Hugging Face layout). llama.cpp's converter permutes
the rows of ``attn_q``/``attn_k`` from Hugging Face's rotate-half RoPE layout to interleaved pairs;
:func:`unpermute_rope_rows` undoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["GGUFError", "read_gguf_metadata", "GGUFTensors", "unpermute_rope_rows"]


class GGUFError(ValueError):
    """A GGUF file is missing, unreadable or lacks a needed field (the message names it)."""


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/struct errors on bad files
        raise GGUFError(f"cannot read GGUF file {path}: {e}") from e


def _field_value(field: Any) -> Any:
    """Decode one ReaderField into a Python scalar, string or list."""
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None

    def as_str(part: np.ndarray) -> str:
        return bytes(part).decode("utf-8", errors="replace")

    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.STRING:
            return [as_str(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if types[0] == GGUFValueType.STRING:
        return as_str(field.parts[-1])
    return field.parts[-1].tolist()[0]


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values."""
    reader = _open(Path(path))
    return {name: _field_value(f) for name, f in reader.fields.items()}


class GGUFTensors:
    """Lazy, name-indexed access to a GGUF file's tensors, dequantized to float32 (or kept as F16/F32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open(self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata = {name: _field_value(f) for name, f in self._reader.fields.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array in row-major order (quantized types dequantized to f32)."""
        import gguf

        if name not in self._tensors:
            raise GGUFError(f"tensor {name!r} not found in {self.path}")
        t = self._tensors[name]
        shape = self.shape(name)
        try:
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                arr = np.asarray(t.data)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            return arr.reshape(shape)
        except Exception as e:
            raise GGUFError(f"cannot decode tensor {name!r} ({t.tensor_type.name}) in {self.path}: {e}") from e


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
