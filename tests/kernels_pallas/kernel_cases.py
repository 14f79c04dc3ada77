"""Random paged-KV cases for the kernel tests, plus the numpy ground truth they are checked against.

Every case is fresh random data (never zeros). Each sequence gets distinct random physical pages; block
table columns it does not need hold garbage (-1 or a random page id). Every cache slot outside all
sequences' contexts is poisoned with NaN, so a kernel that reads past a context (or lets ``0 * NaN`` into
its sum) fails loudly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# Relative error (max |out - ref| / max |ref|) allowed against a float32 reference computed from the same
# (rounded) inputs. float32 kernels only reorder sums; bfloat16 kernels round the softmax weights to
# bfloat16 before ``p @ v`` and round the output (each ~2^-9 relative). Measured in interpret mode:
# float32 <= 5e-7, bfloat16 <= 3.4e-3.
TOLERANCE = {jnp.float32: 5e-6, jnp.bfloat16: 1e-2}


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


@dataclasses.dataclass
class Paged:
    """A paged cache (float32 numpy, rounded to ``dtype``'s precision) and the tables that address it."""

    k_pages: np.ndarray  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: np.ndarray  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: np.ndarray  # [S, pages_per_seq] int32
    context: np.ndarray  # [S] int32, tokens of each sequence that live in the pages
    dtype: object

    def jax_pages(self, dtype=None):
        dt = dtype or self.dtype
        return jnp.asarray(self.k_pages, dt), jnp.asarray(self.v_pages, dt)


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float32 numpy (so numpy truth sees the kernel's inputs)."""
    return np.array(jnp.asarray(jnp.asarray(x, dtype), jnp.float32))


def make_paged(
    rng: np.random.Generator,
    context: np.ndarray,  # [S] tokens per sequence in the cache
    *,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    dtype,
    spare_pages: int = 3,
    poison: bool = True,
) -> Paged:
    context = np.asarray(context, np.int32)
    num_seqs = context.shape[0]
    num_pages = num_seqs * pages_per_seq + spare_pages
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = rounded(rng.standard_normal(shape), dtype)
    v = rounded(rng.standard_normal(shape), dtype)
    perm = rng.permutation(num_pages)
    bt = np.empty((num_seqs, pages_per_seq), np.int32)
    live = np.zeros((num_pages, page_size), bool)
    for s in range(num_seqs):
        own = perm[s * pages_per_seq : (s + 1) * pages_per_seq]
        need = -(-int(context[s]) // page_size)
        garbage = -1 if s % 2 else int(rng.integers(num_pages))
        bt[s] = np.where(np.arange(pages_per_seq) < need, own, garbage)
        for pos in range(int(context[s])):
            live[bt[s, pos // page_size], pos % page_size] = True
    if poison:
        k[:, ~live] = np.nan
        v[:, ~live] = np.nan
    return Paged(k, v, bt, context, dtype)


def context_kv(paged: Paged, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ``s``'s cached K and V in logical order: ``[num_kv_heads, context[s], head_dim]`` each."""
    n = int(paged.context[s])
    pos = np.arange(n)
    pages = paged.block_tables[s, pos // paged.k_pages.shape[2]]
    off = pos % paged.k_pages.shape[2]
    return paged.k_pages[:, pages, off], paged.v_pages[:, pages, off]


def dense_attention(
    q: np.ndarray,  # [n_q, num_q_heads, head_dim], queries at positions ctx - n_q .. ctx - 1
    k: np.ndarray,  # [num_kv_heads, ctx, head_dim]
    v: np.ndarray,  # [num_kv_heads, ctx, head_dim]
    scale: float,
) -> np.ndarray:  # [n_q, num_q_heads, head_dim] float64
    """Plain causal attention in float64 with an explicit loop over query heads (independent of paging)."""
    n_q, num_q_heads, _ = q.shape
    num_kv_heads, ctx, _ = k.shape
    group = num_q_heads // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for h in range(num_q_heads):
        kh, vh = k[h // group].astype(np.float64), v[h // group].astype(np.float64)
        for i in range(n_q):
            pos = ctx - n_q + i
            s = kh[: pos + 1] @ q[i, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vh[: pos + 1]
    return out


def decode_lengths(rng: np.random.Generator, batch: int, page_size: int, capacity: int) -> np.ndarray:
    """A mix with a length of 1, exact page boundaries, full capacity, a padded row (0) and ragged ones."""
    fixed = [1, page_size, 2 * page_size, capacity, 0]
    extra = list(rng.integers(2, capacity, size=max(0, batch - len(fixed))))
    return rng.permutation(np.array((fixed + extra)[:batch], np.int32))


@dataclasses.dataclass
class RaggedLayout:
    seq_lens: np.ndarray  # [S] int32
    q_lens: np.ndarray  # [S] int32
    query_start_loc: np.ndarray  # [S + 1] int32
    num_tokens: int  # T >= query_start_loc[-1]; the rest are padding tokens


def ragged_layout(rng: np.random.Generator, num_tokens: int, page_size: int, capacity: int) -> RaggedLayout:
    """Five slots in random order: a plain prefill, a chunked prefill on cached context, a decode at a page
    boundary, a ragged decode and an empty (padded) slot; tokens past the last sequence are padding."""
    prefill = int(rng.integers(page_size - 2, page_size + 6)) if rng.random() < 0.5 else page_size
    cached = int(rng.integers(1, capacity - 8))
    chunk = int(rng.integers(2, min(capacity - cached, 12) + 1))
    kinds = [
        (prefill, prefill),  # (seq_len, q_len)
        (cached + chunk, chunk),
        (page_size, 1),
        (int(rng.integers(2, capacity + 1)), 1),
        (0, 0),
    ]
    order = rng.permutation(len(kinds))
    seq_lens = np.array([kinds[i][0] for i in order], np.int32)
    q_lens = np.array([kinds[i][1] for i in order], np.int32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert qsl[-1] < num_tokens, "the layout must leave padding tokens"
    return RaggedLayout(seq_lens, q_lens, qsl, num_tokens)
