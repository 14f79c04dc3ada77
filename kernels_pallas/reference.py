"""Pure-jnp references for every kernel in this package: the ground truth the Pallas kernels are tested
against, and the ``reference`` backend (plain XLA, written for clarity; on a CPU the ``cpu`` backend is the
fast path).

Layouts: K/V pages are ``[num_kv_heads, num_pages, page_size, head_dim]``; query head ``h`` reads KV head
``h // (num_q_heads // num_kv_heads)`` (grouped-query attention). Scores and softmax are computed in
float32; outputs take the query's dtype. Slots outside a sequence's context never influence its output,
whatever they hold (their V is zeroed before the weighted sum, so even NaN garbage cannot leak as 0 * NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The references are ground truth: full float32 matmuls, also on GPUs whose default float32 matmul is TF32.
_EXACT = lax.Precision.HIGHEST


def write_kv_reference(
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [num_tokens] int32; -1 drops the token
) -> tuple[jax.Array, jax.Array]:
    """Scatter each token's K/V into ``slot = page * page_size + offset``; slot -1 writes nothing.

    The scatter indexes the 4-D pages directly (page, offset): a reshape to flat slots makes XLA turn a
    one-token write into a dynamic-update-slice that copies the whole cache on a CPU."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    # Out-of-range page + mode="drop" discards padding tokens (negative indices would wrap around).
    page = jnp.where(slot_mapping < 0, num_pages, slot_mapping // page_size)
    offset = jnp.where(slot_mapping < 0, 0, slot_mapping % page_size)
    k_pages = k_pages.at[:, page, offset, :].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[:, page, offset, :].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def _gather_context(
    pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
) -> jax.Array:  # [num_seqs, num_kv_heads, pages_per_seq * page_size, head_dim]
    num_kv_heads, _, page_size, head_dim = pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    g = pages[:, block_tables]  # [num_kv_heads, num_seqs, pages_per_seq, page_size, head_dim]
    g = g.reshape(num_kv_heads, num_seqs, pages_per_seq * page_size, head_dim)
    return jnp.swapaxes(g, 0, 1)


def _masked_softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis with fully masked rows giving all-zero weights (not NaN)."""
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0.0, 1.0, denom)


def paged_decode_attention_reference(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32, context length (0 = padded row -> zeros)
    *,
    scale: float,
) -> jax.Array:  # [batch, num_q_heads, head_dim]
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_q_heads // num_kv_heads
    k = _gather_context(k_pages, block_tables).astype(jnp.float32)  # [batch, kvh, L, d]
    v = _gather_context(v_pages, block_tables).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bhgd,bhld->bhgl", qg, k, precision=_EXACT) * scale
    mask = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [batch, L]
    w = _masked_softmax_weights(scores, mask[:, None, None, :])
    v = jnp.where(mask[:, None, :, None], v, 0.0)  # slots past the context may hold garbage (even NaN)
    out = jnp.einsum("bhgl,bhld->bhgd", w, v, precision=_EXACT)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def ragged_paged_attention_reference(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array,  # [num_seqs] int32, context length including the new tokens
    query_start_loc: jax.Array,  # [num_seqs + 1] int32
    *,
    scale: float,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    k = _gather_context(k_pages, block_tables).astype(jnp.float32)  # [S, kvh, L, d]
    v = _gather_context(v_pages, block_tables).astype(jnp.float32)
    ctx = k.shape[2]
    t = jnp.arange(num_tokens)
    # Sequence of each packed token; tokens past the last sequence are padding.
    seq_of_t = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1)
    valid_t = t < query_start_loc[-1]
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    pos_t = seq_lens[seq_of_t] - q_len[seq_of_t] + (t - query_start_loc[seq_of_t])  # [T]
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    # Scores of every token against every sequence's context, masked to its own sequence's causal prefix.
    scores = jnp.einsum("thgd,shld->thgsl", qg, k, precision=_EXACT) * scale  # [T, kvh, g, S, L]
    own = seq_of_t[:, None] == jnp.arange(num_seqs)[None, :]  # [T, S]
    causal = jnp.arange(ctx)[None, :] <= pos_t[:, None]  # [T, L]
    mask = own[:, :, None] & causal[:, None, :] & valid_t[:, None, None]  # [T, S, L]
    mask = mask[:, None, None, :, :]
    w = _masked_softmax_weights(scores.reshape(*scores.shape[:3], -1), mask.reshape(*mask.shape[:3], -1))
    w = w.reshape(scores.shape)
    in_ctx = jnp.arange(ctx)[None, :] < seq_lens[:, None]  # [S, L]
    v = jnp.where(in_ctx[:, None, :, None], v, 0.0)  # slots past the context may hold garbage (even NaN)
    out = jnp.einsum("thgsl,shld->thgd", w, v, precision=_EXACT)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
