"""The Pallas ragged (prefill / chunked / mixed) kernel in interpret mode against the float32 reference,
its work-item bookkeeping against a hand-computed layout, and its raw output tiles for unwritten elements."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import TOLERANCE, make_paged, ragged_layout, rel_err
from kernels_pallas import PrefillConfig, ragged_paged_attention, ragged_paged_attention_reference
from kernels_pallas.ragged import build_work_items, plan_prefill, ragged_kernel_outputs

NUM_TOKENS, KV_HEADS, PAGES_PER_SEQ = 48, 2, 4
SCALE = 0.21

DEFAULT = PrefillConfig()
SMALL_TILES = PrefillConfig(block_q=2, block_kv=16)  # several items per sequence, several KV steps
UNMASKED = PrefillConfig(block_q=4, block_kv=16, masked_loads=False)

CASES = [  # (q heads per KV head, head_dim, page_size, dtype, config)
    (1, 64, 8, jnp.float32, SMALL_TILES),
    (3, 128, 16, jnp.float32, DEFAULT),
    (4, 64, 16, jnp.bfloat16, UNMASKED),
    (8, 128, 8, jnp.bfloat16, SMALL_TILES),
    (3, 64, 8, jnp.bfloat16, SMALL_TILES),
    (4, 128, 8, jnp.float32, UNMASKED),
    (8, 64, 16, jnp.float32, DEFAULT),
    (1, 128, 16, jnp.bfloat16, DEFAULT),
]


def _case(seed, group, head_dim, page_size, dtype):
    rng = np.random.default_rng(seed)
    lay = ragged_layout(rng, NUM_TOKENS, page_size, page_size * PAGES_PER_SEQ)
    paged = make_paged(
        rng, lay.seq_lens, num_kv_heads=KV_HEADS, head_dim=head_dim, page_size=page_size,
        pages_per_seq=PAGES_PER_SEQ, dtype=dtype,
    )
    q = rng.standard_normal((NUM_TOKENS, KV_HEADS * group, head_dim)).astype(np.float32)
    meta = (jnp.asarray(paged.block_tables), jnp.asarray(lay.seq_lens), jnp.asarray(lay.query_start_loc))
    return q, paged, lay, meta


@pytest.mark.parametrize("group,head_dim,page_size,dtype,config", CASES)
def test_ragged_kernel_matches_reference(group, head_dim, page_size, dtype, config):
    for seed in range(3):
        q, paged, lay, meta = _case(seed, group, head_dim, page_size, dtype)
        out = ragged_paged_attention(
            jnp.asarray(q, dtype), *paged.jax_pages(), *meta, scale=SCALE, backend="interpret", config=config
        )
        assert out.dtype == dtype and out.shape == q.shape
        ref = ragged_paged_attention_reference(
            jnp.asarray(q, dtype).astype(jnp.float32), *paged.jax_pages(jnp.float32), *meta, scale=SCALE
        )
        assert np.isfinite(np.asarray(out, np.float32)).all()
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"seed {seed}: relative error {err:.2e}"
        np.testing.assert_array_equal(np.asarray(out, np.float32)[lay.query_start_loc[-1] :], 0.0)


@pytest.mark.parametrize("config", [DEFAULT, SMALL_TILES], ids=["default", "small-tiles"])
def test_ragged_kernel_writes_every_output_tile(config):
    q, paged, _, meta = _case(11, 3, 64, 8, jnp.float32)

    def raw(*args):
        return ragged_kernel_outputs(*args, scale=SCALE, config=config, interpret=True)[2]

    tiles = jax.jit(raw)(jnp.asarray(q), *paged.jax_pages(), *meta)
    assert np.isfinite(np.asarray(tiles)).all(), "an output tile element was never written"


def test_work_items_hand_computed():
    # Sequences: 3 new tokens on 2 cached, an empty slot, 4 new tokens on 5 cached; one padding token.
    items = build_work_items(
        jnp.array([5, 0, 9], jnp.int32), jnp.array([0, 3, 3, 7], jnp.int32),
        num_tokens=8, block_q=2, num_items=7, capacity=64,
    )
    # Items of a sequence are listed last block first; unused items read nothing (kv_end 0).
    np.testing.assert_array_equal(np.asarray(items.seq)[:4], [0, 0, 2, 2])
    np.testing.assert_array_equal(np.asarray(items.first_pos)[:4], [4, 2, 7, 5])
    np.testing.assert_array_equal(np.asarray(items.kv_end), [5, 4, 9, 7, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(items.token_index)[:4], [[2, 3], [0, 1], [5, 6], [3, 4]])
    np.testing.assert_array_equal(np.asarray(items.row_of_token)[:7], [2, 3, 0, 6, 7, 4, 5])
    np.testing.assert_array_equal(np.asarray(items.token_valid), [True] * 7 + [False])


def test_work_items_round_trip_random_layouts():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        lay = ragged_layout(rng, NUM_TOKENS, 8, 32)
        for block_q in (1, 4, 16):
            nw = min(-(-NUM_TOKENS // block_q) + len(lay.seq_lens), NUM_TOKENS)
            it = build_work_items(
                jnp.asarray(lay.seq_lens), jnp.asarray(lay.query_start_loc),
                num_tokens=NUM_TOKENS, block_q=block_q, num_items=nw, capacity=32,
            )
            valid = np.asarray(it.token_valid)
            rows = np.asarray(it.row_of_token)[valid]
            assert len(set(rows.tolist())) == valid.sum(), "two tokens share an item row"
            np.testing.assert_array_equal(np.asarray(it.token_index).reshape(-1)[rows], np.flatnonzero(valid))
            # kv_end never exceeds the sequence's context, and every item's queries see their own key.
            seq, end = np.asarray(it.seq), np.asarray(it.kv_end)
            assert (end <= lay.seq_lens[seq]).all() and (end[end > 0] > np.asarray(it.first_pos)[end > 0]).all()


def test_prefill_plan_tiles():
    # Long prefill: 128-row tiles; SmolLM2's group of 3 pads to 4; decode-like batches shrink block_q.
    p = plan_prefill(PrefillConfig(), num_tokens=8192, num_seqs=1, group=4, page_size=16, pages_per_seq=512)
    assert (p.group_pad, p.block_q, p.rows, p.pages_per_block) == (4, 32, 128, 4)
    assert p.num_items == 8192 // 32 + 1
    p3 = plan_prefill(PrefillConfig(), 64, 64, 3, 16, 8)
    assert (p3.group_pad, p3.block_q, p3.rows) == (4, 4, 16)
    assert p3.num_items == 64
