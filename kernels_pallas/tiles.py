"""In-kernel building blocks shared by the decode and ragged attention kernels: loading a block of KV pages
through a block-table slice, and one step of the online (flash) softmax.

Everything here runs inside a Pallas kernel body and is written for the Triton lowering: every tile has a
power-of-two size, dots have all dimensions >= 16, and there is no data-dependent Python control flow.

Numerics: scores live in the log2 domain (``scale * log2(e)`` is folded into one multiplier so the kernel
uses ``exp2``). Masked scores take the finite ``MASK_VALUE`` (never ``-inf``, so ``m_prev - m_next`` never
produces NaN) and masked probabilities are forced to exactly 0. KV slots past the valid context read as 0,
so garbage there (even NaN in never-written pages) cannot leak into ``p @ v``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Finite stand-in for -inf (same choice as JAX's own GPU paged kernel).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_precision(dtype) -> lax.Precision | None:
    """float32 inputs get exact (IEEE) dots; 16-bit inputs use the tensor-core default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def load_kv_block(
    pages_ref,  # ref [num_pages, page_size, head_dim]: one KV head's pages
    page_ids: jax.Array,  # [pages_per_block] int32, physical pages of this block (valid indices)
    first_pos: jax.Array,  # scalar int32, context position of the block's first slot
    limit: jax.Array,  # scalar int32, slots at positions >= limit are not part of the context
    *,
    masked_loads: bool,
) -> jax.Array:  # [pages_per_block * page_size, head_dim], zeros past ``limit``
    """Gather ``page_ids`` from one head's pages; slots at or past ``limit`` come back as zeros.

    ``masked_loads=True`` issues a masked gather (no memory traffic for slots past the context);
    ``False`` follows JAX's shipped GPU paged kernel (``pages_ref[page_ids]``) and zeroes afterwards.
    """
    _, page_size, head_dim = pages_ref.shape
    pages_per_block = page_ids.shape[0]
    shape = (pages_per_block, page_size, head_dim)
    slot = lax.broadcasted_iota(jnp.int32, shape, 1)
    pos = first_pos + lax.broadcasted_iota(jnp.int32, shape, 0) * page_size + slot
    valid = pos < limit
    if masked_loads:
        page = lax.broadcast_in_dim(page_ids, shape, (0,))
        lane = lax.broadcasted_iota(jnp.int32, shape, 2)
        x = plgpu.load(pages_ref.at[page, slot, lane], mask=valid, other=0.0)
    else:
        x = jnp.where(valid, pages_ref[page_ids], 0.0).astype(pages_ref.dtype)
    return x.reshape(pages_per_block * page_size, head_dim)


def softmax_step(
    q: jax.Array,  # [rows, head_dim]
    k: jax.Array,  # [block_k, head_dim]
    v: jax.Array,  # [block_k, head_dim]
    valid: jax.Array,  # [rows, block_k] bool, which (query row, key) pairs attend
    carry: tuple[jax.Array, jax.Array, jax.Array],  # o [rows, head_dim] f32, m [rows] f32, l [rows] f32
    *,
    scale_log2: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one KV block into the running (unnormalised output, row max, row sum) of the online softmax."""
    o_prev, m_prev, l_prev = carry
    precision = dot_precision(q.dtype)
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [rows, block_k] f32
    s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.where(valid, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = l_prev * alpha + p.sum(axis=1)
    o_next = o_prev * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return o_next, m_next, l_next


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def normalise(o: jax.Array, l: jax.Array) -> jax.Array:
    """``o / l`` per row, with empty rows (``l == 0``, nothing attended) giving zeros instead of NaN."""
    return o / jnp.where(l > 0.0, l, 1.0)[:, None]
