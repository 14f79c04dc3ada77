"""Backend resolution and argument validation shared by every public kernel in this package.

Each public function (``kernels_pallas.api``) calls one ``check_*`` function before dispatching. The checks
look only at static shapes and dtypes, so they run at trace time (also under ``jax.jit``) and raise a
``ValueError`` that names the offending argument instead of letting a kernel fail deep inside lowering.
``check_pallas_blocks`` adds the constraints that only the Pallas kernels have (power-of-two tiles).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

BACKENDS = ("pallas", "interpret", "reference", "xla", "cpu")


def resolve_backend(backend: str | None) -> str:
    """``None`` -> ``"pallas"`` on a GPU, ``"reference"`` elsewhere; anything else must be a known name."""
    if backend is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def serving_backend(backend: str | None) -> str:
    """The backend a model step should run: an explicit name as given (checked); ``None`` -> the fastest
    for the platform: ``"pallas"`` on a GPU, ``"cpu"`` (jserve's native decode attention where it applies,
    the ``xla`` context-length loops for the rest) elsewhere."""
    if backend is None:
        return "pallas" if jax.default_backend() == "gpu" else "cpu"
    return resolve_backend(backend)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_scale(scale) -> float:
    """The softmax scale is a static Python number (it is baked into the compiled kernel)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a Python float (static), got {type(scale).__name__}: {scale!r}")
    scale = float(scale)
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale


def _check_ndim(name: str, x, ndim: int, layout: str) -> None:
    if getattr(x, "ndim", None) != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {getattr(x, 'shape', None)}")


def _check_int32(name: str, x) -> None:
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")


def check_pages(
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
) -> None:
    layout = "[num_kv_heads, num_pages, page_size, head_dim]"
    _check_ndim("k_pages", k_pages, 4, layout)
    _check_ndim("v_pages", v_pages, 4, layout)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    _check_float("k_pages", k_pages)
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} must equal k_pages dtype {k_pages.dtype}")
    if min(k_pages.shape) < 1:
        raise ValueError(f"k_pages must have no empty dimension, got shape {k_pages.shape}")


def _check_q(q, k_pages, layout: str) -> None:
    _check_ndim("q", q, 3, layout)
    num_kv_heads, _, _, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} must equal k_pages head_dim {head_dim}")
    if q.shape[1] < 1 or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q num_q_heads {q.shape[1]} must be a positive multiple of k_pages num_kv_heads {num_kv_heads}"
        )
    if q.dtype != k_pages.dtype:
        raise ValueError(f"q dtype {q.dtype} must equal k_pages dtype {k_pages.dtype}")


def _check_block_tables(block_tables, num_rows: int, rows_name: str) -> None:
    _check_ndim("block_tables", block_tables, 2, "[num_seqs, pages_per_seq]")
    _check_int32("block_tables", block_tables)
    if block_tables.shape[0] != num_rows:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected {num_rows} ({rows_name})")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables must have at least one page column")


def check_decode_args(q, k_pages, v_pages, block_tables, lengths) -> None:
    check_pages(k_pages, v_pages)
    _check_q(q, k_pages, "[batch, num_q_heads, head_dim]")
    batch = q.shape[0]
    if batch < 1:
        raise ValueError("q must have at least one sequence slot (batch >= 1)")
    _check_block_tables(block_tables, batch, "q batch")
    _check_ndim("lengths", lengths, 1, "[batch]")
    _check_int32("lengths", lengths)
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths has {lengths.shape[0]} entries, expected q batch {batch}")


def check_ragged_args(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc) -> None:
    check_pages(k_pages, v_pages)
    _check_q(q, k_pages, "[num_tokens, num_q_heads, head_dim]")
    if q.shape[0] < 1:
        raise ValueError("q must have at least one token slot (num_tokens >= 1)")
    _check_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    _check_int32("seq_lens", seq_lens)
    num_seqs = seq_lens.shape[0]
    if num_seqs < 1:
        raise ValueError("seq_lens must have at least one sequence slot")
    _check_block_tables(block_tables, num_seqs, "seq_lens num_seqs")
    _check_ndim("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    _check_int32("query_start_loc", query_start_loc)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}"
        )


def check_write_args(k_pages, v_pages, k, v, slot_mapping) -> None:
    check_pages(k_pages, v_pages)
    layout = "[num_tokens, num_kv_heads, head_dim]"
    _check_ndim("k", k, 3, layout)
    _check_ndim("v", v, 3, layout)
    num_kv_heads, _, _, head_dim = k_pages.shape
    if k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k shape {k.shape} must be [num_tokens, {num_kv_heads}, {head_dim}] to match k_pages")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    _check_float("k", k)
    _check_float("v", v)
    _check_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    _check_int32("slot_mapping", slot_mapping)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries, expected k num_tokens {k.shape[0]}")


def check_pallas_blocks(k_pages) -> None:
    """Tile constraints of the Pallas kernels (Triton wants power-of-two tiles and dots of width >= 16)."""
    head_dim = k_pages.shape[3]
    page_size = k_pages.shape[2]
    if not is_power_of_two(head_dim) or head_dim < 16:
        raise ValueError(
            f"head_dim {head_dim} (last dim of k_pages) must be a power of two >= 16 for the Pallas kernels; "
            "use backend='reference'"
        )
    if not is_power_of_two(page_size):
        raise ValueError(
            f"page_size {page_size} (dim 2 of k_pages) must be a power of two for the Pallas kernels; "
            "use backend='reference'"
        )
