"""Paged attention in plain XLA for CPUs (the ``"xla"`` backend): cost follows the real context, not the
block-table width.

The references (``reference.py``) gather every block-table column of every sequence, so a decode step costs
O(batch x width) and ragged prefill O(tokens x seqs x width) however short the contexts are; an engine that
keeps its tables at a fixed width (max_model_len / page_size columns, padded) would pay for the full width on
every step. These versions loop over **chunks of page columns** with an online (running max / sum) softmax
and a *dynamic* trip count, ``ceil(max context / chunk tokens)``, so the work stops at the longest real
context. Columns past a sequence's context are never attended (they may hold garbage page ids, even -1:
ids are clamped before the gather and the slots masked; V is zeroed there, so NaN pages cannot leak).

* ``paged_decode_attention_xla``: one query per sequence; chunk ``i`` gathers columns
  ``[i*C, (i+1)*C)`` of every row (``C = pages_per_chunk``).
* ``ragged_paged_attention_xla``: two parts merged by log-sum-exp.
  (1) the new tokens among themselves: a dense ``[T, T]`` block-diagonal causal score matrix over the packed
  tokens (their K/V are read back from their slots: ``write_kv`` runs first);
  (2) each sequence's *prior* context (``seq_len - q_len`` tokens, cached before this step): the packed
  tokens are cut into work items of ``query_block`` consecutive tokens of one sequence, and each item loops
  over page chunks of its own sequence up to the longest prior context among items (trip count 0 for a
  plain prefill). Sequences with no prior context get no work item.
  A sequence with one new token after cached context (a decode riding in a step with prefill work) is left
  out of both loops' work items and attends by decode attention instead, over its whole context (its own
  K/V is in the pages already): every trip of the item loop computes all of its fixed number of items, so
  one decode item, 1 live row of ``query_block``, used to cost a full trip per 128 keys of its context
  (about 1 ms per layer per trip for a 32-token step of a 768-wide model on one core, against ~0.2 ms for
  the whole prompt-only step). ``native_decode`` runs that decode attention in jserve's native CPU kernel
  (the ``cpu`` backend); otherwise it is ``paged_decode_attention_xla``.

Scores, softmax and sums are float32 (full-precision dots); outputs take ``q``'s dtype. Padded rows and
padding tokens produce zeros. Arguments are validated by ``kernels_pallas.api`` before these run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["paged_decode_attention_xla", "paged_decode_attention_native", "ragged_paged_attention_xla",
           "default_pages_per_chunk"]

_EXACT = lax.Precision.HIGHEST
_NEG = -1e30  # finite "minus infinity": exp(m_old - m_new) stays finite while nothing has been attended
CHUNK_TOKENS = 128  # default KV tokens per loop iteration (measured on a 2-core CPU: 64..256 are within 5%)
QUERY_BLOCK = 16  # default packed tokens per prior-context work item


def default_pages_per_chunk(page_size: int) -> int:
    return max(1, CHUNK_TOKENS // page_size)


def _pad_columns(
    block_tables: jax.Array,  # [rows, width] int32
    multiple: int,
) -> jax.Array:  # [rows, ceil(width / multiple) * multiple] int32
    width = block_tables.shape[1]
    padded = -(-width // multiple) * multiple
    return block_tables if padded == width else jnp.pad(block_tables, ((0, 0), (0, padded - width)))


def _gather_chunk(
    pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    tables: jax.Array,  # [rows, padded_width] int32
    chunk: jax.Array,  # scalar int32, chunk index
    pages_per_chunk: int,
) -> jax.Array:  # [rows, num_kv_heads, pages_per_chunk * page_size, head_dim] float32
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    rows = tables.shape[0]
    cols = lax.dynamic_slice_in_dim(tables, chunk * pages_per_chunk, pages_per_chunk, axis=1)  # [rows, C]
    cols = jnp.clip(cols, 0, num_pages - 1)  # garbage ids (e.g. -1) in unused columns: masked below
    g = pages[:, cols]  # [num_kv_heads, rows, C, page_size, head_dim]
    g = g.reshape(num_kv_heads, rows, pages_per_chunk * page_size, head_dim)
    return jnp.swapaxes(g, 0, 1).astype(jnp.float32)


def _online_update(
    carry: tuple[jax.Array, jax.Array, jax.Array],  # m [..., n], l [..., n], acc [..., n, head_dim]
    scores: jax.Array,  # [..., n, keys] float32
    mask: jax.Array,  # broadcastable to scores: keys this query may attend
    v: jax.Array,  # [..., keys, head_dim] float32, zero where masked
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash-attention step: fold a block of keys into the running max ``m``, sum ``l`` and ``acc``."""
    m, l, acc = carry
    scores = jnp.where(mask, scores, _NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum("...nk,...kd->...nd", p, v, precision=_EXACT)
    return m_new, l, acc


def _empty_state(shape: tuple[int, ...], head_dim: int):
    return (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_chunk"))
def paged_decode_attention_xla(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32, context length (0 = padded row -> zeros)
    *,
    scale: float,
    pages_per_chunk: int | None = None,
) -> jax.Array:  # [batch, num_q_heads, head_dim]
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    chunk = min(pages_per_chunk or default_pages_per_chunk(page_size), block_tables.shape[1])
    tables = _pad_columns(block_tables, chunk)
    keys = chunk * page_size
    lengths = jnp.clip(lengths, 0, block_tables.shape[1] * page_size)
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim) * scale

    def body(i, carry):
        k = _gather_chunk(k_pages, tables, i, chunk)  # [batch, kvh, keys, d]
        v = _gather_chunk(v_pages, tables, i, chunk)
        live = i * keys + jnp.arange(keys)[None, :] < lengths[:, None]  # [batch, keys]
        v = jnp.where(live[:, None, :, None], v, 0.0)
        scores = jnp.einsum("bhgd,bhkd->bhgk", qg, k, precision=_EXACT)
        return _online_update(carry, scores, live[:, None, None, :], v)

    trips = (jnp.max(lengths, initial=0) + keys - 1) // keys
    _, l, acc = lax.fori_loop(0, trips, body, _empty_state((batch, num_kv_heads, group), head_dim))
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def paged_decode_attention_native(q, k_pages, v_pages, block_tables, lengths, *, scale: float,
                                  pages_per_chunk: int | None = None) -> jax.Array:
    """``paged_decode_attention_xla``'s contract in jserve's native CPU kernel (``kernels_cpu``), with the XLA
    loop as the fallback where the kernel does not apply (not a CPU, not float32 pages, an odd head size)."""
    import kernels_cpu

    fallback = functools.partial(paged_decode_attention_xla, scale=scale, pages_per_chunk=pages_per_chunk)
    return kernels_cpu.paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, scale=scale,
                                              fallback=fallback)


