"""The Pallas decode kernel (interpret mode) against the float32 reference and against JAX's own shipped
GPU paged-attention kernel; raw kernel outputs must be fully written (interpret mode pre-fills them with
NaN, so an unwritten element survives as NaN)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged_attention

from kernel_cases import TOLERANCE, decode_lengths, make_paged, rel_err
from kernels_pallas import DecodeConfig, paged_decode_attention, paged_decode_attention_reference
from kernels_pallas.decode import DecodePlan, decode_kernel_outputs, plan_decode

BATCH, KV_HEADS, PAGES_PER_SEQ = 6, 2, 5
SCALE = 0.17

ONE_BLOCK = DecodeConfig()  # tiny tables: one split, one loop step
MULTI_BLOCK = DecodeConfig(block_kv=16, target_programs=1, masked_loads=True)  # one split, several loop steps
SPLITS = DecodeConfig(block_kv=16, num_splits=3, masked_loads=True)  # split-K with an uneven last split
UNMASKED = DecodeConfig(block_kv=16, num_splits=2, masked_loads=False)  # shipped-kernel style loads

# (q heads per KV head, head_dim, page_size, dtype, config): every ratio, head dim, page size, dtype and
# config appears, most pairs of them too.
CASES = [
    (1, 64, 8, jnp.float32, ONE_BLOCK),
    (3, 128, 16, jnp.float32, MULTI_BLOCK),
    (4, 64, 16, jnp.bfloat16, SPLITS),
    (8, 128, 8, jnp.bfloat16, UNMASKED),
    (3, 64, 8, jnp.bfloat16, SPLITS),
    (4, 128, 8, jnp.float32, UNMASKED),
    (8, 64, 16, jnp.float32, MULTI_BLOCK),
    (1, 128, 16, jnp.bfloat16, ONE_BLOCK),
    (16, 64, 8, jnp.float32, SPLITS),  # group fills the 16-row tile exactly (no padding)
]


def _case(seed, group, head_dim, page_size, dtype, poison=True):
    rng = np.random.default_rng(seed)
    lengths = decode_lengths(rng, BATCH, page_size, page_size * PAGES_PER_SEQ)
    paged = make_paged(
        rng, lengths, num_kv_heads=KV_HEADS, head_dim=head_dim, page_size=page_size,
        pages_per_seq=PAGES_PER_SEQ, dtype=dtype, poison=poison,
    )
    q = rng.standard_normal((BATCH, KV_HEADS * group, head_dim)).astype(np.float32)
    return q, paged, lengths


@pytest.mark.parametrize("group,head_dim,page_size,dtype,config", CASES)
def test_decode_kernel_matches_reference(group, head_dim, page_size, dtype, config):
    for seed in range(3):
        q, paged, lengths = _case(seed, group, head_dim, page_size, dtype)
        bt, lens = jnp.asarray(paged.block_tables), jnp.asarray(lengths)
        out = paged_decode_attention(
            jnp.asarray(q, dtype), *paged.jax_pages(), bt, lens, scale=SCALE, backend="interpret", config=config
        )
        assert out.dtype == dtype and out.shape == q.shape
        ref = paged_decode_attention_reference(
            jnp.asarray(q, dtype).astype(jnp.float32), *paged.jax_pages(jnp.float32), bt, lens, scale=SCALE
        )
        assert np.isfinite(np.asarray(out, np.float32)).all()
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"seed {seed}: relative error {err:.2e}"
        np.testing.assert_array_equal(np.asarray(out, np.float32)[lengths == 0], 0.0)


@pytest.mark.parametrize("config", [ONE_BLOCK, SPLITS], ids=["one-split", "splits"])
def test_decode_kernel_writes_every_output_element(config):
    q, paged, lengths = _case(7, 3, 64, 8, jnp.float32)
    def raw(*args):
        return decode_kernel_outputs(*args, scale=SCALE, config=config, interpret=True)[1]

    outs = jax.jit(raw)(jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lengths))
    plan = plan_decode(config, BATCH, q.shape[1], KV_HEADS, 8, PAGES_PER_SEQ)
    assert len(outs) == (1 if plan.num_splits == 1 else 3)
    for raw in outs:
        assert np.isfinite(np.asarray(raw)).all(), "an output element was never written"


@pytest.mark.parametrize(
    "group,head_dim,page_size,dtype", [(4, 64, 8, jnp.float32), (3, 128, 16, jnp.bfloat16)]
)
def test_decode_kernel_agrees_with_jax_shipped_paged_attention(group, head_dim, page_size, dtype):
    # JAX's kernel expects q pre-scaled, valid page ids everywhere and finite pages (it does not mask V).
    for seed in range(2):
        q, paged, lengths = _case(100 + seed, group, head_dim, page_size, dtype, poison=False)
        bt = jnp.asarray(np.where(paged.block_tables < 0, 0, paged.block_tables))
        qj, lens = jnp.asarray(q, dtype), jnp.asarray(lengths)
        ours = paged_decode_attention(qj, *paged.jax_pages(), bt, lens, scale=SCALE, backend="interpret")
        theirs = jax_paged_attention(
            qj * jnp.asarray(SCALE, dtype), *paged.jax_pages(), bt, lens,
            k_splits=PAGES_PER_SEQ, pages_per_compute_block=1, interpret=True,
        )
        assert rel_err(ours, theirs) < 2 * TOLERANCE[dtype]


def test_decode_under_jit_and_default_backend_is_reference_on_cpu():
    q, paged, lengths = _case(5, 4, 64, 16, jnp.float32)
    args = (jnp.asarray(q), *paged.jax_pages(), jnp.asarray(paged.block_tables), jnp.asarray(lengths))
    jitted = jax.jit(lambda *a: paged_decode_attention(*a, scale=SCALE, backend="interpret"))
    default = paged_decode_attention(*args, scale=SCALE)  # backend=None on CPU -> reference
    np.testing.assert_array_equal(np.asarray(default), np.asarray(paged_decode_attention_reference(*args, scale=SCALE)))
    assert rel_err(jitted(*args), default) < TOLERANCE[jnp.float32]


def test_decode_plan_tiles_are_powers_of_two_and_cover_the_table():
    # Group 3 (SmolLM2) pads to 16 rows, group 32 to 32; splits cover every page of the table.
    p = plan_decode(DecodeConfig(block_kv=128, target_programs=512), batch=4, num_q_heads=9, num_kv_heads=3,
                    page_size=16, pages_per_seq=256)
    assert p.rows == 16 and p.pages_per_block == 8
    # 4 * 3 programs -> 512 / 12 -> 64 wanted splits, capped at one loop step each (256 / 8 = 32).
    assert p.num_splits == 32 and p.pages_per_split == 8
    # Default loop step by occupancy: 32 tokens (2 pages) for a small grid, 64 (4 pages) for a large one.
    assert plan_decode(DecodeConfig(), 32, 32, 8, 16, 128).pages_per_block == 2
    assert plan_decode(DecodeConfig(), 64, 32, 8, 16, 128).pages_per_block == 4
    assert plan_decode(DecodeConfig(), 4, 64, 2, 16, 64).rows == 32
    # Large batch needs no split; small batch with long context gets several.
    assert plan_decode(DecodeConfig(), 256, 32, 8, 16, 256).num_splits == 1
    small = plan_decode(DecodeConfig(block_kv=128, target_programs=512), 2, 32, 8, 16, 256)
    assert small.num_splits == 32 and small.pages_per_split == 8
    # page size 8: a loop step still spans >= 16 tokens.
    assert plan_decode(DecodeConfig(block_kv=8), 1, 8, 8, 8, 3).pages_per_block == 2


def test_default_plan_follows_the_measured_rule():
    # Llama-3-8B shapes (32 q heads, 8 KV heads, pages of 16): "small work" (>= 256 programs and <= 2**19 KV
    # tokens over the grid) gets 32-token steps, 512 target programs and 2 warps; elsewhere the general rule.
    def plan(batch, ctx):
        return plan_decode(DecodeConfig(), batch, 32, 8, 16, ctx // 16)

    assert plan(32, 1024) == DecodePlan(rows=16, pages_per_block=2, num_splits=2, pages_per_split=32, num_warps=2)
    assert plan(64, 1024) == DecodePlan(rows=16, pages_per_block=2, num_splits=1, pages_per_split=64, num_warps=2)
    assert plan(64, 2048) == DecodePlan(rows=16, pages_per_block=4, num_splits=2, pages_per_split=64, num_warps=4)
    assert plan(16, 1024) == DecodePlan(rows=16, pages_per_block=2, num_splits=8, pages_per_split=8, num_warps=4)
    assert plan_decode(DecodeConfig(num_warps=8, target_programs=2048), 32, 32, 8, 16, 64).num_warps == 8
