"""The pure-jnp references (the ground truth for the kernels) against hand-computed values and against a
float64 numpy attention that knows nothing about pages."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import context_kv, decode_lengths, dense_attention, make_paged, ragged_layout, rel_err
from kernels_pallas import (
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)


def _hand_pages():
    # page_size 1; position 0 lives in page 2, position 1 in page 0; page 1 is never used (NaN).
    k = np.full((1, 3, 1, 2), np.nan, np.float32)
    v = np.full((1, 3, 1, 2), np.nan, np.float32)
    k[0, 2, 0], v[0, 2, 0] = [0.0, 0.0], [4.0, 0.0]
    k[0, 0, 0], v[0, 0, 0] = [math.log(3.0), 0.0], [0.0, 8.0]
    return jnp.asarray(k), jnp.asarray(v), jnp.array([[2, 0]], jnp.int32)


def test_decode_reference_hand_computed():
    # Scores 0 and ln 3 -> weights 1/4, 3/4 -> 1/4 * [4, 0] + 3/4 * [0, 8] = [1, 6].
    k, v, bt = _hand_pages()
    q = jnp.array([[[1.0, 0.0]]], jnp.float32)
    out = paged_decode_attention_reference(q, k, v, bt, jnp.array([2], jnp.int32), scale=1.0)
    np.testing.assert_allclose(np.asarray(out), [[[1.0, 6.0]]], rtol=1e-6)
    # Length 1 sees only position 0; length 0 (a padded row) gives zeros, not NaN.
    out1 = paged_decode_attention_reference(q, k, v, bt, jnp.array([1], jnp.int32), scale=1.0)
    np.testing.assert_allclose(np.asarray(out1), [[[4.0, 0.0]]], rtol=1e-6)
    out0 = paged_decode_attention_reference(q, k, v, bt, jnp.array([0], jnp.int32), scale=1.0)
    np.testing.assert_array_equal(np.asarray(out0), 0.0)


def test_ragged_reference_hand_computed():
    # Two new tokens of one sequence (positions 0 and 1) plus one padding token.
    k, v, bt = _hand_pages()
    q = jnp.array([[[1.0, 0.0]], [[1.0, 0.0]], [[5.0, 5.0]]], jnp.float32)
    out = ragged_paged_attention_reference(
        q, k, v, bt, jnp.array([2], jnp.int32), jnp.array([0, 2], jnp.int32), scale=1.0
    )
    np.testing.assert_allclose(np.asarray(out), [[[4.0, 0.0]], [[1.0, 6.0]], [[0.0, 0.0]]], rtol=1e-6)


@pytest.mark.parametrize("group", [1, 3])
def test_decode_reference_matches_dense(group):
    rng = np.random.default_rng(10 + group)
    page_size, pages_per_seq = 4, 5
    lengths = decode_lengths(rng, 6, page_size, page_size * pages_per_seq)
    paged = make_paged(
        rng, lengths, num_kv_heads=2, head_dim=8, page_size=page_size, pages_per_seq=pages_per_seq,
        dtype=jnp.float32,
    )
    q = rng.standard_normal((6, 2 * group, 8)).astype(np.float32)
    out = paged_decode_attention_reference(
        jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lengths), scale=0.3
    )
    for b in range(6):
        if lengths[b] == 0:
            np.testing.assert_array_equal(np.asarray(out[b]), 0.0)
            continue
        k, v = context_kv(paged, b)
        want = dense_attention(q[b : b + 1], k, v, 0.3)[0]
        assert rel_err(out[b], want) < 1e-5


def test_ragged_reference_matches_dense():
    rng = np.random.default_rng(3)
    page_size, pages_per_seq = 8, 4
    lay = ragged_layout(rng, 48, page_size, page_size * pages_per_seq)
    paged = make_paged(
        rng, lay.seq_lens, num_kv_heads=2, head_dim=16, page_size=page_size, pages_per_seq=pages_per_seq,
        dtype=jnp.float32,
    )
    q = rng.standard_normal((lay.num_tokens, 6, 16)).astype(np.float32)
    out = np.asarray(
        ragged_paged_attention_reference(
            jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lay.seq_lens),
            jnp.asarray(lay.query_start_loc), scale=0.25,
        )
    )
    for s in range(len(lay.seq_lens)):
        a, b = lay.query_start_loc[s], lay.query_start_loc[s + 1]
        if a == b:
            continue
        k, v = context_kv(paged, s)
        assert rel_err(out[a:b], dense_attention(q[a:b], k, v, 0.25)) < 1e-5
    np.testing.assert_array_equal(out[lay.query_start_loc[-1] :], 0.0)


def test_write_kv_reference_matches_loop():
    rng = np.random.default_rng(4)
    kp = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    vp = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((6, 2, 8)).astype(np.float32)
    slots = np.array([3, -1, 19, 0, 20, 7], np.int32)  # -1 and 20 (= 5 * 4, out of range) write nothing
    ok, ov = write_kv_reference(jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    wk, wv = kp.copy(), vp.copy()
    for t, slot in enumerate(slots):
        if 0 <= slot < 20:
            wk[:, slot // 4, slot % 4] = k[t]
            wv[:, slot // 4, slot % 4] = v[t]
    np.testing.assert_array_equal(np.asarray(ok), wk)
    np.testing.assert_array_equal(np.asarray(ov), wv)
