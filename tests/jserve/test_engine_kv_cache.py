"""Host-offload copies move exactly the named pages (checked against numpy copies of the pools), both as
standalone executables and fused into a step; and the fused step updates both pools in place (no whole-pool
copy in the optimized HLO)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine.kv_cache import KVCache, KVCacheSpec, bucket_pairs
from jserve.engine.runner import BatchRow, ModelRunner, RunnerConfig
from jserve.engine.sampling import SamplingParams
from jserve.models import load


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-llama")


def _runner(model, num_device=24, num_host=20):
    c = model.config
    kv = KVCache(KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, c.dtype), num_device, num_host)
    cfg = RunnerConfig(page_size=16, max_batch_size=2, max_tokens_per_batch=32, max_model_len=64,
                       decode_buckets=(2,), token_buckets=(32,), copy_buckets=(0, 4), swap_buckets=(2, 4))
    r = ModelRunner(model, kv, cfg)
    r.warmup(progress=False)
    return r


def _fill_random(kv: KVCache, seed: int):
    rng = np.random.default_rng(seed)
    dev = kv.device[0][0].sharding
    host = kv.host[0][0].sharding
    kv.device = [tuple(jax.device_put(rng.normal(size=a.shape).astype(np.float32), dev) for a in layer) for layer in kv.device]
    kv.host = [tuple(jax.device_put(rng.normal(size=a.shape).astype(np.float32), host) for a in layer) for layer in kv.host]


def test_pools_live_in_their_memory_kinds(tiny):
    r = _runner(tiny)
    assert r.kv.host[0][0].sharding.memory_kind == "pinned_host"
    assert r.kv.device[0][0].sharding.memory_kind == jax.devices()[0].default_memory().kind
    r.copy("out", [(0, 0)])
    assert r.kv.host[0][0].sharding.memory_kind == "pinned_host"  # stays on the host after a copy


def test_standalone_copies_move_exactly_the_named_pages(tiny):
    r = _runner(tiny)
    kv = r.kv
    _fill_random(kv, 0)
    dev0 = kv.read_pages("device", range(kv.num_device_pages))
    host0 = kv.read_pages("host", range(kv.num_host_pages + 1))
    out_pairs = [(3, 7), (5, 0), (9, 11), (1, 2), (4, 19)]  # 5 pairs: buckets 4 + 2 (one padded slot)
    r.copy("out", out_pairs)
    host1 = kv.read_pages("host", range(kv.num_host_pages + 1))
    expect = host0.copy()
    for d, h in out_pairs:
        expect[:, :, :, h] = dev0[:, :, :, d]
    real = list(range(kv.num_host_pages))  # the padding page (last) may hold anything
    np.testing.assert_array_equal(host1[:, :, :, real], expect[:, :, :, real])
    in_pairs = [(7, 10), (0, 12), (11, 13)]
    r.copy("in", in_pairs)
    dev1 = kv.read_pages("device", range(kv.num_device_pages))
    expect = dev0.copy()
    for h, d in in_pairs:
        expect[:, :, :, d] = host1[:, :, :, h]
    real = list(range(kv.num_device_pages - 1))
    np.testing.assert_array_equal(dev1[:, :, :, real], expect[:, :, :, real])


def test_copies_fused_into_a_step(tiny):
    r = _runner(tiny)
    kv = r.kv
    _fill_random(kv, 1)
    dev0 = kv.read_pages("device", range(kv.num_device_pages))
    host0 = kv.read_pages("host", range(kv.num_host_pages + 1))
    # The batch computes into pages 0-1; the copies touch other pages (the scheduler guarantees that).
    rows = [BatchRow([5, 6, 7], 0, [0], (SamplingParams(), 0, 0)), BatchRow([9] * 20, 0, [1, 2], (SamplingParams(), 0, 0))]
    out_pairs = [(4, 3), (6, 5), (8, 9)]
    in_pairs = [(1, 10), (2, 11)]
    r.run(rows, swap_out=out_pairs, swap_in=in_pairs)
    host1 = kv.read_pages("host", range(kv.num_host_pages + 1))
    dev1 = kv.read_pages("device", range(kv.num_device_pages))
    for d, h in out_pairs:  # the swap-out read the pages before the step
        np.testing.assert_array_equal(host1[:, :, :, h], dev0[:, :, :, d])
    for h, d in in_pairs:  # the swap-in wrote pages after it
        np.testing.assert_array_equal(dev1[:, :, :, d], host0[:, :, :, h])
    untouched = [p for p in range(kv.num_device_pages - 1) if p not in (0, 1, 2, 10, 11)]
    np.testing.assert_array_equal(dev1[:, :, :, untouched], dev0[:, :, :, untouched])
    assert not np.array_equal(dev1[:, :, :, 0], dev0[:, :, :, 0])  # the step wrote its own KV


def test_fused_step_updates_both_pools_in_place(tiny):
    r = _runner(tiny, num_device=40, num_host=33)
    kv = r.kv
    ids, pos, md, samp = r._pack([], 2, 2, True)
    idx = np.zeros(4, np.int32)
    staged = jax.eval_shape(r.fns.gather, kv.device, idx)
    compiled = {
        "step+copies": r.fns.step_copies.lower(r._state_leaves, ids, pos, kv.device, kv.host, md, *samp, staged, idx, idx),
        "scatter": r.fns.scatter.lower(kv.device, staged, idx),
        "swap_out": r.fns.swap_out.lower(kv.device, kv.host, idx, idx),
        "swap_in": r.fns.swap_in.lower(kv.device, kv.host, idx, idx),
    }
    for name, lowered in compiled.items():
        hlo = lowered.compile().as_text()
        for pool in (kv.device, kv.host):
            shape = ",".join(str(d) for d in pool[0][0].shape)
            copies = [ln for ln in hlo.splitlines() if re.search(rf"\[{shape}\]\S* copy\(", ln)]
            assert not copies, f"{name}: {len(copies)} whole-pool copies, e.g. {copies[0].strip()[:160]}"


def test_bucket_pairs_pads_with_the_padding_pages():
    chunks = bucket_pairs([(i, 10 + i) for i in range(11)], (2, 4, 8), pad_src=99, pad_dst=98)
    assert [b for b, _, _ in chunks] == [8, 4]
    assert list(chunks[1][1]) == [8, 9, 10, 99] and list(chunks[1][2]) == [18, 19, 20, 98]
