"""The ``xla`` backend (``kernels_pallas/xla_paged.py``: page-chunk loops up to the longest context) against the
float32 references and a float64 numpy truth: grouped-query ratios, lengths 1 / page boundary / full / 0,
ragged batches with prior context (chunked prefill, decodes inside a mixed batch), wide block tables whose
unused columns hold garbage ids over NaN-poisoned pages, chunk sizes that do not divide the table width."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from kernel_cases import (
    TOLERANCE,
    context_kv,
    decode_lengths,
    dense_attention,
    make_paged,
    ragged_layout,
    rel_err,
)
from kernels_pallas import (
    paged_decode_attention,
    paged_decode_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from kernels_pallas.checks import serving_backend
from kernels_pallas.xla_paged import paged_decode_attention_xla, ragged_paged_attention_xla

SCALE = 0.19
KV_HEADS = 2

CASES = [  # (q heads per KV head, head_dim, page_size, dtype)
    (1, 64, 8, jnp.float32),
    (3, 64, 16, jnp.float32),  # SmolLM2's ratio
    (4, 32, 8, jnp.bfloat16),
    (8, 128, 16, jnp.float32),
    (3, 48, 4, jnp.bfloat16),  # no power-of-two constraint on this backend
]


def _decode_case(seed, group, head_dim, page_size, dtype, batch=7, pages_per_seq=6):
    rng = np.random.default_rng(seed)
    lengths = decode_lengths(rng, batch, page_size, page_size * pages_per_seq)
    paged = make_paged(rng, lengths, num_kv_heads=KV_HEADS, head_dim=head_dim, page_size=page_size,
                       pages_per_seq=pages_per_seq, dtype=dtype)
    q = rng.standard_normal((batch, KV_HEADS * group, head_dim)).astype(np.float32)
    return q, paged, lengths


def _decode_truth(q, paged, lengths):  # float64, one sequence at a time
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        if n:
            k, v = context_kv(paged, b)
            out[b] = dense_attention(q[b : b + 1], k, v, SCALE)[0]
    return out


@pytest.mark.parametrize("group,head_dim,page_size,dtype", CASES)
def test_decode_matches_reference_and_float64(group, head_dim, page_size, dtype):
    for seed in range(2):
        q, paged, lengths = _decode_case(seed, group, head_dim, page_size, dtype)
        args = (jnp.asarray(q, dtype), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lengths))
        out = paged_decode_attention(*args, scale=SCALE, backend="xla")
        assert out.dtype == dtype and out.shape == q.shape
        assert np.isfinite(np.asarray(out, np.float32)).all()
        q_r = np.asarray(jnp.asarray(q, dtype).astype(jnp.float32))
        ref = paged_decode_attention_reference(jnp.asarray(q_r), *paged.jax_pages(jnp.float32), *args[3:], scale=SCALE)
        assert rel_err(out, ref) < TOLERANCE[dtype], f"seed {seed}"
        assert rel_err(out, _decode_truth(q_r, paged, lengths)) < TOLERANCE[dtype]
        np.testing.assert_array_equal(np.asarray(out, np.float32)[lengths == 0], 0.0)  # padded rows


@pytest.mark.parametrize("pages_per_chunk", [1, 4, 5])
def test_decode_chunking_and_wide_tables(pages_per_chunk):
    """Several loop trips, a chunk that does not divide the width, and a table 8x wider than any context
    (every extra column a garbage id, pages outside contexts NaN): the same answer as the reference."""
    q, paged, lengths = _decode_case(3, 3, 64, 8, jnp.float32, batch=6, pages_per_seq=6)
    wide = np.concatenate([paged.block_tables, np.full((6, 42), -1, np.int32)], axis=1)
    wide[::2, 6:] = 1  # a live page of another sequence: must be ignored too
    args = (jnp.asarray(q), *paged.jax_pages(), jnp.asarray(wide), jnp.asarray(lengths))
    out = paged_decode_attention_xla(*args, scale=SCALE, pages_per_chunk=pages_per_chunk)
    narrow = paged_decode_attention_reference(jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables),
                                              jnp.asarray(lengths), scale=SCALE)
    assert rel_err(out, narrow) < 5e-6


def test_decode_all_rows_padded_gives_zeros():
    q, paged, _ = _decode_case(4, 2, 32, 8, jnp.float32, batch=3)
    zero = jnp.zeros((3,), jnp.int32)
    out = paged_decode_attention(jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables), zero,
                                 scale=SCALE, backend="xla")
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero loop trips, no NaN from 0/0


def _ragged_case(seed, group, head_dim, page_size, dtype, num_tokens=48, pages_per_seq=4, extra_cols=0):
    rng = np.random.default_rng(seed)
    lay = ragged_layout(rng, num_tokens, page_size, page_size * pages_per_seq)
    paged = make_paged(rng, lay.seq_lens, num_kv_heads=KV_HEADS, head_dim=head_dim, page_size=page_size,
                       pages_per_seq=pages_per_seq, dtype=dtype)
    tables = paged.block_tables
    if extra_cols:
        tables = np.concatenate([tables, rng.integers(-1, tables.max() + 1, (tables.shape[0], extra_cols))], axis=1)
    q = rng.standard_normal((num_tokens, KV_HEADS * group, head_dim)).astype(np.float32)
    meta = (jnp.asarray(tables.astype(np.int32)), jnp.asarray(lay.seq_lens), jnp.asarray(lay.query_start_loc))
    return q, paged, lay, meta


def _ragged_truth(q, paged, lay):  # float64, sequence by sequence
    out = np.zeros(q.shape)
    for s in range(len(lay.seq_lens)):
        a, b = lay.query_start_loc[s], lay.query_start_loc[s + 1]
        if b > a:
            k, v = context_kv(paged, s)
            out[a:b] = dense_attention(q[a:b], k, v, SCALE)
    return out


@pytest.mark.parametrize("backend", ["xla", "cpu"])  # cpu: the decode rows run the native kernel
@pytest.mark.parametrize("group,head_dim,page_size,dtype", CASES)
def test_ragged_matches_reference_and_float64(group, head_dim, page_size, dtype, backend):
    """Plain prefill, chunked prefill over cached context, decodes (page boundary, ragged), an empty slot
    and padding tokens in one batch."""
    for seed in range(2):
        q, paged, lay, meta = _ragged_case(seed, group, head_dim, page_size, dtype)
        out = ragged_paged_attention(jnp.asarray(q, dtype), *paged.jax_pages(), *meta, scale=SCALE, backend=backend)
        assert out.dtype == dtype and out.shape == q.shape
        assert np.isfinite(np.asarray(out, np.float32)).all()
        q_r = np.asarray(jnp.asarray(q, dtype).astype(jnp.float32))
        ref = ragged_paged_attention_reference(jnp.asarray(q_r), *paged.jax_pages(jnp.float32), *meta, scale=SCALE)
        assert rel_err(out, ref) < TOLERANCE[dtype], f"seed {seed}"
        assert rel_err(out, _ragged_truth(q_r, paged, lay)) < TOLERANCE[dtype]
        np.testing.assert_array_equal(np.asarray(out, np.float32)[lay.query_start_loc[-1] :], 0.0)


@pytest.mark.parametrize("native_decode", [False, True])
@pytest.mark.parametrize("pages_per_chunk,query_block", [(1, 2), (3, 5), (None, 16)])
def test_ragged_work_items_and_wide_tables(pages_per_chunk, query_block, native_decode):
    """Prior-context work items of several sizes (one item per sequence or many), chunk loops of one or
    several trips, and 30 garbage table columns past every context."""
    for seed in range(2):
        q, paged, lay, meta = _ragged_case(10 + seed, 3, 64, 8, jnp.float32, extra_cols=30)
        out = ragged_paged_attention_xla(jnp.asarray(q), *paged.jax_pages(), *meta, scale=SCALE,
                                         pages_per_chunk=pages_per_chunk, query_block=query_block,
                                         native_decode=native_decode)
        assert rel_err(out, _ragged_truth(q, paged, lay)) < 5e-6


@pytest.mark.parametrize("backend", ["xla", "cpu"])
def test_ragged_prompt_beside_decodes(backend):
    """The usual mixed step: a new prompt and decodes, no chunked prefill. The decodes attend by decode
    attention (one of them over several pages, one at a page boundary), the prompt by the in-step part
    alone; a one-token prompt (no prior context) stays with the in-step part."""
    rng = np.random.default_rng(11)
    seq_lens = np.array([9, 30, 1, 16, 0], np.int32)  # prompt of 9, decode at 30, one-token prompt, decode at 16
    qsl = np.array([0, 9, 10, 11, 12, 12], np.int32)
    paged = make_paged(rng, seq_lens, num_kv_heads=KV_HEADS, head_dim=64, page_size=8, pages_per_seq=4,
                       dtype=jnp.float32)
    q = rng.standard_normal((16, KV_HEADS * 2, 64)).astype(np.float32)
    meta = (jnp.asarray(paged.block_tables), jnp.asarray(seq_lens), jnp.asarray(qsl))
    out = ragged_paged_attention(jnp.asarray(q), *paged.jax_pages(), *meta, scale=SCALE, backend=backend)

    class Lay:
        query_start_loc = qsl

    Lay.seq_lens = seq_lens
    assert rel_err(out, _ragged_truth(q, paged, Lay)) < 5e-6
    np.testing.assert_array_equal(np.asarray(out)[12:], 0.0)  # padding tokens


def test_ragged_plain_prefill_only():
    """No sequence has prior context (the context loop runs zero trips): causal attention within each
    sequence only, including two sequences back to back."""
    rng = np.random.default_rng(7)
    seq_lens = np.array([13, 5, 0], np.int32)
    qsl = np.array([0, 13, 18, 18], np.int32)
    paged = make_paged(rng, seq_lens, num_kv_heads=KV_HEADS, head_dim=64, page_size=8, pages_per_seq=3,
                       dtype=jnp.float32)
    q = rng.standard_normal((24, KV_HEADS * 3, 64)).astype(np.float32)
    meta = (jnp.asarray(paged.block_tables), jnp.asarray(seq_lens), jnp.asarray(qsl))
    out = ragged_paged_attention(jnp.asarray(q), *paged.jax_pages(), *meta, scale=SCALE, backend="xla")

    class Lay:
        query_start_loc = qsl

    Lay.seq_lens = seq_lens
    assert rel_err(out, _ragged_truth(q, paged, Lay)) < 5e-6
    np.testing.assert_array_equal(np.asarray(out)[18:], 0.0)


def test_xla_backend_checks_and_resolution():
    q, paged, lengths = _decode_case(0, 2, 32, 8, jnp.float32, batch=3)
    k, v = paged.jax_pages()
    bt, ln = jnp.asarray(paged.block_tables), jnp.asarray(lengths)
    with pytest.raises(ValueError, match="q head_dim 16 must equal k_pages head_dim 32"):
        paged_decode_attention(jnp.zeros((3, 4, 16)), k, v, bt, ln, scale=SCALE, backend="xla")
    with pytest.raises(ValueError, match="lengths must be int32"):
        paged_decode_attention(jnp.asarray(q), k, v, bt, ln.astype(jnp.float32), scale=SCALE, backend="xla")
    with pytest.raises(ValueError, match="query_start_loc has 3 entries"):
        ragged_paged_attention(jnp.asarray(q), k, v, bt, ln, jnp.zeros((3,), jnp.int32), scale=SCALE,
                               backend="xla")
    with pytest.raises(ValueError, match="backend must be one of"):
        serving_backend("fast")
    assert "xla" in kernels_pallas.BACKENDS
    assert serving_backend("reference") == "reference"
    # write_kv on the xla backend is the reference scatter.
    kn, vn = kernels_pallas.write_kv(k, v, jnp.ones((2, KV_HEADS, 32)), jnp.ones((2, KV_HEADS, 32)),
                                     jnp.array([0, -1], jnp.int32), backend="xla")
    expect = np.asarray(k).copy()
    expect[:, 0, 0] = 1.0
    np.testing.assert_array_equal(np.asarray(kn), expect)  # slot 0 written, slot -1 dropped (NaNs compare equal)