def _token_layout(seq_lens, query_start_loc, num_tokens):
    """Per packed token: its sequence, whether it is real, its position; per sequence: query and prior
    context lengths."""
    num_seqs = seq_lens.shape[0]
    t = jnp.arange(num_tokens)
    seq_of_t = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1)  # [T]
    valid_t = t < query_start_loc[-1]
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    prior = jnp.maximum(seq_lens - q_len, 0)  # [S] context cached before this step
    pos_t = prior[seq_of_t] + t - query_start_loc[seq_of_t]  # [T]
    return seq_of_t, valid_t, pos_t, q_len, prior


def _self_part(qg, k_pages, v_pages, block_tables, seq_of_t, valid_t, pos_t):
    """Unnormalised attention of the packed new tokens to each other (block-diagonal causal)."""
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    _, num_pages, page_size, _ = k_pages.shape
    col = jnp.clip(pos_t // page_size, 0, block_tables.shape[1] - 1)
    page = jnp.clip(block_tables[seq_of_t, col], 0, num_pages - 1)  # [T]
    off = pos_t % page_size
    k = jnp.swapaxes(k_pages[:, page, off], 0, 1).astype(jnp.float32)  # [T, kvh, d]
    v = jnp.swapaxes(v_pages[:, page, off], 0, 1).astype(jnp.float32)
    v = jnp.where(valid_t[:, None, None], v, 0.0)  # padding tokens' slots were never written
    mask = (seq_of_t[:, None] == seq_of_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])
    mask = mask & valid_t[:, None] & valid_t[None, :]  # [T (query), T (key)]
    scores = jnp.einsum("thgd,uhd->hgtu", qg, k, precision=_EXACT)  # [kvh, g, T, T]
    state = _empty_state((num_kv_heads, group, num_tokens), head_dim)
    m, l, acc = _online_update(state, scores, mask, jnp.swapaxes(v, 0, 1)[:, None])  # v: [kvh, 1, T, d]
    # -> [T, kvh, g(, d)]
    return jnp.moveaxis(m, 2, 0), jnp.moveaxis(l, 2, 0), jnp.moveaxis(acc, 2, 0)


