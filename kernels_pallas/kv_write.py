"""Pallas KV write: scatter each new token's K/V into its page slot, in place on the cache buffers.

The grid is ``(num_tokens, num_kv_heads)``; each program copies one ``[head_dim]`` row of K and of V to
``pages[h, slot // page_size, slot % page_size]``. The page arrays are aliased input -> output
(``input_output_aliases``), so when the caller's ``jit`` donates the cache the write happens in place and
only ``2 * num_tokens * num_kv_heads * head_dim`` elements move; without donation XLA first copies the
cache (correct, but a full-cache copy). Slots outside ``[0, num_pages * page_size)`` (padding uses -1) are
skipped by a ``pl.when``; they write nothing.

The plain-XLA alternative is ``write_kv_reference`` (a ``mode="drop"`` scatter); the GPU check script
times both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .checks import is_power_of_two


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    num_warps: int = 1  # one 64..256-element row per program

    def __post_init__(self):
        if not is_power_of_two(self.num_warps):
            raise ValueError(f"WriteConfig.num_warps must be a power of two, got {self.num_warps}")


def _write_kernel(
    slot_ref,  # [1] int32, destination slot of this token
    k_ref,  # [head_dim] this token's K for this head
    v_ref,  # [head_dim]
    k_in_ref,  # [num_kv_heads, num_pages, page_size, head_dim] (aliased to k_out_ref; unused)
    v_in_ref,  # [num_kv_heads, num_pages, page_size, head_dim] (aliased to v_out_ref; unused)
    k_out_ref,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_out_ref,  # [num_kv_heads, num_pages, page_size, head_dim]
):
    del k_in_ref, v_in_ref
    _, num_pages, page_size, _ = k_out_ref.shape
    head = pl.program_id(1)
    slot = slot_ref[0]

    @pl.when((slot >= 0) & (slot < num_pages * page_size))
    def _write():
        page = jax.lax.div(slot, page_size)
        offset = jax.lax.rem(slot, page_size)
        k_out_ref[head, page, offset, :] = k_ref[...].astype(k_out_ref.dtype)
        v_out_ref[head, page, offset, :] = v_ref[...].astype(v_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def write_kv_pallas(
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [num_tokens] int32; out-of-range (e.g. -1) drops the token
    *,
    config: WriteConfig = WriteConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # updated (k_pages, v_pages)
    num_tokens, num_kv_heads, head_dim = k.shape
    page_spec = pl.BlockSpec(k_pages.shape, lambda t, h: (0, 0, 0, 0))
    row_spec = pl.BlockSpec((None, None, head_dim), lambda t, h: (t, h, 0))
    return pl.pallas_call(
        _write_kernel,
        grid=(num_tokens, num_kv_heads),
        in_specs=[pl.BlockSpec((1,), lambda t, h: (t,)), row_spec, row_spec, page_spec, page_spec],
        out_specs=[page_spec, page_spec],
        out_shape=[
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ],
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        name="jserve_write_kv",
    )(slot_mapping, k, v, k_pages, v_pages)


def write_kv_xla(
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [num_tokens] int32; out-of-range drops the token
) -> tuple[jax.Array, jax.Array]:
    """XLA scatter declared with unique indices (dropped tokens get distinct out-of-range slots)."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    t = jnp.arange(slot_mapping.shape[0], dtype=jnp.int32)
    in_range = (slot_mapping >= 0) & (slot_mapping < num_slots)
    slots = jnp.where(in_range, slot_mapping, num_slots + t)

    def scatter(pages, x):
        flat = pages.reshape(num_kv_heads, num_slots, head_dim)
        upd = jnp.swapaxes(x, 0, 1).astype(pages.dtype)
        flat = flat.at[:, slots, :].set(upd, mode="drop", unique_indices=True)
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)
