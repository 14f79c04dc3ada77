"""Keys of a sequence's full KV pages for prefix caching (``schedulers.Request.prefix_hashes``).

Page ``i``'s key stands for the tokens ``[0, (i + 1) * page_size)``: a BLAKE2b digest of the previous page's
key and this page's token ids, so two sequences share the keys of exactly their common full pages, and
equal keys mean equal keys and values in those pages (one model per engine). The engine keys a prompt's
pages at submission (``prefix_page_keys``) and each page of generated tokens as its last token is sampled
(``next_page_key``), so a later prompt that repeats a conversation, its replies included, finds them. A
16-byte digest makes an accidental match of different prefixes as unlikely as a hardware fault; Python's
``hash`` of the ids would not be (64 bits, and built to be fast, not to avoid collisions).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["next_page_key", "prefix_page_keys"]


def next_page_key(previous: bytes, page_ids: Sequence[int]) -> bytes:
    """The key of the page holding ``page_ids``, after the page whose key is ``previous`` (``b""`` for the
    first page)."""
    return hashlib.blake2b(previous + np.asarray(page_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def prefix_page_keys(ids: Sequence[int], page_size: int) -> tuple[bytes, ...]:
    """One key per full page of ``ids`` (a partial last page has none)."""
    keys, key = [], b""
    for start in range(0, len(ids) - page_size + 1, page_size):
        key = next_page_key(key, ids[start:start + page_size])
        keys.append(key)
    return tuple(keys)
