"""The public kernels: argument checks, then dispatch on ``backend``.

``backend``: ``"pallas"`` (Pallas lowered for the GPU; needs one), ``"interpret"`` (the same Pallas kernels
in interpret mode: a slow correctness tool that runs anywhere), ``"reference"`` (the pure-jnp references,
plain XLA; exact ground truth, but they gather the whole block-table width), ``"xla"`` (``xla_paged``: plain
XLA loops over page chunks up to the longest context, and ``write_kv`` is the reference scatter), ``"cpu"``
(the ``xla`` backend, except that decode attention, and the decode rows of a ragged step, run jserve's native
C++ kernel, ``kernels_cpu``, when lowered for a CPU with float32 pages; the fast path off-GPU). ``None`` picks
``"pallas"`` on a GPU and ``"reference"`` elsewhere (``checks.serving_backend`` picks ``"cpu"`` there instead:
what the models use).

``config`` (optional) tunes the Pallas kernels (``DecodeConfig`` / ``PrefillConfig`` / ``WriteConfig``);
the references and the xla backend ignore it. Everything here is traceable under ``jax.jit``; shape and
dtype errors are raised as ``ValueError`` at trace time and name the offending argument.
"""

from __future__ import annotations

import jax

from . import checks
from .decode import DecodeConfig, paged_decode_attention_pallas
from .kv_write import WriteConfig, write_kv_pallas
from .ragged import PrefillConfig, ragged_paged_attention_pallas
from .xla_paged import paged_decode_attention_native, paged_decode_attention_xla, ragged_paged_attention_xla
from .reference import (
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)

_decode_reference = jax.jit(paged_decode_attention_reference, static_argnames=("scale",))
_ragged_reference = jax.jit(ragged_paged_attention_reference, static_argnames=("scale",))
_write_reference = jax.jit(write_kv_reference)


def _kernel_backend(backend: str | None, k_pages) -> str:
    resolved = checks.resolve_backend(backend)
    if resolved == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(
            f"backend='pallas' lowers for a GPU, but the default JAX backend is {jax.default_backend()!r}; "
            "use backend='interpret' (Pallas interpret mode) or 'reference'"
        )
    if resolved not in ("reference", "xla", "cpu"):
        checks.check_pallas_blocks(k_pages)
    return resolved


def _check_config(config, expected: type, name: str):
    if config is None:
        return expected()
    if not isinstance(config, expected):
        raise ValueError(f"config for {name} must be a {expected.__name__} or None, got {type(config).__name__}")
    return config


def paged_decode_attention(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32, context length (0 = padded row -> zeros)
    *,
    scale: float,
    backend: str | None = None,
    config: DecodeConfig | None = None,
) -> jax.Array:  # [batch, num_q_heads, head_dim]
    """Attention of one new query token per sequence over its paged context (grouped-query heads)."""
    scale = checks.check_scale(scale)
    checks.check_decode_args(q, k_pages, v_pages, block_tables, lengths)
    resolved = _kernel_backend(backend, k_pages)
    config = _check_config(config, DecodeConfig, "paged_decode_attention")
    if resolved == "reference":
        return _decode_reference(q, k_pages, v_pages, block_tables, lengths, scale=scale)
    if resolved == "xla":
        return paged_decode_attention_xla(q, k_pages, v_pages, block_tables, lengths, scale=scale)
    if resolved == "cpu":
        return paged_decode_attention_native(q, k_pages, v_pages, block_tables, lengths, scale=scale)
    return paged_decode_attention_pallas(
        q, k_pages, v_pages, block_tables, lengths, scale=scale, config=config, interpret=resolved == "interpret"
    )


def ragged_paged_attention(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array,  # [num_seqs] int32, context length including the new tokens
    query_start_loc: jax.Array,  # [num_seqs + 1] int32, cumulative query offsets
    *,
    scale: float,
    backend: str | None = None,
    config: PrefillConfig | None = None,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    """Causal attention of packed new tokens (prefill, chunked prefill, recompute, mixed) over paged KV."""
    scale = checks.check_scale(scale)
    checks.check_ragged_args(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc)
    resolved = _kernel_backend(backend, k_pages)
    config = _check_config(config, PrefillConfig, "ragged_paged_attention")
    if resolved == "reference":
        return _ragged_reference(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale=scale)
    if resolved in ("xla", "cpu"):
        return ragged_paged_attention_xla(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale=scale,
                                          native_decode=resolved == "cpu")
    return ragged_paged_attention_pallas(
        q,
        k_pages,
        v_pages,
        block_tables,
        seq_lens,
        query_start_loc,
        scale=scale,
        config=config,
        interpret=resolved == "interpret",
    )


def write_kv(
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [num_tokens] int32, slot = page * page_size + offset; -1 drops the token
    *,
    backend: str | None = None,
    config: WriteConfig | None = None,
) -> tuple[jax.Array, jax.Array]:  # updated (k_pages, v_pages)
    """Write this step's K/V into their slots. In place when the caller's ``jit`` donates the pages."""
    checks.check_write_args(k_pages, v_pages, k, v, slot_mapping)
    resolved = _kernel_backend(backend, k_pages)
    config = _check_config(config, WriteConfig, "write_kv")
    if resolved in ("reference", "xla", "cpu"):
        return _write_reference(k_pages, v_pages, k, v, slot_mapping)
    return write_kv_pallas(
        k_pages, v_pages, k, v, slot_mapping, config=config, interpret=resolved == "interpret"
    )