def _context_part(qg, k_pages, v_pages, block_tables, query_start_loc, q_len, prior, chunk, query_block):
    """Unnormalised attention of each packed token to its sequence's prior (cached) context, by work items
    of ``query_block`` tokens of one sequence looping over page chunks of that sequence."""
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    page_size = k_pages.shape[2]
    num_seqs = q_len.shape[0]
    num_items = -(-num_tokens // query_block) + num_seqs  # >= sum_s ceil(q_len_s / query_block)
    blocks = jnp.where(prior > 0, (q_len + query_block - 1) // query_block, 0)  # [S] items per sequence
    ends = jnp.cumsum(blocks)
    first = ends - blocks  # [S] first item of each sequence
    w = jnp.arange(num_items)
    item_seq = jnp.clip(jnp.searchsorted(ends, w, side="right"), 0, num_seqs - 1)  # [W]
    item_live = w < ends[-1]
    item_start = query_start_loc[item_seq] + (w - first[item_seq]) * query_block  # [W] first packed token
    item_prior = jnp.where(item_live, prior[item_seq], 0)
    rows = jnp.clip(item_start[:, None] + jnp.arange(query_block)[None, :], 0, num_tokens - 1)  # [W, Bq]
    qi = jnp.moveaxis(qg[rows], 1, 3)  # [W, kvh, g, Bq, d]
    tables = _pad_columns(block_tables, chunk)[item_seq]  # [W, padded_width]
    keys = chunk * page_size

    def body(i, carry):
        k = _gather_chunk(k_pages, tables, i, chunk)  # [W, kvh, keys, d]
        v = _gather_chunk(v_pages, tables, i, chunk)
        live = i * keys + jnp.arange(keys)[None, :] < item_prior[:, None]  # [W, keys]
        v = jnp.where(live[:, None, :, None], v, 0.0)[:, :, None]  # [W, kvh, 1, keys, d]
        scores = jnp.einsum("whgrd,whkd->whgrk", qi, k, precision=_EXACT)
        return _online_update(carry, scores, live[:, None, None, None, :], v)

    trips = (jnp.max(item_prior, initial=0) + keys - 1) // keys
    init = _empty_state((num_items, num_kv_heads, group, query_block), head_dim)
    m, l, acc = lax.fori_loop(0, trips, body, init)
    # Back to packed tokens: token t of sequence s is row (t - start_s) % Bq of item first_s + (t - start_s) // Bq.
    t = jnp.arange(num_tokens)
    seq_of_t = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1)
    rel = t - query_start_loc[seq_of_t]
    item_t = jnp.clip(first[seq_of_t] + rel // query_block, 0, num_items - 1)
    row_t = rel % query_block
    has = (blocks[seq_of_t] > 0) & (t < query_start_loc[-1])  # [T]
    m_t = jnp.where(has[:, None, None], m[item_t, :, :, row_t], _NEG)  # [T, kvh, g]
    l_t = jnp.where(has[:, None, None], l[item_t, :, :, row_t], 0.0)
    acc_t = jnp.where(has[:, None, None, None], acc[item_t, :, :, row_t], 0.0)  # [T, kvh, g, d]
    return m_t, l_t, acc_t


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_chunk", "query_block", "native_decode"))
def ragged_paged_attention_xla(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array,  # [num_seqs] int32, context length including the new tokens
    query_start_loc: jax.Array,  # [num_seqs + 1] int32, cumulative query offsets
    *,
    scale: float,
    pages_per_chunk: int | None = None,
    query_block: int = QUERY_BLOCK,
    native_decode: bool = False,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    chunk = min(pages_per_chunk or default_pages_per_chunk(page_size), block_tables.shape[1])
    query_block = max(1, min(query_block, num_tokens))
    seq_lens = jnp.clip(seq_lens, 0, block_tables.shape[1] * page_size)
    seq_of_t, valid_t, pos_t, q_len, prior = _token_layout(seq_lens, query_start_loc, num_tokens)
    single = (q_len == 1) & (prior > 0)  # [S] one new token after cached context: decode attention below
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * scale
    m_s, l_s, acc_s = _self_part(qg, k_pages, v_pages, block_tables, seq_of_t, valid_t, pos_t)
    m_c, l_c, acc_c = _context_part(qg, k_pages, v_pages, block_tables, query_start_loc, q_len,
                                    jnp.where(single, 0, prior), chunk, query_block)
    m = jnp.maximum(m_s, m_c)
    a_s, a_c = jnp.exp(m_s - m), jnp.exp(m_c - m)
    l = l_s * a_s + l_c * a_c
    acc = acc_s * a_s[..., None] + acc_c * a_c[..., None]
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    out = out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
    # the single-token sequences: their token's attention over the whole context, one query row each
    q_single = q[jnp.clip(query_start_loc[:-1], 0, num_tokens - 1)]  # [S, num_q_heads, head_dim]
    lengths = jnp.where(single, seq_lens, 0)  # 0: a row the decode kernel leaves as zeros
    decode = paged_decode_attention_native if native_decode else paged_decode_attention_xla
    out_single = decode(q_single, k_pages, v_pages, block_tables, lengths, scale=scale, pages_per_chunk=pages_per_chunk)
    return jnp.where((single[seq_of_t] & valid_t)[:, None, None], out_single[seq_of_t], out)
