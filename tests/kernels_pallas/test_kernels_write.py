"""KV writes (Pallas in interpret mode, and the XLA scatter) against the reference, and an engine-like
pipeline: write_kv + ragged prefill, chunked prefill mixed with decode, then decode steps, all checked
against dense causal attention over the full history of each sequence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import TOLERANCE, dense_attention, rel_err
from kernels_pallas import paged_decode_attention, ragged_paged_attention, write_kv, write_kv_reference
from kernels_pallas.kv_write import write_kv_xla


def _write_case(seed, page_dtype):
    rng = np.random.default_rng(seed)
    kvh, pages, ps, d, t = 3, 6, 8, 64, 9
    kp = rng.standard_normal((kvh, pages, ps, d)).astype(np.float32)
    vp = rng.standard_normal((kvh, pages, ps, d)).astype(np.float32)
    kp[:, 4] = np.nan  # poison a whole page that nothing writes to: it must stay NaN
    slots = rng.permutation(np.concatenate([np.arange(0, 32), np.arange(40, 48)]))[:t].astype(np.int32)
    slots[[2, 5]] = [-1, pages * ps]  # padding (-1) and out of range: both write nothing
    k = rng.standard_normal((t, kvh, d)).astype(np.float32)
    v = rng.standard_normal((t, kvh, d)).astype(np.float32)
    return (jnp.asarray(kp, page_dtype), jnp.asarray(vp, page_dtype), jnp.asarray(k), jnp.asarray(v),
            jnp.asarray(slots))


@pytest.mark.parametrize("page_dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_kernel_and_scatter_match_reference(page_dtype):
    for seed in range(2):
        args = _write_case(seed, page_dtype)
        want_k, want_v = write_kv_reference(*args)
        # The case really writes: 7 of 9 tokens land, the other two (slot -1 and one past the end) do not.
        before, after = np.asarray(args[0], np.float32), np.asarray(want_k, np.float32)
        same = (before == after) | (np.isnan(before) & np.isnan(after))
        changed = ~np.all(same, axis=(0, 3))  # [pages, page_size]
        assert changed.sum() == 7
        for got_k, got_v in (write_kv(*args, backend="interpret"), write_kv_xla(*args)):
            assert got_k.dtype == page_dtype and got_v.dtype == page_dtype
            np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
            np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
            assert np.isnan(np.asarray(got_k, np.float32)[:, 4]).all(), "an unwritten page was touched"


def test_write_kv_in_place_under_donation():
    kp, vp, k, v, slots = _write_case(3, jnp.float32)
    want_k, want_v = write_kv_reference(kp, vp, k, v, slots)
    step = jax.jit(functools.partial(write_kv, backend="interpret"), donate_argnums=(0, 1))
    got_k, got_v = step(jnp.array(kp), jnp.array(vp), k, v, slots)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))


class _Sequence:
    """One sequence's history (dense K/V in numpy) and its pages in the paged cache."""

    def __init__(self, free_pages):
        self.free = free_pages
        self.pages: list[int] = []
        self.k = np.zeros((3, 0, 64), np.float32)
        self.v = np.zeros((3, 0, 64), np.float32)

    @property
    def length(self) -> int:
        return self.k.shape[1]

    def slots_for(self, n: int, page_size: int) -> list[int]:
        out = []
        for pos in range(self.length, self.length + n):
            if pos // page_size == len(self.pages):
                self.pages.append(self.free.pop())
            out.append(self.pages[pos // page_size] * page_size + pos % page_size)
        return out


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_paged_pipeline_matches_dense_causal_attention(backend):
    # SmolLM2-like heads (9 q heads over 3 KV heads, head_dim 64); the cache starts all-NaN, so only
    # slots written through write_kv may ever influence an output.
    rng = np.random.default_rng(21)
    kvh, hq, d, ps, num_pages, pages_per_seq, scale = 3, 9, 64, 8, 16, 4, 0.125
    cache = (jnp.full((kvh, num_pages, ps, d), jnp.nan), jnp.full((kvh, num_pages, ps, d), jnp.nan))
    free = [int(p) for p in rng.permutation(num_pages)]
    seqs = [_Sequence(free), _Sequence(free)]
    steps = [(11, 5), (6, 1), (1, 1), (1, 1)]  # new tokens per sequence: prefill, chunk + decode, decodes
    for new in steps:
        num_tokens = 24 if max(new) > 1 else 2  # padded bucket for prefill steps, exact for decode
        q = rng.standard_normal((num_tokens, hq, d)).astype(np.float32)
        k = rng.standard_normal((num_tokens, kvh, d)).astype(np.float32)
        v = rng.standard_normal((num_tokens, kvh, d)).astype(np.float32)
        slot_mapping = np.full(num_tokens, -1, np.int32)
        qsl, start = [0], 0
        for s, n in zip(seqs, new):
            slot_mapping[start : start + n] = s.slots_for(n, ps)
            s.k = np.concatenate([s.k, k[start : start + n].transpose(1, 0, 2)], axis=1)
            s.v = np.concatenate([s.v, v[start : start + n].transpose(1, 0, 2)], axis=1)
            start += n
            qsl.append(start)
        block_tables = np.zeros((2, pages_per_seq), np.int32) - 1
        for i, s in enumerate(seqs):
            block_tables[i, : len(s.pages)] = s.pages
        seq_lens = jnp.asarray([s.length for s in seqs], jnp.int32)
        cache = write_kv(*cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slot_mapping), backend=backend)
        if max(new) == 1:
            out = paged_decode_attention(
                jnp.asarray(q), *cache, jnp.asarray(block_tables), seq_lens, scale=scale, backend=backend
            )
        else:
            out = ragged_paged_attention(
                jnp.asarray(q), *cache, jnp.asarray(block_tables), seq_lens, jnp.asarray(qsl, jnp.int32),
                scale=scale, backend=backend,
            )
        out = np.asarray(out)
        for i, s in enumerate(seqs):
            want = dense_attention(q[qsl[i] : qsl[i + 1]], s.k, s.v, scale)
            assert rel_err(out[qsl[i] : qsl[i + 1]], want) < TOLERANCE[jnp.float32], (new, i)
        np.testing.assert_array_equal(out[qsl[-1] :], 0.0)
