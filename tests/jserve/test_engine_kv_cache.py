"""Host-offload copies move exactly the named pages (checked against a numpy model of the pages), issued
alone and beside a step; the host block-id map (pages of several swap-outs, subsets, re-used and released
ids); the engine keeps its host pages within the scheduler's accounting; the device pool is updated in
place (no whole-pool copy in the optimized HLO) and nothing compiles after warm-up with copies in flight."""

from __future__ import annotations


import re

import jax
import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.engine.engine import CompileWatch
from jserve.engine.kv_cache import KVCache, KVCacheSpec, bucket_pairs
from jserve.engine.runner import BatchRow, ModelRunner, RunnerConfig
from jserve.models import greedy_generate
from schedulers.request import KVLocation

from virtual_clock import virtual_clock


def _runner(model, num_device=24, num_host=20, swap_buckets=(2, 4), skip_idle_work=None):
    c = model.config
    kv = KVCache(KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, c.dtype), num_device, num_host)
    cfg = RunnerConfig(page_size=16, max_batch_size=2, max_tokens_per_batch=32, max_model_len=64,
                       decode_buckets=(2,), token_buckets=(32,), swap_buckets=swap_buckets,
                       penalty_slots=3,  # penalty tables [3, V]: no other array of the step has that shape
                       skip_idle_work=skip_idle_work)
    r = ModelRunner(model, kv, cfg)
    r.warmup(progress=False)
    return r


def _fill_random(kv: KVCache, seed: int) -> np.ndarray:
    """Random device pages; returns them as numpy ``[L, 2, kv_heads, pages, page_size, head_dim]``."""
    rng = np.random.default_rng(seed)
    dev = kv.device[0][0].sharding
    kv.device = [tuple(jax.device_put(rng.normal(size=a.shape).astype(np.float32), dev) for a in layer) for layer in kv.device]
    return kv.read_pages("device", range(kv.num_device_pages))


def _real(kv: KVCache) -> list[int]:
    return list(range(kv.num_device_pages - 1))  # the padding page (last) may hold anything


def test_pages_live_in_their_memory_kinds(tiny):
    r = _runner(tiny)
    kv = r.kv
    device_kind = jax.devices()[0].default_memory().kind
    assert kv.device[0][0].sharding.memory_kind == device_kind
    assert kv.host == []  # no host memory until something is swapped out
    r.copy("out", [(0, 0), (1, 5), (2, 9), (3, 10), (4, 11)])  # 5 pages: chunks of 4 and 1 (padded to 2)
    assert [a.sharding.memory_kind for a in kv.host] == ["pinned_host", "pinned_host"]
    assert [a.shape[3] for a in kv.host] == [4, 2]
    r.copy("in", [(5, 3)])
    assert kv.device[0][0].sharding.memory_kind == device_kind


def test_standalone_copies_move_exactly_the_named_pages(tiny):
    r = _runner(tiny)
    kv = r.kv
    dev0 = _fill_random(kv, 0)
    out_pairs = [(3, 7), (5, 0), (9, 11), (1, 2), (4, 19)]  # 5 pairs: chunks of 4 and 1 (padded to 2)
    r.copy("out", out_pairs)
    host = {h: dev0[:, :, :, d] for d, h in out_pairs}  # the reference: host id -> page
    got = kv.read_pages("host", list(host))
    for i, h in enumerate(host):
        np.testing.assert_array_equal(got[:, :, :, i], host[h])
    assert kv.num_host_ids == 5
    np.testing.assert_array_equal(kv.read_pages("device", _real(kv)), dev0[:, :, :, _real(kv)])  # sources kept
    in_pairs = [(7, 10), (0, 12), (11, 13)]
    r.copy("in", in_pairs)
    expect = dev0.copy()
    for h, d in in_pairs:
        expect[:, :, :, d] = host[h]
    np.testing.assert_array_equal(kv.read_pages("device", _real(kv)), expect[:, :, :, _real(kv)])


def test_copies_beside_a_step(tiny):
    r = _runner(tiny)
    kv = r.kv
    dev0 = _fill_random(kv, 1)
    r.copy("out", [(12, 1), (13, 2)])  # host pages 1, 2 hold device pages 12, 13
    # The batch computes into pages 0-2; the copies touch other pages (the scheduler guarantees that).
    rows = [BatchRow([5, 6, 7], 0, [0], (SamplingParams(), 0, 0)), BatchRow([9] * 20, 0, [1, 2], (SamplingParams(), 0, 0))]
    out_pairs = [(4, 3), (6, 5), (8, 9)]
    in_pairs = [(1, 10), (2, 11)]
    r.run(rows, swap_out=out_pairs, swap_in=in_pairs)
    dev1 = kv.read_pages("device", range(kv.num_device_pages))
    got = kv.read_pages("host", [h for _, h in out_pairs])
    for i, (d, h) in enumerate(out_pairs):  # the swap-out read the pages before the step
        np.testing.assert_array_equal(got[:, :, :, i], dev0[:, :, :, d])
    for (h, d), src in zip(in_pairs, (12, 13)):  # the swap-in wrote pages after it
        np.testing.assert_array_equal(dev1[:, :, :, d], dev0[:, :, :, src])
    untouched = [p for p in _real(kv) if p not in (0, 1, 2, 10, 11)]
    np.testing.assert_array_equal(dev1[:, :, :, untouched], dev0[:, :, :, untouched])
    assert not np.array_equal(dev1[:, :, :, 0], dev0[:, :, :, 0])  # the step wrote its own KV


