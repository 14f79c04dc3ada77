"""A minimal paged-KV helper: a free-page allocator and the builder of one step's packed inputs and
``AttentionMetadata`` from per-sequence (new tokens, start position, pages).

This is what ``greedy_generate`` and the tests use; the engine's KV manager (host offload, swap buckets) is
separate and reuses :func:`build_step` to pack a scheduled iteration into fixed shape buckets.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from kernels_pallas import AttentionMetadata

__all__ = ["PageAllocator", "SeqChunk", "StepInputs", "build_step", "pages_needed", "bucket"]


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= max(n, minimum): bounds the number of compiled shapes."""
    b = minimum
    while b < n:
        b *= 2
    return b


class PageAllocator:
    """Hands out physical page ids from a fixed pool."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache out of pages: need {n}, {len(self._free)} free of {self.num_pages}")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(list(pages)))


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: ``tokens`` computed at positions ``start .. start+len-1``."""

    tokens: Sequence[int]
    start: int  # tokens already in the cache
    pages: Sequence[int]  # physical pages, logical order; must cover start + len(tokens)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    input_ids: jnp.ndarray  # [T] int32
    positions: jnp.ndarray  # [T] int32
    metadata: AttentionMetadata


def build_step(
    chunks: Sequence[SeqChunk],
    page_size: int,
    *,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    pages_per_seq: int | None = None,
) -> StepInputs:
    """Pack ``chunks`` into padded arrays of ``num_tokens`` tokens, ``num_seqs`` sequence slots and
    ``pages_per_seq`` block-table columns (defaults: the exact sizes). ``decode_only`` is set when every
    sequence computes one token and the token and sequence counts match."""
    if not chunks:
        raise ValueError("build_step needs at least one sequence")
    real_t = sum(len(c.tokens) for c in chunks)
    t = num_tokens if num_tokens is not None else real_t
    s = num_seqs if num_seqs is not None else len(chunks)
    m = pages_per_seq if pages_per_seq is not None else max(len(c.pages) for c in chunks)
    if t < real_t or s < len(chunks):
        raise ValueError(f"bucket too small: {real_t} tokens / {len(chunks)} seqs into T={t}, S={s}")
    ids = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    slots = np.full(t, -1, np.int32)
    tables = np.zeros((s, m), np.int32)
    seq_lens = np.zeros(s, np.int32)
    qsl = np.zeros(s + 1, np.int32)
    logits_idx = np.zeros(s, np.int32)
    off = 0
    for i, c in enumerate(chunks):
        n = len(c.tokens)
        if n == 0:
            raise ValueError(f"sequence {i} has no tokens to compute")
        end = c.start + n
        if pages_needed(end, page_size) > len(c.pages) or len(c.pages) > m:
            raise ValueError(f"sequence {i}: {len(c.pages)} pages cannot hold {end} tokens (max {m} pages)")
        p = np.arange(c.start, end)
        ids[off : off + n] = np.asarray(c.tokens, np.int32)
        pos[off : off + n] = p
        pages = np.asarray(c.pages, np.int32)
        slots[off : off + n] = pages[p // page_size] * page_size + p % page_size
        tables[i, : len(pages)] = pages
        seq_lens[i] = end
        off += n
        qsl[i + 1] = off
        logits_idx[i] = off - 1
    qsl[len(chunks) + 1 :] = off
    decode_only = t == s and all(len(c.tokens) == 1 for c in chunks)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens),
        query_start_loc=jnp.asarray(qsl),
        logits_indices=jnp.asarray(logits_idx),
        decode_only=decode_only,
    )
    return StepInputs(jnp.asarray(ids), jnp.asarray(pos), md)
