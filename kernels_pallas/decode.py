"""Pallas decode attention over a paged KV cache: one query token per sequence, grouped-query attention.

Structure (the same as JAX's shipped ``pallas.ops.gpu.paged_attention``, which is known to lower with
Triton): the grid is ``(batch, num_kv_heads, num_splits)``. A program takes the q heads that share one KV
head (the group, zero-padded to ``rows = max(16, next_pow2(group))`` so the dots are >= 16 wide), walks its
split's slice of the sequence's block table ``pages_per_block`` pages at a time in a ``fori_loop`` whose
trip count comes from the sequence length, and keeps an online softmax in registers.

Split-K (``num_splits > 1``) gives small batches enough programs to fill the GPU; each split then writes
an unnormalised partial output with its row max and row sum, and a few XLA ops combine the splits. With one
split the kernel writes the finished output directly. ``DecodeConfig`` picks the split count from the
batch shape (``target_programs``) unless told otherwise.

Differences from the shipped kernel: batch is a grid axis instead of a ``vmap``; split count adapts to the
batch (the shipped default of 16 splits costs extra partial-output traffic at large batch); slots past a
sequence's length are masked in the load (no traffic, and garbage there cannot leak into the output); the
partial outputs stay in float32.
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


# Below this many (sequence, KV head) programs the decode kernel uses 32-token loop steps, above it 64:
# narrower steps give small batches more programs in flight (see the sweep in docs/kernels.md).
SMALL_GRID_PROGRAMS = 256
# "Small work": at least SMALL_GRID_PROGRAMS programs but at most this many KV tokens over all (sequence, KV
# head) pairs of the table (batch * num_kv_heads * pages_per_seq * page_size). There the kernel reads
# 67-134 MB in ~60-110 us and the H200 sweep (docs/kernels.md, run 4) measured 32-token steps, 512 target
# programs and 2 warps 7-11% faster than the general defaults at all three such points (32 x 1K, 32 x 2K,
# 64 x 1K with 8 KV heads), so that region gets those; elsewhere the general defaults (measured in run 3).
SMALL_WORK_KV_TOKENS = 1 << 19


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs of the decode kernel (hashable: it is a static argument of the jitted wrapper)."""

    # KV tokens per loop step (rounded to whole pages, at least 16). None picks by occupancy: 32 when
    # batch * num_kv_heads <= SMALL_GRID_PROGRAMS or the call is "small work", else 64 (measured on an H200,
    # docs/kernels.md).
    block_kv: int | None = None
    num_splits: int | None = None  # split-K partitions per sequence; None: from target_programs
    # Heuristic: splits ~ target_programs / (batch * num_kv_heads). None: 512 for small work, else 1024.
    target_programs: int | None = None
    # False (default, faster on the H200): gather whole pages as JAX's shipped kernel does and zero the
    # slots past the context afterwards. True: masked gather, no memory traffic past the context.
    masked_loads: bool = False
    num_warps: int | None = None  # None: 2 for small work, else 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_kv is not None and not is_power_of_two(self.block_kv):
            raise ValueError(f"DecodeConfig.block_kv must be a power of two, got {self.block_kv}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits must be >= 1 or None, got {self.num_splits}")
        if self.target_programs is not None and self.target_programs < 1:
            raise ValueError(f"DecodeConfig.target_programs must be >= 1, got {self.target_programs}")
        if self.num_warps is not None and not is_power_of_two(self.num_warps):
            raise ValueError(f"DecodeConfig.num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Static tiling of one decode call, derived from the shapes and a ``DecodeConfig``."""

    rows: int  # q rows per program: the head group padded to a power of two >= 16
    pages_per_block: int  # pages gathered per loop step
    num_splits: int
    pages_per_split: int  # a multiple of pages_per_block; block tables are padded to splits * this
    num_warps: int = 4


def plan_decode(
    config: DecodeConfig, batch: int, num_q_heads: int, num_kv_heads: int, page_size: int, pages_per_seq: int
) -> DecodePlan:
    group = num_q_heads // num_kv_heads
    rows = max(16, next_power_of_two(group))
    # Loop-step width: whole pages, at least 16 tokens (tl.dot minimum), no wider than the table needs.
    programs = batch * num_kv_heads
    small_work = programs >= SMALL_GRID_PROGRAMS and programs * pages_per_seq * page_size <= SMALL_WORK_KV_TOKENS
    block_kv = config.block_kv
    if block_kv is None:
        block_kv = 32 if programs <= SMALL_GRID_PROGRAMS or small_work else 64
    target_programs = config.target_programs or (512 if small_work else 1024)
    num_warps = config.num_warps or (2 if small_work else 4)
    pages_per_block = max(1, block_kv // page_size, 16 // page_size)
    pages_per_block = min(pages_per_block, max(next_power_of_two(pages_per_seq), 16 // page_size, 1))
    blocks_per_seq = pl.cdiv(pages_per_seq, pages_per_block)
    if config.num_splits is None:
        wanted = pl.cdiv(target_programs, programs)
        num_splits = min(next_power_of_two(wanted), blocks_per_seq)
    else:
        num_splits = min(config.num_splits, blocks_per_seq)
    pages_per_split = pl.cdiv(blocks_per_seq, num_splits) * pages_per_block
    num_splits = pl.cdiv(pages_per_seq, pages_per_split)  # drop splits that would cover only padding
    return DecodePlan(rows, pages_per_block, num_splits, pages_per_split, num_warps)


def _decode_kernel(
    q_ref,  # [rows, head_dim]
    k_ref,  # [num_pages, page_size, head_dim] (this program's KV head)
    v_ref,  # [num_pages, page_size, head_dim]
    bt_ref,  # [pages_per_split] int32, this split's slice of the block table
    len_ref,  # [1] int32, the sequence's context length
    *out_refs,  # split: o [rows, head_dim] f32, m [rows], l [rows]; else: o [rows, head_dim] q dtype
    pages_per_block: int,
    scale_log2: float,
    masked_loads: bool,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    pages_per_split = bt_ref.shape[0]
    block_k = pages_per_block * page_size
    length = len_ref[0]
    first_page = pl.program_id(2) * pages_per_split
    end_page = jnp.minimum(pl.cdiv(length, page_size), first_page + pages_per_split)
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)
    q = q_ref[...]
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(j, carry):
        ids = bt_ref[pl.ds(j * pages_per_block, pages_per_block)]
        first_pos = (first_page + j * pages_per_block) * page_size
        k = tiles.load_kv_block(k_ref, ids, first_pos, length, masked_loads=masked_loads)
        v = tiles.load_kv_block(v_ref, ids, first_pos, length, masked_loads=masked_loads)
        valid = first_pos + col < length
        return tiles.softmax_step(q, k, v, valid, carry, scale_log2=scale_log2)

    o, m, l = jax.lax.fori_loop(0, num_blocks, body, tiles.init_carry(rows, head_dim))
    if len(out_refs) == 1:
        out_refs[0][...] = tiles.normalise(o, l).astype(out_refs[0].dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def decode_kernel_outputs(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32
    *,
    scale: float,
    config: DecodeConfig,
    interpret: bool,
) -> tuple[DecodePlan, list[jax.Array]]:
    """Run the kernel and return its raw outputs: with one split ``[o]`` (``[batch, kvh, rows, d]``, q
    dtype, normalised); with several ``[o, m, l]`` (``[splits, batch, kvh, rows(, d)]`` float32)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    plan = plan_decode(config, batch, num_q_heads, num_kv_heads, page_size, pages_per_seq)
    rows, splits, per_split = plan.rows, plan.num_splits, plan.pages_per_split

    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # [batch, kvh, rows, d]
    # Out-of-range page ids (e.g. -1 padding) must never become addresses; lengths past the table are cut.
    bt = jnp.clip(block_tables, 0, num_pages - 1)
    bt = jnp.pad(bt, ((0, 0), (0, splits * per_split - pages_per_seq)))
    bt = bt.reshape(batch, splits, per_split)
    lengths = jnp.clip(lengths, 0, pages_per_seq * page_size)

    kernel = functools.partial(
        _decode_kernel,
        pages_per_block=plan.pages_per_block,
        scale_log2=scale * tiles.LOG2E,
        masked_loads=config.masked_loads,
    )
    page_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
    in_specs = [
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
        page_spec,
        page_spec,
        pl.BlockSpec((None, None, per_split), lambda b, h, s: (b, s, 0)),
        pl.BlockSpec((1,), lambda b, h, s: (b,)),
    ]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, rows, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))]
    else:
        vec = jax.ShapeDtypeStruct((splits, batch, num_kv_heads, rows), jnp.float32)
        out_shape = [jax.ShapeDtypeStruct((splits, batch, num_kv_heads, rows, head_dim), jnp.float32), vec, vec]
        vec_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0))
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
            vec_spec,
            vec_spec,
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=config.num_stages),
        name="jserve_paged_decode",
    )(qg, k_pages, v_pages, bt, lengths)
    return plan, list(outs)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def paged_decode_attention_pallas(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32, context length (0 = padded row -> zeros)
    *,
    scale: float,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> jax.Array:  # [batch, num_q_heads, head_dim]
    """Decode attention with the Pallas kernel; arguments as ``paged_decode_attention_reference``."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_pages.shape[0]
    plan, outs = decode_kernel_outputs(
        q, k_pages, v_pages, block_tables, lengths, scale=scale, config=config, interpret=interpret
    )
    out = outs[0] if plan.num_splits == 1 else combine_splits(*outs).astype(q.dtype)
    return out[:, :, :group, :].reshape(batch, num_q_heads, head_dim)


def combine_splits(
    o: jax.Array,  # [splits, ..., rows, head_dim] f32, unnormalised partial outputs
    m: jax.Array,  # [splits, ..., rows] f32, row max (log2 domain)
    l: jax.Array,  # [splits, ..., rows] f32, row sum relative to m
) -> jax.Array:  # [..., rows, head_dim] f32
    """Merge split-K partial softmax results; rows that attended nothing come out as zeros."""
    m_all = m.max(axis=0)
    w = jnp.exp2(m - m_all[None])
    l_all = (l * w).sum(axis=0)
    o_all = (o * w[..., None]).sum(axis=0)
    return o_all / jnp.where(l_all > 0.0, l_all, 1.0)[..., None]
