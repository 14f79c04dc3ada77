"""A converted-weights cache in tensorstore (zarr), so the second load of a model skips conversion.

Layout: ``<cache_dir>/<key>/<param path>/`` holds one uncompressed zarr array per parameter, already in the
model's layout and dtype (dequantized, transposed, un-permuted); ``<cache_dir>/<key>/params.json`` lists
them and is written last, so a partly written entry is never read. The key hashes the source files (path,
size, mtime), the target dtype and the cache format version. ``cache_dir`` defaults to
``$JSERVE_CACHE_DIR`` or ``~/.cache/jserve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np
import tensorstore as ts

__all__ = ["default_cache_dir", "cache_key", "WeightCache"]

_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("JSERVE_CACHE_DIR") or Path.home() / ".cache" / "jserve")


def cache_key(files: Iterable[Path], dtype: str, extra: str = "") -> str:
    h = hashlib.sha256(f"v{_FORMAT_VERSION}|{dtype}|{extra}".encode())
    for f in sorted(Path(p).resolve() for p in files):
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _spec(path: Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


class WeightCache:
    """One cache entry (a model converted to one dtype)."""

    def __init__(self, cache_dir: Path, key: str):
        self.dir = Path(cache_dir) / key
        self.index = self.dir / "params.json"

    def exists(self) -> bool:
        return self.index.is_file()

    def read(self) -> dict[str, np.ndarray]:
        """All parameters as host arrays (reads issued concurrently). A damaged entry (index, metadata, a
        missing or short chunk) raises; the loader then converts again and rewrites it."""
        params = json.loads(self.index.read_text())
        # a missing chunk file is an error, not the fill value (zeros would load as weights)
        stores = {p: ts.open(_spec(self.dir / p) | {"fill_missing_data_reads": False}, open=True) for p in params}
        opened = {p: f.result() for p, f in stores.items()}
        reads = {p: s.read() for p, s in opened.items()}
        out = {}
        for p, f in reads.items():
            arr = np.asarray(f.result())
            if list(arr.shape) != params[p]["shape"]:
                raise ValueError(f"weight cache {self.dir} is corrupt: {p} has shape {list(arr.shape)}")
            out[p] = arr
        return out

    def write(self, arrays: dict[str, np.ndarray], dtype: str) -> None:
        """Write every parameter (cast to ``dtype``), then the index."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        want = _np_dtype(dtype)
        pending = []
        meta = {}
        for p, arr in arrays.items():
            arr = np.ascontiguousarray(arr.astype(want, copy=False))
            # one uncompressed chunk per parameter: reads are a single sequential file read each
            spec = {**_spec(self.dir / p), "metadata": {"compressor": None, "chunks": list(arr.shape) or [1]}}
            store = ts.open(spec, create=True, dtype=ts.dtype(dtype), shape=arr.shape).result()
            pending.append(store.write(arr))
            meta[p] = {"shape": list(arr.shape), "dtype": dtype}
        for f in pending:
            f.result()
        tmp = self.index.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.index)
