"""Keys of a prompt's full KV pages for prefix caching (``schedulers.Request.prefix_hashes``).

Page ``i``'s key stands for the prompt's tokens ``[0, (i + 1) * page_size)``: a BLAKE2b digest of the
previous page's key and this page's token ids, so two prompts share the keys of exactly their common full
pages, and equal keys mean equal keys and values in those pages (one model per engine). A 16-byte digest
makes an accidental match of different prefixes as unlikely as a hardware fault; Python's ``hash`` of the
ids would not be (64 bits, and built to be fast, not to avoid collisions).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["prefix_page_keys"]


def prefix_page_keys(ids: Sequence[int], page_size: int) -> tuple[bytes, ...]:
    """One key per full page of ``ids`` (a partial last page has none)."""
    full = len(ids) // page_size
    if full == 0:
        return ()
    data = np.asarray(ids[: full * page_size], dtype=np.int64).tobytes()
    step = page_size * 8
    keys, key = [], b""
    for i in range(full):
        key = hashlib.blake2b(key + data[i * step:(i + 1) * step], digest_size=16).digest()
        keys.append(key)
    return tuple(keys)
