"""fcfs (FastServe-FCFS): hand-built scenarios that pin its defining behaviour."""

from __future__ import annotations

from sched_harness import StrictExecutor, run_workload

from schedulers import KVLocation, Request, RequestState, SchedulerConfig, make_scheduler


def _cfg(**kw):
    base = dict(block_size=4, max_batch_size=4, max_tokens_per_batch=64, max_model_len=64,
                num_device_blocks=64, num_host_blocks=64)
    base.update(kw)
    return SchedulerConfig(**base)


def test_new_job_joins_the_running_batch_and_prefill_mixes_with_decode():
    s = make_scheduler("fcfs", _cfg())
    ex = StrictExecutor(s)
    a = Request("a", 8, 10)
    s.add(a, 0.0)
    plan, _, _ = ex.step(0.0)
    assert [(e.request_id, e.num_tokens) for e in plan.prefill] == [("a", 8)] and plan.decode == []
    b = Request("b", 6, 3)
    s.add(b, 0.5)
    plan, _, _ = ex.step(0.5)
    assert [(e.request_id, e.num_tokens) for e in plan.prefill] == [("b", 6)]
    assert [r.request_id for r in plan.decode] == ["a"]
    assert plan.num_batched_tokens == 7


def test_admission_is_fifo_and_stops_at_the_first_prompt_that_does_not_fit():
    s = make_scheduler("fcfs", _cfg(max_tokens_per_batch=20, max_model_len=32))
    for rid, p in (("a", 10), ("b", 12), ("c", 3)):
        s.add(Request(rid, p, 4), 0.0)
    plan = s.schedule(0.0)
    # b does not fit the remaining 10 tokens; c would, but may not overtake b.
    assert [e.request_id for e in plan.prefill] == ["a"]
    s.on_step_end(plan, 1.0, 1.0)
    plan = s.schedule(1.0)
    assert [e.request_id for e in plan.prefill] == ["b", "c"] and [r.request_id for r in plan.decode] == ["a"]


def test_batch_size_limits_joins_until_a_job_finishes():
    s = make_scheduler("fcfs", _cfg(max_batch_size=2))
    ex = StrictExecutor(s)
    s.add(Request("a", 4, 2), 0.0)
    s.add(Request("b", 4, 5), 0.0)
    s.add(Request("c", 4, 5), 0.0)
    plan, _, _ = ex.step(0.0)
    assert [e.request_id for e in plan.prefill] == ["a", "b"]
    plan, fin, _ = ex.step(1.0)  # a samples its 2nd and last token
    assert [r.request_id for r in fin] == ["a"] and [e.request_id for e in plan.prefill] == []
    plan, _, _ = ex.step(2.0)
    assert [e.request_id for e in plan.prefill] == ["c"] and [r.request_id for r in plan.decode] == ["b"]


def test_memory_shortage_swaps_out_the_most_recently_admitted_job_synchronously_and_resumes_it_first():
    # 6 device blocks of 4 tokens. a, b, c each take 2 blocks for an 8-token prompt; the first decode of
    # each needs a third block, so the newest (c) is swapped out to let a and b grow.
    s = make_scheduler("fcfs", _cfg(num_device_blocks=6, max_model_len=32))
    ex = StrictExecutor(s)
    for rid in "abc":
        s.add(Request(rid, 8, 4), 0.0)  # at most 11 cached tokens: 3 blocks each
    plan, _, _ = ex.step(0.0)
    assert [e.request_id for e in plan.prefill] == ["a", "b", "c"]
    plan, _, _ = ex.step(1.0)
    assert [r.request_id for r in plan.swapped_out] == ["c"] and plan.sync_swap_out and not plan.swap_out
    assert [r.request_id for r in plan.decode] == ["a", "b"]
    c = s.get("c")
    assert c.kv_location is KVLocation.HOST and c.state is RequestState.SWAPPED
    # A new arrival must not overtake the preempted job.
    s.add(Request("d", 4, 2), 1.5)
    now = 2.0
    while s.get("a") is not None:
        plan, _, _ = ex.step(now)
        now += 1
        assert "d" not in [e.request_id for e in plan.prefill]
    plan, _, _ = ex.step(now)
    assert [r.request_id for r in plan.swapped_in] == ["c"] and plan.sync_swap_in
    assert "c" in [r.request_id for r in plan.decode]  # a sync swap-in runs in the same step


def test_rejections_are_reported_once_and_never_run():
    s = make_scheduler("fcfs", _cfg(max_model_len=16, num_device_blocks=3))
    assert not s.add(Request("long", 17, 1), 0.0)
    assert not s.add(Request("total", 10, 7), 0.0)  # 10 + 7 > 16
    assert s.add(Request("ok", 4, 4), 0.0)
    r = Request("fat", 12, 2)  # 13 cached tokens need 4 blocks, the pool has 3
    assert not s.add(r, 0.0)
    assert r.state is RequestState.REJECTED and "usable device blocks" in r.reject_reason
    plan = s.schedule(0.0)
    reasons = dict((q.request_id, why) for q, why in plan.rejected)
    assert set(reasons) == {"long", "total", "fat"}
    assert "max_model_len 16" in reasons["long"] and "exceeds max_model_len" in reasons["total"]
    s.on_step_end(plan, 1.0, 1.0)
    assert s.schedule(1.0).rejected == []


def test_fcfs_completes_everyone_under_heavy_swapping():
    arrivals = [(0.001 * i, Request(i, 3 + (7 * i) % 13, 1 + (5 * i) % 11)) for i in range(40)]
    res = run_workload(make_scheduler("fcfs", _cfg(num_device_blocks=10, num_host_blocks=40, max_model_len=32)), arrivals)
    assert len(res.finished) == 40
    for rid, r in res.finished.items():
        assert r.num_generated_tokens == r.max_new_tokens