def test_host_map_pages_of_several_swap_outs(tiny):
    r = _runner(tiny)
    kv = r.kv
    dev0 = _fill_random(kv, 2)
    a = [(0, 4), (1, 5), (2, 6), (3, 7)]  # request A: one chunk of 4
    b = [(8, 0), (9, 1), (10, 2), (11, 3), (12, 8)]  # request B: chunks of 4 and 1 (padded to 2)
    r.copy("out", a)
    r.copy("out", b)
    assert kv.num_host_ids == 9 and kv.host_pages_held == 4 + 4 + 2
    # A subset that spans all three buffers, in an order of its own.
    pick = [(6, 16), (8, 15), (0, 17), (2, 18), (4, 19)]
    r.copy("in", pick)
    dev1 = kv.read_pages("device", range(kv.num_device_pages))
    src_of = {h: d for d, h in a + b}
    for h, d in pick:
        np.testing.assert_array_equal(dev1[:, :, :, d], dev0[:, :, :, src_of[h]])
    others = [p for p in _real(kv) if p not in (15, 16, 17, 18, 19)]
    np.testing.assert_array_equal(dev1[:, :, :, others], dev0[:, :, :, others])
    # Re-use of host ids: release B's, write other pages under the same ids (and overwrite one of A's).
    kv.release_host([0, 1, 2, 3, 8])
    assert kv.num_host_ids == 4 and kv.host_pages_held == 4  # B's two buffers went back
    with pytest.raises(ValueError, match="host block 1 holds no data"):
        r.copy("in", [(1, 16)])
    r.copy("out", [(11, 1), (12, 0), (13, 2), (14, 7)])
    assert kv.num_host_ids == 7 and kv.host_pages_held == 4 + 4  # A's buffer is still named by 4, 5, 6
    r.copy("in", [(0, 20), (1, 21), (2, 22), (7, 16), (5, 17)])
    dev2 = kv.read_pages("device", range(kv.num_device_pages))
    for h, d, src in [(0, 20, 12), (1, 21, 11), (2, 22, 13), (7, 16, 14), (5, 17, 1)]:
        np.testing.assert_array_equal(dev2[:, :, :, d], dev0[:, :, :, src])
    assert kv.retain_host([4, 5]) == 5 and kv.num_host_ids == 2 and kv.host_pages_held == 4
    kv.release_host([4, 5, 99])
    assert kv.host == [] and kv.host_pages_held == 0


def test_host_pages_stay_within_the_schedulers_accounting(tiny):
    """A host pool that fills up: the scheduler never names more host ids than it has, the cache holds exactly
    the scheduler's host-resident pages after every step (swap-in sources and dropped requests released), and
    the outputs still equal a roomy greedy decode.

    On a virtual clock (``conftest.virtual_clock``), so the same preemptions, swaps and drops happen on any
    machine at any step speed."""
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, 256, size=int(n)))) for n in rng.integers(30, 60, size=6)]
    new = 24
    llm = virtual_clock(LLM(tiny, scheduler="fastserve", scheduler_options={"swap_mode": "proactive"},
                            max_batch_size=4, max_tokens_per_batch=64, max_model_len=128, decode_buckets=(4,),
                            token_buckets=(64,), num_device_blocks=14, num_host_blocks=6, progress=False))
    eng = llm.engine
    assert eng.runner.config.swap_buckets == (1, 4, 8)  # the default: chunks without padding
    outs = [eng.add_request(p, SamplingParams(max_tokens=new, ignore_eos=True), request_id=i) for i, p in enumerate(prompts)]

    def on_host():
        return sorted(h for r in eng.scheduler.requests.values() if r.kv_location is KVLocation.HOST for h in r.blocks)

    most, aborted = 0, None
    while eng.has_unfinished():
        eng.step()
        assert eng.kv.host_ids == on_host()
        assert eng.kv.host_pages_held <= 6
        most = max(most, len(on_host()))
        if aborted is None and on_host() and eng.stats["blocks_in"]:  # abort one request while it is on the host
            aborted = next(r.request_id for r in eng.scheduler.requests.values() if r.kv_location is KVLocation.HOST)
            assert eng.abort(aborted)
            assert eng.kv.host_ids == on_host()  # its host pages went back at once
    assert most > 0 and aborted is not None and eng.stats["drops"] > 0  # the host pool ran full
    reference = greedy_generate(tiny, prompts, new)
    assert [o.token_ids for o in outs if o.request_id != aborted] == [t for i, t in enumerate(reference) if i != aborted]
    assert eng.kv.host == [] and eng.stats["compiles_after_warmup"] == 0


