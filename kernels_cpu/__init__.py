"""jserve's native CPU kernels: hand-written C++ called from XLA:CPU through the XLA FFI.

XLA:CPU runs the two halves of a decode step well below what this machine's memory and cores allow
(docs/models.md, "CPU speed"): the small-row float32 products with the layer weights, and paged attention,
whose XLA form gathers every K/V chunk into a fresh buffer before two tiny batched dots. Each function here
runs the kernel in ``native.cc`` when all of these hold, and an XLA form otherwise:

* the computation is lowered for the CPU (``jax.lax.platform_dependent``: a GPU lowering never sees the
  kernels);
* the operands are float32 and the shapes are ones the kernel handles (below);
* the kernel library is built and loaded (``build.load()``: it needs a C++ compiler and AVX-512F;
  ``JSERVE_CPU_KERNELS=0`` turns it off).

* ``matmul_nt(x, w)``: ``x @ w.T`` for a weight in torch's ``[out, in]`` layout, natively when ``x`` has
  at most ``MAX_ROWS`` rows (decode steps; prefill's hundreds of rows are what XLA's dot does well).
* ``paged_decode_attention(...)``: one query token per sequence over its paged K/V (grouped-query heads),
  natively when the head size is a multiple of 16; otherwise the ``fallback`` it is given.

The choice is made when a function is traced, so a jitted function keeps the path it was traced with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import build

__all__ = ["matmul_nt", "paged_decode_attention", "native_available", "MAX_ROWS"]

MAX_ROWS = 64


def native_available() -> bool:
    """Whether the native kernels are built and registered in this process (builds them on first call).
    Always ``False`` when JAX's default backend is not the CPU: nothing would run them."""
    return jax.default_backend() == "cpu" and build.load()


def _xla_matmul_nt(x: jax.Array, w: jax.Array, precision, preferred_element_type) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w, precision=precision, preferred_element_type=preferred_element_type)


@jax.custom_jvp
def _native_matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), jnp.float32)
    return jax.ffi.ffi_call("jserve_matmul_nt", out, vmap_method="sequential")(x, w)


@_native_matmul_nt.defjvp
def _native_matmul_nt_jvp(primals, tangents):
    """The product is bilinear: its derivative is XLA's dot of the tangents (so ``grad`` works as for XLA's)."""
    (x, w), (dx, dw) = primals, tangents
    exact = jax.lax.Precision.HIGHEST
    return _native_matmul_nt(x, w), (_xla_matmul_nt(dx, w, exact, jnp.float32)
                                     + _xla_matmul_nt(x, dw, exact, jnp.float32))


def matmul_nt(x: jax.Array, w: jax.Array, *, precision=None, preferred_element_type=None) -> jax.Array:
    """``x @ w.T``: ``x`` ``[..., K]``, ``w`` ``[N, K]`` -> ``[..., N]`` (see the module docstring for the path).

    ``precision`` and ``preferred_element_type`` are XLA's dot's; the native kernel takes float32 operands and
    computes float32, so it runs only when the result is float32 (``preferred_element_type`` None or
    float32). Differentiation and ``vmap`` work on either path (the kernel's derivative is XLA's dot; ``vmap``
    runs it once per batch element).
    """
    if x.shape[-1] != w.shape[-1] or w.ndim != 2:
        raise ValueError(f"matmul_nt: x {x.shape} and w {w.shape} must be [..., K] and [N, K]")
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if (
        x.dtype != jnp.float32
        or w.dtype != jnp.float32
        or (preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.float32)
        or rows > MAX_ROWS
        or not native_available()
    ):
        return _xla_matmul_nt(x, w, precision, preferred_element_type)
    return jax.lax.platform_dependent(
        x, w, cpu=_native_matmul_nt, default=lambda a, b: _xla_matmul_nt(a, b, precision, preferred_element_type)
    )


def _native_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float) -> jax.Array:
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call("jserve_paged_decode_attention", out, vmap_method="sequential")(
        q, k_pages, v_pages, block_tables, lengths, scale=np.float32(scale)
    )


def paged_decode_attention(
    q: jax.Array,  # [batch, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32 (0: a padded row, zeros out)
    *,
    scale: float,
    fallback,
) -> jax.Array:  # [batch, num_q_heads, head_dim]
    """Decode attention (the contract of ``kernels_pallas.paged_decode_attention``; arguments already checked
    there). ``fallback(q, k_pages, v_pages, block_tables, lengths)`` computes it where the kernel does not."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_pages.shape[0]
    if (
        any(a.dtype != jnp.float32 for a in (q, k_pages, v_pages))
        or head_dim % 16 != 0
        or 0 in k_pages.shape[1:3]  # an empty pool: nothing for the kernel to read
        or num_q_heads % num_kv_heads != 0
        or num_q_heads // num_kv_heads * head_dim > 2048
        or not native_available()
    ):
        return fallback(q, k_pages, v_pages, block_tables, lengths)
    return jax.lax.platform_dependent(
        q, k_pages, v_pages, block_tables, lengths,
        cpu=lambda *a: _native_decode_attention(*a, scale=scale), default=fallback,
    )
