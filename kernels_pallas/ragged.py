"""Pallas ragged attention over a paged KV cache: several sequences' new tokens packed along one axis, each
attending causally to its own new tokens and to its context already in the pages. One kernel serves plain
prefill, chunked prefill, recompute after preemption and mixed prefill + decode iterations.

Flow:

1. ``build_work_items`` (plain XLA, a few small int ops) cuts every sequence's queries into work items of
   ``block_q`` consecutive tokens. The item count ``W = min(cdiv(T, block_q) + S, T)`` is a static upper
   bound; unused items are empty. Each item records its sequence, the context position of its first query
   and the end of the KV it may read (``kv_end``). Items of one sequence are listed last-block-first so the
   longest items start first.
2. The packed queries are gathered into per-item tiles ``[W, num_kv_heads, block_q * group_pad, head_dim]``
   (row ``r`` = token ``r // group_pad`` of the item, q head ``r % group_pad`` of the KV head's group,
   group zero-padded to a power of two). Every tile is a whole block, so the kernel needs no masked q loads
   or output stores.
3. The kernel, grid ``(W, num_kv_heads)``, loops over ``cdiv(kv_end, block_kv)`` KV blocks of the item's
   sequence with an online softmax, masking ``key <= query position`` and ``key < kv_end``.
4. The output tiles are gathered back to packed order; padding tokens (past ``query_start_loc[-1]``) get 0.

Conventions (see ``metadata.py``): query ``j`` of sequence ``s`` sits at position
``seq_lens[s] - q_len[s] + j``; K/V of this step's tokens are already in the pages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import tiles
from .checks import is_power_of_two, next_power_of_two


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tuning knobs of the ragged kernel (hashable: it is a static argument of the jitted wrapper)."""

    block_q: int | None = None  # tokens per work item; None: ~max_rows // group_pad, shrunk for short queries
    max_rows: int = 128  # upper bound on block_q * group_pad (the q tile height) for the default block_q
    block_kv: int = 64  # KV tokens per loop step (rounded to whole pages, at least 16)
    masked_loads: bool = True
    num_warps: int = 8  # a 128 x head_dim float32 accumulator per program
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q is not None and not is_power_of_two(self.block_q):
            raise ValueError(f"PrefillConfig.block_q must be a power of two or None, got {self.block_q}")
        if not is_power_of_two(self.max_rows) or self.max_rows < 16:
            raise ValueError(f"PrefillConfig.max_rows must be a power of two >= 16, got {self.max_rows}")
        if not is_power_of_two(self.block_kv):
            raise ValueError(f"PrefillConfig.block_kv must be a power of two, got {self.block_kv}")
        if not is_power_of_two(self.num_warps):
            raise ValueError(f"PrefillConfig.num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"PrefillConfig.num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    group_pad: int  # q heads per KV head, padded to a power of two
    block_q: int  # tokens per work item
    pages_per_block: int
    num_items: int  # W, static upper bound on the number of work items

    @property
    def rows(self) -> int:
        return self.block_q * self.group_pad


def plan_prefill(
    config: PrefillConfig, num_tokens: int, num_seqs: int, group: int, page_size: int, pages_per_seq: int
) -> PrefillPlan:
    group_pad = next_power_of_two(group)
    min_q = max(1, 16 // group_pad)  # the q tile needs >= 16 rows for tl.dot
    if config.block_q is None:
        typical_q = next_power_of_two(max(1, num_tokens // num_seqs))
        block_q = max(min_q, min(max(1, config.max_rows // group_pad), typical_q))
    else:
        block_q = max(min_q, config.block_q)
    pages_per_block = max(1, config.block_kv // page_size, 16 // page_size)
    pages_per_block = min(pages_per_block, max(next_power_of_two(pages_per_seq), 16 // page_size, 1))
    num_items = max(1, min(pl.cdiv(num_tokens, block_q) + num_seqs, num_tokens))
    return PrefillPlan(group_pad, block_q, pages_per_block, num_items)


@dataclasses.dataclass(frozen=True)
class WorkItems:
    """Per-item scalars and the index maps between packed tokens and item rows."""

    seq: jax.Array  # [W] int32, sequence slot of each item (0 for empty items)
    first_pos: jax.Array  # [W] int32, context position of the item's first query
    kv_end: jax.Array  # [W] int32, keys at positions >= kv_end are never read (0 for empty items)
    token_index: jax.Array  # [W, block_q] int32, packed token of each item row (clamped for unused rows)
    row_of_token: jax.Array  # [T] int32, flat item row (w * block_q + i) holding each packed token
    token_valid: jax.Array  # [T] bool, False for padding tokens


def build_work_items(
    seq_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    num_tokens: int,
    block_q: int,
    num_items: int,
    capacity: int,  # pages_per_seq * page_size: no key position reaches past this
) -> WorkItems:
    num_seqs = seq_lens.shape[0]
    q_len = jnp.maximum(query_start_loc[1:] - query_start_loc[:-1], 0)  # [S]
    num_blocks = (q_len + block_q - 1) // block_q  # [S]
    blocks_end = jnp.cumsum(num_blocks)  # [S], inclusive
    blocks_start = blocks_end - num_blocks
    w = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(blocks_end, w, side="right"), 0, num_seqs - 1).astype(jnp.int32)
    used = w < blocks_end[-1]
    block = num_blocks[seq] - 1 - (w - blocks_start[seq])  # last block of a sequence first
    first_tok = query_start_loc[seq] + block * block_q
    count = jnp.where(used, jnp.clip(q_len[seq] - block * block_q, 0, block_q), 0)
    first_pos = seq_lens[seq] - q_len[seq] + block * block_q
    kv_end = jnp.where(used, jnp.clip(first_pos + count, 0, capacity), 0)
    token_index = jnp.clip(first_tok[:, None] + jnp.arange(block_q)[None, :], 0, num_tokens - 1)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_t = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1)
    local = t - query_start_loc[seq_t]
    block_t = local // block_q
    item_t = blocks_start[seq_t] + num_blocks[seq_t] - 1 - block_t
    row_of_token = jnp.clip(item_t * block_q + local - block_t * block_q, 0, num_items * block_q - 1)
    token_valid = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    return WorkItems(
        seq=seq,
        first_pos=first_pos.astype(jnp.int32),
        kv_end=kv_end.astype(jnp.int32),
        token_index=token_index.astype(jnp.int32),
        row_of_token=row_of_token.astype(jnp.int32),
        token_valid=token_valid,
    )


def _ragged_kernel(
    q_ref,  # [rows, head_dim], one work item's queries for one KV head's group
    k_ref,  # [num_pages, page_size, head_dim] (this program's KV head)
    v_ref,  # [num_pages, page_size, head_dim]
    bt_ref,  # [S, pages_per_seq_padded] int32, all block tables
    seq_ref,  # [1] int32
    pos_ref,  # [1] int32
    end_ref,  # [1] int32
    o_ref,  # [rows, head_dim]
    *,
    pages_per_block: int,
    group_shift: int,  # log2(group_pad): row r holds token r >> group_shift
    scale_log2: float,
    masked_loads: bool,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    seq = seq_ref[0]
    kv_end = end_ref[0]
    row_pos = pos_ref[0] + jax.lax.shift_right_logical(
        jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group_shift
    )
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    q = q_ref[...]

    def body(j, carry):
        ids = bt_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        first_pos = j * block_k
        k = tiles.load_kv_block(k_ref, ids, first_pos, kv_end, masked_loads=masked_loads)
        v = tiles.load_kv_block(v_ref, ids, first_pos, kv_end, masked_loads=masked_loads)
        key = first_pos + col
        valid = (key <= row_pos) & (key < kv_end)
        return tiles.softmax_step(q, k, v, valid, carry, scale_log2=scale_log2)

    num_blocks = pl.cdiv(kv_end, block_k)
    o, _, l = jax.lax.fori_loop(0, num_blocks, body, tiles.init_carry(rows, head_dim))
    o_ref[...] = tiles.normalise(o, l).astype(o_ref.dtype)


def ragged_kernel_outputs(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array,  # [num_seqs] int32
    query_start_loc: jax.Array,  # [num_seqs + 1] int32
    *,
    scale: float,
    config: PrefillConfig,
    interpret: bool,
) -> tuple[PrefillPlan, WorkItems, jax.Array]:  # raw tiles [W, num_kv_heads, rows, head_dim]
    """Build the work items, run the kernel and return its raw output tiles (before unpacking)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    plan = plan_prefill(config, num_tokens, num_seqs, group, page_size, pages_per_seq)
    gp, bq, rows, nw = plan.group_pad, plan.block_q, plan.rows, plan.num_items
    items = build_work_items(
        seq_lens,
        query_start_loc,
        num_tokens=num_tokens,
        block_q=bq,
        num_items=nw,
        capacity=pages_per_seq * page_size,
    )

    qw = q[items.token_index]  # [W, bq, Hq, d]
    qw = qw.reshape(nw, bq, num_kv_heads, group, head_dim)
    qw = jnp.pad(qw, ((0, 0), (0, 0), (0, 0), (0, gp - group), (0, 0)))
    qw = qw.transpose(0, 2, 1, 3, 4).reshape(nw, num_kv_heads, rows, head_dim)
    bt = jnp.clip(block_tables, 0, num_pages - 1)
    padded_pages = pl.cdiv(pages_per_seq, plan.pages_per_block) * plan.pages_per_block
    bt = jnp.pad(bt, ((0, 0), (0, padded_pages - pages_per_seq)))

    kernel = functools.partial(
        _ragged_kernel,
        pages_per_block=plan.pages_per_block,
        group_shift=gp.bit_length() - 1,
        scale_log2=scale * tiles.LOG2E,
        masked_loads=config.masked_loads,
    )
    page_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda w, h: (h, 0, 0, 0))
    item_spec = pl.BlockSpec((1,), lambda w, h: (w,))
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda w, h: (w, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(nw, num_kv_heads),
        in_specs=[
            tile_spec,
            page_spec,
            page_spec,
            pl.BlockSpec((num_seqs, padded_pages), lambda w, h: (0, 0)),
            item_spec,
            item_spec,
            item_spec,
        ],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct((nw, num_kv_heads, rows, head_dim), q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="jserve_ragged_paged_attention",
    )(qw, k_pages, v_pages, bt, items.seq, items.first_pos, items.kv_end)
    return plan, items, out


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def ragged_paged_attention_pallas(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array,  # [num_seqs] int32, context length including the new tokens
    query_start_loc: jax.Array,  # [num_seqs + 1] int32
    *,
    scale: float,
    config: PrefillConfig = PrefillConfig(),
    interpret: bool = False,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    """Ragged attention with the Pallas kernel; arguments as ``ragged_paged_attention_reference``."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_q_heads // num_kv_heads
    plan, items, out = ragged_kernel_outputs(
        q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale=scale, config=config,
        interpret=interpret,
    )
    nw, bq, gp = plan.num_items, plan.block_q, plan.group_pad
    out = out.reshape(nw, num_kv_heads, bq, gp, head_dim)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(nw * bq, num_q_heads, head_dim)
    out = out[items.row_of_token]
    return jnp.where(items.token_valid[:, None, None], out, jnp.zeros((), q.dtype))