def test_a_host_buffer_holds_one_requests_pages_so_host_memory_stays_within_the_pool(tiny):
    """Swap-out chunks used to mix pages of several requests; a buffer stays alive while any of its pages is
    live, so once one of its requests came back, its dead slots held memory and the buffers took more pages
    than ``num_host_blocks`` (37 of 32 here, on a virtual clock). Each request's pages now get their own
    chunks."""
    from jserve.engine.engine import request_runs
    from schedulers import Request

    a, b = Request("a", 20, 4), Request("b", 40, 4)
    a.blocks, b.blocks = [7, 3], [5, 6, 9]  # their host ids after the swap-out
    assert request_runs([(0, 7), (1, 3), (4, 5), (2, 6), (8, 9)], [a, b]) == [2, 3]
    assert request_runs([], [a]) is None
    rng = np.random.default_rng(0)
    llm = virtual_clock(LLM(tiny, scheduler="mlfq", max_batch_size=8, max_tokens_per_batch=128, max_model_len=128,
                            decode_buckets=(8,), token_buckets=(128,), num_device_blocks=24, num_host_blocks=32,
                            swap_buckets=(1, 4, 16, 64), progress=False))
    eng = llm.engine
    for _ in range(40):
        prompt = list(map(int, rng.integers(3, 256, size=int(rng.choice([5, 20, 40])))))
        eng.add_request(prompt, SamplingParams(max_tokens=int(rng.choice([5, 40, 80])), ignore_eos=True))
    most = 0
    while eng.has_unfinished():
        eng.step()
        most = max(most, eng.kv.host_pages_held)
    assert eng.stats["blocks_out"] > 100 and most == 32, most

@pytest.mark.parametrize("skip_idle_work", [True, False])
def test_no_whole_pool_copies_and_no_compiles_with_copies_in_flight(tiny, skip_idle_work):
    r = _runner(tiny, num_device=40, num_host=33, skip_idle_work=skip_idle_work)
    kv = r.kv
    ids, pos, md, samp, pen = r._pack([], 2, 2, True)
    idx = np.zeros(4, np.int32)
    staged = jax.eval_shape(r.fns.gather, kv.device, idx)
    lowered = {"step": r.fns.step.lower(r._state_leaves, ids, pos, kv.device, r.penalty_tables, md, *samp, pen,
                                        r._no_tokens, r._no_feed(2)),
               "gather": r.fns.gather.lower(kv.device, idx), "scatter": r.fns.scatter.lower(kv.device, staged, idx)}
    shape = ",".join(str(d) for d in kv.device[0][0].shape)
    tables = ",".join(str(d) for d in r.penalty_tables[0].shape)  # the step's penalty tables, donated too
    for name, low in lowered.items():
        hlo = low.compile().as_text()
        copies = [ln for ln in hlo.splitlines() if re.search(rf"\[({shape}|{tables})\]\S* copy\(", ln)]
        assert not copies, f"{name}: {len(copies)} whole-pool or whole-table copies, e.g. {copies[0].strip()[:160]}"
        logits = [ln for ln in hlo.splitlines() if re.search(rf"f32\[2,{tiny.config.vocab_size}\]\S* copy\(", ln)]
        assert not logits, f"{name}: the logits are copied (a lax.cond passing them through?): {logits[0].strip()[:160]}"
    rows = [BatchRow([5], 3, [0], (SamplingParams(), 0, 0)), BatchRow([6], 7, [1], (SamplingParams(), 0, 0))]
    with CompileWatch() as watch:
        r.copy("out", [(p, p) for p in range(2, 9)])  # 7 pages: chunks of 4 and 3 (padded to 4)
        for _ in range(2):  # copies in flight in both directions while steps run
            r.run(rows, swap_out=[(10, 20), (11, 21), (12, 22)], swap_in=[(2, 30), (5, 31), (8, 32)])
        r.copy("in", [(p, p + 20) for p in range(3, 8)])
        jax.block_until_ready((kv.device, kv.host))
    assert watch.count == 0


def test_bucket_pairs_avoid_padding():
    chunks = bucket_pairs([(i, 10 + i) for i in range(11)], (2, 4, 8), pad_src=99, pad_dst=98)
    assert [b for b, _, _ in chunks] == [8, 4]  # 11 = 8 + 3, and 3 fits 4 with one padding slot
    assert list(chunks[1][1]) == [8, 9, 10, 99] and list(chunks[1][2]) == [18, 19, 20, 98]
    assert [b for b, _, _ in bucket_pairs([(0, 0)] * 17, (4, 16, 64), 0, 0)] == [16, 4]  # not one 64-page chunk
    chunks = bucket_pairs([(i, i) for i in range(45)], (1, 2, 4, 8, 16, 32), pad_src=-1, pad_dst=-1)
    assert [b for b, _, _ in chunks] == [32, 8, 4, 1]  # powers of two: never padded
    assert [b for b, _, _ in bucket_pairs([(0, 0)] * 9, (8,), 0, 0)] == [8, 8]
