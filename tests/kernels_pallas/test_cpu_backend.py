"""The ``cpu`` backend: decode attention in jserve's native kernel (``kernels_cpu``) where it applies, against a
float64 numpy truth, on the same cases as the ``xla`` backend (grouped-query ratios, lengths 1 / page boundary /
full / 0, pages smaller and larger than the kernel's 16-key runs, unused table columns holding garbage ids over
NaN-poisoned pages), plus the shapes it leaves to the ``xla`` loops and the backend's resolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_cpu
import kernels_pallas
from kernel_cases import context_kv, decode_lengths, dense_attention, make_paged, rel_err
from kernels_pallas import paged_decode_attention
from kernels_pallas.checks import serving_backend

SCALE = 0.19
KV_HEADS = 2

needs_native = pytest.mark.skipif(not kernels_cpu.native_available(),
                                  reason=f"native CPU kernels unavailable: {kernels_cpu.build.unavailable_reason()}")


def _case(seed, group, head_dim, page_size, batch=7, pages_per_seq=6, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    lengths = decode_lengths(rng, batch, page_size, page_size * pages_per_seq)
    paged = make_paged(rng, lengths, num_kv_heads=KV_HEADS, head_dim=head_dim, page_size=page_size,
                       pages_per_seq=pages_per_seq, dtype=dtype)
    q = rng.standard_normal((batch, KV_HEADS * group, head_dim)).astype(np.float32)
    args = (jnp.asarray(q, dtype), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lengths))
    truth = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        if n:
            k, v = context_kv(paged, b)
            truth[b] = dense_attention(q[b : b + 1], k, v, SCALE)[0]
    return args, truth, lengths


def _cpu_decode(*args):
    return jax.jit(lambda *a: paged_decode_attention(*a, scale=SCALE, backend="cpu"))(*args)


def _uses_native(*args) -> bool:
    hlo = jax.jit(lambda *a: paged_decode_attention(*a, scale=SCALE, backend="cpu")).lower(*args).as_text()
    return "jserve_paged_decode_attention" in hlo


@needs_native
@pytest.mark.parametrize("group,head_dim,page_size", [(1, 64, 8), (3, 64, 16), (4, 32, 4), (2, 16, 32), (8, 128, 16)])
def test_native_decode_matches_float64(group, head_dim, page_size):
    for seed in range(2):
        args, truth, lengths = _case(seed, group, head_dim, page_size)
        assert _uses_native(*args)
        out = np.asarray(_cpu_decode(*args))
        assert rel_err(out, truth) < 5e-6, (seed, lengths)
        np.testing.assert_array_equal(out[lengths == 0], 0.0)  # the padded row, over NaN pages
        assert np.isfinite(out).all()


@needs_native
def test_native_decode_clamps_bad_page_ids_and_lengths():
    """A malformed table (ids past the pool, negative ids) or a length past the table's width reads a wrong
    page rather than memory outside the pool: the result is finite and equals the same call with the ids
    clamped and the length cut to the width."""
    args, _, _ = _case(0, 3, 64, 16, batch=3, pages_per_seq=2)
    q, k, v, bt, _ = args
    num_pages = k.shape[1]
    bad = jnp.asarray([[num_pages + 5, -7], [0, 1], [2, num_pages]], jnp.int32)
    clean = jnp.clip(bad, 0, num_pages - 1)
    k = jnp.nan_to_num(k)
    v = jnp.nan_to_num(v)
    lengths = jnp.asarray([32, 1000, 17], jnp.int32)
    out = _cpu_decode(q, k, v, bad, lengths)
    expect = paged_decode_attention(q, k, v, clean, jnp.minimum(lengths, 32), scale=SCALE, backend="reference")
    assert rel_err(out, expect) < 5e-6


def test_shapes_the_kernel_leaves_to_xla():
    """Head sizes that are not a multiple of 16 and bfloat16 pages run the ``xla`` loops (no custom call)
    and still give the right answer."""
    for head_dim, dtype, tol in ((40, jnp.float32, 5e-6), (64, jnp.bfloat16, 1e-2)):
        args, truth, _ = _case(1, 3, head_dim, 8, dtype=dtype)
        assert not _uses_native(*args)
        assert rel_err(_cpu_decode(*args), truth) < tol


def test_cpu_backend_resolution_and_other_kernels():
    assert "cpu" in kernels_pallas.BACKENDS
    assert serving_backend(None) == ("pallas" if jax.default_backend() == "gpu" else "cpu")
    # Ragged attention on the cpu backend is the xla backend's, its decode rows (one new token after cached
    # context) by the decode kernel: a ragged step of one-token rows gives the decode kernel's output there.
    args, truth, lengths = _case(2, 2, 32, 8, batch=4)  # lengths 1, 8, 16 and 48 (no padded row)
    q, k, v, bt, lens = args
    qsl = jnp.arange(5, dtype=jnp.int32)
    out_cpu = np.asarray(kernels_pallas.ragged_paged_attention(q, k, v, bt, lens, qsl, scale=SCALE, backend="cpu"))
    out_decode = np.asarray(kernels_pallas.paged_decode_attention(q, k, v, bt, lens, scale=SCALE, backend="cpu"))
    cached = lengths > 1  # a length-1 row is a one-token prompt: no cached context, the in-step part answers
    assert cached.sum() >= 3 and (~cached).sum() >= 1
    np.testing.assert_array_equal(out_cpu[cached], out_decode[cached])
    assert rel_err(out_cpu, truth) < 1e-5
    # the K/V write on the cpu backend is the xla backend's
    kn, _ = kernels_pallas.write_kv(k, v, jnp.ones((1, KV_HEADS, 32)), jnp.ones((1, KV_HEADS, 32)),
                                    jnp.array([3], jnp.int32), backend="cpu")
    np.testing.assert_array_equal(np.asarray(kn)[:, 0, 3], 1.0)
