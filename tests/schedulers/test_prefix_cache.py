"""Prefix caching in the policies, on hand-built cases through the strict executor (``sched_harness``), which
checks that every page a request reads holds its own key's contents. The random workloads are in
``test_properties.py``."""

from __future__ import annotations

import pytest
from sched_harness import run_workload

from schedulers import Request, SchedulerConfig, make_scheduler

POLICIES = ["fcfs", "vllm", "cp", "fastserve", "mlfq", "srpt", "fixed-priority"]


def _config(usable_blocks: int) -> SchedulerConfig:
    """Blocks of 4 tokens, no host pool (a preemption drops)."""
    return SchedulerConfig(num_device_blocks=usable_blocks + 1, num_host_blocks=0, block_size=4, max_model_len=64,
                           reserved_device_ids=(0,), swap_mode="recompute")


@pytest.mark.parametrize("policy", POLICIES)
def test_a_request_sharing_a_held_prefix_joins_where_its_whole_chunk_would_not_fit(policy):
    """``a`` (24 tokens, six keyed blocks) runs; ``b`` arrives with the same 24 tokens and 4 of its own.
    Seven blocks are taken, three free: ``b``'s 28-token chunk needs seven, but the six ``a`` holds cost
    nothing, so ``b`` joins at once, ``a`` keeps running, and ``b`` computes only its own 4 tokens. (Counting
    the chunk's blocks alone, every policy made ``b`` wait for ``a`` to finish, or dropped ``a``.)"""
    sched = make_scheduler(policy, _config(10))
    shared = [("system", i) for i in range(6)]
    a = Request("a", 24, 12, oracle_output_len=12, prefix_hashes=tuple(shared))
    b = Request("b", 28, 4, arrival_time=0.005, oracle_output_len=4, prefix_hashes=tuple(shared + [("b", 6)]))
    res = run_workload(sched, [(0.0, a), (0.005, b)], grow_keys=True)
    assert set(res.finished) == {"a", "b"}
    assert b.num_cached_tokens == 24 and a.num_preemptions == 0
    assert b.first_scheduled_time < a.finish_time


@pytest.mark.parametrize("policy", ["fcfs", "vllm", "cp", "fastserve"])
def test_a_recompute_takes_its_own_generated_blocks_from_the_cache(policy):
    """Two requests outgrow an 8-block pool and the later one is dropped (no host pool) after 13 new tokens;
    the executor keys its generated blocks as they fill. When it restarts, the head of its sequence is still
    cached: its prompt block and two blocks of generated tokens (12 tokens), not just the prompt's 4; the
    tail block went to the other request's growth."""
    sched = make_scheduler(policy, _config(8))
    a = Request("a", 4, 16, prefix_hashes=(("prompt", "a"),))
    b = Request("b", 4, 20, prefix_hashes=(("prompt", "b"),))
    restarts = []
    take = sched._use_prefix_cache

    def spy(r, n, alloc_tokens):
        out = take(r, n, alloc_tokens)
        restarts.append((r.request_id, r.num_tokens, r.num_cached_tokens))
        return out

    sched._use_prefix_cache = spy
    run_workload(sched, [(0.0, a), (0.0, b)], grow_keys=True)
    assert restarts == [("a", 4, 0), ("b", 4, 0), ("b", 17, 12)]
    assert sched.stats.prefix_cache_hits == 12 and b.num_preemptions == 1
