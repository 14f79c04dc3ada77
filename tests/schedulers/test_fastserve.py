"""fastserve / mlfq: hand-built scenarios for skip-join, demotion, promotion, preemption and ENST ranking.

The cost model is chosen so that quanta and prefill times are easy to compute by hand: q0 = batch-1
decode = 10 ms, quanta 10, 20, 40, 80, 160, 320 ms; prefill of a prompt of L tokens = 5 ms + L ms.
"""

from __future__ import annotations

import random

import pytest
from sched_harness import StrictExecutor, run_workload

from schedulers import FittedCostModel, KVLocation, Request, SchedulerConfig, make_scheduler

COST = FittedCostModel(p0=0.005, p1=0.001, p2=0.0, d0=0.010, d1=0.0, d2=0.0, block_bytes=1, swap_bandwidth=1e12)


def _cfg(**kw):
    base = dict(block_size=16, max_batch_size=4, max_tokens_per_batch=512, max_model_len=512,
                num_device_blocks=200, num_host_blocks=200, starvation_threshold=None)
    base.update(kw)
    return SchedulerConfig(**base)


def _fs(name="fastserve", **kw):
    return make_scheduler(name, _cfg(**kw), COST)


def _step(s, now, elapsed, finished=()):
    plan = s.schedule(now)
    s.on_step_end(plan, now + elapsed, elapsed, finished)
    return plan


def test_q0_defaults_to_the_batch1_decode_time_and_quanta_double():
    s = _fs()
    assert s.q0 == pytest.approx(0.010)
    assert s.quanta[:4] == pytest.approx([0.010, 0.020, 0.040, 0.080])
    assert make_scheduler("fastserve", _cfg(q0=0.003, quantum_ratio=3.0), COST).quanta[:3] == pytest.approx([0.003, 0.009, 0.027])


@pytest.mark.parametrize("prompt, level", [(5, 0), (6, 1), (15, 1), (16, 2), (50, 3), (100, 4), (200, 5)])
def test_skip_join_puts_a_job_in_the_first_queue_whose_quantum_covers_its_prefill(prompt, level):
    # prefill(5) = 10 ms = q0 -> Q0; prefill(6) = 11 ms -> Q1 (20 ms); prefill(16) = 21 ms -> Q2 (40 ms).
    s = _fs()
    r = Request("r", prompt, 4)
    s.add(r, 0.0)
    assert r.priority_level == level == s.join_level(prompt)
    m = _fs("mlfq")
    q = Request("q", prompt, 4)
    m.add(q, 0.0)
    assert q.priority_level == 0


def test_demotion_after_the_quantum_is_exceeded_resets_attained_service():
    s = _fs()
    r = Request("r", 5, 50)  # Q0, quantum 10 ms
    s.add(r, 0.0)
    _step(s, 0.0, 0.006)
    assert r.priority_level == 0 and r.attained_service == pytest.approx(0.006)
    _step(s, 0.006, 0.006)  # 12 ms > 10 ms
    assert r.priority_level == 1 and r.attained_service == 0.0
    for i in range(3):  # Q1's quantum is 20 ms: 18 ms stays, 24 ms demotes
        _step(s, 0.012 + 0.006 * i, 0.006)
    assert r.priority_level == 1
    _step(s, 0.030, 0.006)
    assert r.priority_level == 2 and s.stats.num_demotions == 2


def test_a_short_arrival_preempts_a_long_running_job_at_the_next_iteration():
    s = _fs(max_batch_size=1)
    ex = StrictExecutor(s)
    long = Request("long", 100, 50)  # Q4
    s.add(long, 0.0)
    ex.step(0.0)
    plan, _, _ = ex.step(0.2)
    assert [r.request_id for r in plan.decode] == ["long"]
    s.add(Request("short", 5, 3), 0.25)  # Q0
    plan, _, _ = ex.step(0.25)
    assert [e.request_id for e in plan.prefill] == ["short"] and plan.decode == []
    assert long.kv_location is KVLocation.DEVICE  # preempted at an iteration boundary, KV kept
    plan, _, _ = ex.step(0.3)
    assert [r.request_id for r in plan.decode] == ["short"]


def test_starvation_promotion_moves_an_idle_job_to_the_tail_of_q0_once_per_alpha():
    s = _fs(max_batch_size=1, starvation_threshold=0.1)
    hog = Request("hog", 5, 400)
    s.add(hog, 0.0)
    low = Request("low", 100, 5)  # Q4, never runs while hog is ahead
    s.add(low, 0.0)
    now = 0.0
    while now < 0.099:
        plan = _step(s, now, 0.001)  # 1 ms steps: hog stays ahead (demoted slowly)
        assert [r.request_id for r in plan.batch()] == ["hog"]
        now += 0.001
    assert low.priority_level == 4 and s.stats.num_promotions == 0
    plan = s.schedule(0.1005)
    assert low.priority_level == 0 and low.attained_service == 0.0 and s.stats.num_promotions == 1
    assert low.starvation_clock == 0.1005  # the clock restarts at the promotion
    assert [r.request_id for r in plan.batch()] == ["low"]  # hog has been demoted to Q2 by now
    s.on_step_end(plan, 0.1015, 0.001)
    _step(s, 0.1015, 0.001)
    assert s.stats.num_promotions == 1


def test_aging_promotes_a_starved_job_one_level_per_alpha():
    s = _fs(max_batch_size=1, starvation_threshold=0.02, promotion="one_level")
    s.add(Request("hog", 5, 400), 0.0)
    low = Request("low", 100, 5)  # joins Q4 (skip-join), never runs while hog is ahead
    s.add(low, 0.0)
    levels = []
    for i in range(7):  # 10 ms steps: low is idle for 20 ms at t = 0.02, 0.04, 0.06
        _step(s, 0.01 * i, 0.001)
        levels.append(low.priority_level)
    assert levels == [4, 4, 3, 3, 2, 2, 1]
    assert s.stats.num_promotions == 3


def test_promotion_is_checked_only_every_interval():
    s = _fs(max_batch_size=1, starvation_threshold=0.01, starvation_check_interval=5)
    s.add(Request("hog", 5, 400), 0.0)
    low = Request("low", 100, 5)
    s.add(low, 0.0)
    levels = []
    for i in range(6):
        _step(s, 0.02 * i, 0.001)
        levels.append(low.priority_level)
    assert levels == [4, 4, 4, 4, 0, 0]  # iteration 5 is the first check


def _enst_state(ranking, starving_a):
    """Three idle jobs A (Q5), B (Q3), C (Q4) on the device and four Q0 jobs filling the batch, with a
    reserve that forces one offload. Returns the plan of the step that offloads."""
    s = make_scheduler("fastserve", _cfg(num_device_blocks=29, reserve_blocks=3, offload_ranking=ranking,
                                         starvation_threshold=1.0, swap_overlap_factor=None), COST)
    ex = StrictExecutor(s)
    a, b, c = Request("A", 200, 50), Request("B", 50, 50), Request("C", 100, 50)  # 13, 4, 7 blocks
    for r in (a, b, c):
        s.add(r, 0.0)
    assert (a.priority_level, b.priority_level, c.priority_level) == (5, 3, 4)
    ex.step(0.0)  # all three prefill (elapsed 4.5 ms, no demotion)
    for i in range(4):
        s.add(Request(f"H{i}", 4, 50), 0.01)  # Q0, one block each
    if starving_a:
        a.starvation_clock = 0.01 - 0.99  # A has not run for 0.99 s: it will be promoted in 10 ms
    plan, _, _ = ex.step(0.01)
    assert sorted(r.request_id for r in plan.batch()) == ["H0", "H1", "H2", "H3"]
    return s, plan


def test_enst_offloads_the_job_expected_to_run_last():
    s, plan = _enst_state("enst", starving_a=False)
    # wait(Q5) = (4 jobs * (10+20+40+80+160) ms + B's 80+160 + C's 160) / 4 = 410 ms: the largest ENST.
    assert [r.request_id for r in plan.swapped_out] == ["A"] and plan.swap_out and not plan.sync_swap_out
    a = s.get("A")
    assert a.kv_location is KVLocation.HOST
    assert s.level_wait()[5] == pytest.approx(0.41, abs=0.01)


def test_enst_keeps_a_job_about_to_be_promoted_and_queue_order_does_not():
    s, plan = _enst_state("enst", starving_a=True)
    assert [r.request_id for r in plan.swapped_out] == ["C"]  # ENST(A) = 10 ms < ENST(C) = 170 ms
    assert s.enst(s.get("A"), 0.01) == pytest.approx(0.01, abs=1e-3)
    _, plan = _enst_state("queue_order", starving_a=True)
    assert [r.request_id for r in plan.swapped_out] == ["A"]  # the artifact: lowest priority first


def _brute_order(s, now, loc, reverse):
    reqs = [r for r in s.queue_snapshot() if r.kv_location is loc]
    return sorted(reqs, key=lambda r: s.enst(r, now), reverse=reverse)


@pytest.mark.parametrize("seed", range(6))
def test_upload_and_offload_orders_match_a_brute_force_enst_sort(seed):
    """The lazy ENST merge for uploads and the victim order equal sorting every host/device job by ENST."""
    rng = random.Random(seed)
    s = make_scheduler("fastserve", _cfg(num_device_blocks=30, num_host_blocks=400, max_batch_size=3,
                                         starvation_threshold=0.05), COST)
    ex = StrictExecutor(s)
    now = 0.0
    for i in range(60):
        if rng.random() < 0.5:
            s.add(Request(i, rng.randint(1, 120), rng.randint(20, 60)), now)
        plan, _, elapsed = ex.step(now)
        now += elapsed + 0.004
        host = _brute_order(s, now, KVLocation.HOST, reverse=False)
        got = list(s._upload_order(now))
        assert [s.enst(r, now) for r in got] == [s.enst(r, now) for r in host]
        assert {id(r) for r in got} == {id(r) for r in host}
        dev = _brute_order(s, now, KVLocation.DEVICE, reverse=True)
        victims = list(s._victim_order(now, set()))
        assert [s.enst(r, now) for r in victims] == [s.enst(r, now) for r in dev]
    assert s.stats.num_swap_outs > 0 and s.stats.num_swap_ins > 0  # the states did exercise both pools


def test_reactive_mode_swaps_on_the_critical_path_and_runs_the_job_at_once():
    s = _fs(max_batch_size=1, num_device_blocks=8, swap_mode="reactive", reserve_blocks=0)
    ex = StrictExecutor(s)
    long = Request("long", 100, 20)  # 7 blocks of the 8
    s.add(long, 0.0)
    ex.step(0.0)
    s.add(Request("short", 30, 2), 0.2)  # needs 2 blocks: long must leave
    plan, _, _ = ex.step(0.2)
    assert [r.request_id for r in plan.swapped_out] == ["long"] and plan.sync_swap_out and not plan.swap_out
    assert [e.request_id for e in plan.prefill] == ["short"]
    ex.step(0.3)
    plan, _, _ = ex.step(0.4)  # short finished: long comes back synchronously and decodes in the same step
    assert [r.request_id for r in plan.swapped_in] == ["long"] and plan.sync_swap_in
    assert [r.request_id for r in plan.decode] == ["long"]


def test_proactive_mode_uploads_ahead_and_never_computes_a_job_in_flight():
    s = _fs(max_batch_size=1, num_device_blocks=8, reserve_blocks=0, upload_margin_blocks=0)
    ex = StrictExecutor(s)
    long = Request("long", 100, 20)
    s.add(long, 0.0)
    ex.step(0.0)
    s.add(Request("short", 30, 2), 0.2)
    plan, _, _ = ex.step(0.2)  # short is blocked on memory: long is offloaded (overlapped), short waits
    assert [r.request_id for r in plan.swapped_out] == ["long"] and plan.swap_out and not plan.sync_swap_out
    assert plan.batch() == []
    plan, _, _ = ex.step(0.25)
    assert [e.request_id for e in plan.prefill] == ["short"]
    plan, fin, _ = ex.step(0.3)  # short's last token; long is not uploaded while short holds its blocks
    assert [r.request_id for r in fin] == ["short"]
    plan, _, _ = ex.step(0.35)
    assert [r.request_id for r in plan.swapped_in] == ["long"] and plan.swap_in and plan.batch() == []
    plan, _, _ = ex.step(0.4)
    assert [r.request_id for r in plan.decode] == ["long"]


def test_proactive_offload_for_a_blocked_arrival_takes_the_lowest_ranked_job_and_the_rest_keep_running():
    """The victims of a blocked request are the best ones (largest ENST), and only they sit out: the jobs that
    outrank them keep computing. (The scan used to hold out the next jobs in priority order until their blocks
    sufficed, so B, the highest-ranked running job, was offloaded while A, the lowest, computed.)"""
    s = _fs(max_batch_size=2, num_device_blocks=12, reserve_blocks=0, reserve_window=None, upload_margin_blocks=0)
    ex = StrictExecutor(s)
    s.add(Request("A", 100, 50), 0.0)  # prefill 105 ms: level 4, 7 blocks
    ex.step(0.0)
    s.add(Request("B", 20, 50), 0.001)  # 25 ms: level 2, 2 blocks
    s.add(Request("D", 40, 50), 0.001)  # 45 ms: level 3, 3 blocks; the pool is full
    ex.step(0.001)
    assert [s.get(i).priority_level for i in "ABD"] == [4, 2, 3] and s.blocks.num_free_device_blocks == 0
    s.add(Request("C", 8, 5), 0.002)  # 13 ms: level 1, needs 1 block
    plan, _, _ = ex.step(0.002)
    assert [r.request_id for r in plan.swapped_out] == ["A"] and plan.swap_out
    assert [r.request_id for r in plan.decode] == ["B", "D"]
    plan, _, _ = ex.step(0.003)
    assert [e.request_id for e in plan.prefill] == ["C"] and [r.request_id for r in plan.decode] == ["B"]


def test_proactive_sets_nobody_aside_for_a_request_that_no_offload_can_make_room_for():
    """X lacks more blocks than the free ones plus those of every job it outranks (H, above it, holds the
    rest): offloading cannot help it, so L, below it, keeps decoding beside H, as in reactive mode. (L used to
    sit out of the batch, idle, until H finished.)"""
    s = _fs(max_batch_size=4, num_device_blocks=10, reserve_blocks=0, reserve_window=None, upload_margin_blocks=0)
    ex = StrictExecutor(s, step_time=lambda plan: 0.05)
    s.add(Request("L", 10, 100), 0.0)  # 15 ms: level 1; 50 ms steps demote it to level 5 in 9 steps
    now = 0.0
    for _ in range(9):
        _, _, elapsed = ex.step(now)
        now += elapsed
    assert s.get("L").priority_level == 5 and len(s.get("L").blocks) == 2
    ex.step_time = lambda plan: 0.001
    s.add(Request("H", 64, 40), now)  # 69 ms: level 3, 4 blocks (5 once it decodes)
    ex.step(now)
    s.add(Request("X", 120, 30), now + 0.001)  # 125 ms: level 4, needs 8 blocks: 10 - H's 5 < 8
    for k in range(1, 4):
        plan, _, _ = ex.step(now + 0.001 * k)
        assert [r.request_id for r in plan.decode] == ["H", "L"] and not plan.swapped_out and not plan.prefill


def test_recompute_mode_drops_the_kv_and_reprefills_prompt_and_generated_tokens():
    s = _fs(max_batch_size=1, num_device_blocks=8, swap_mode="recompute", reserve_blocks=0)
    ex = StrictExecutor(s)
    long = Request("long", 100, 20)
    s.add(long, 0.0)
    ex.step(0.0)
    ex.step(0.1)  # long has 2 tokens now
    s.add(Request("short", 30, 1), 0.2)
    plan, _, _ = ex.step(0.2)
    assert [r.request_id for r in plan.dropped] == ["long"] and not plan.swap_out and not plan.sync_swap_out
    assert long.num_computed_tokens == 0 and long.kv_location is KVLocation.NONE
    plan, _, _ = ex.step(0.3)
    assert [(e.request_id, e.num_tokens) for e in plan.prefill] == [("long", 102)]


def test_fastserve_beats_fcfs_on_mean_latency_of_a_short_after_long_workload():
    """The point of preemption: short jobs behind a long one finish much earlier than under FCFS."""
    def mean_latency(name):
        arrivals = [(0.0, Request("long", 300, 200))]
        arrivals += [(0.01 * (i + 1), Request(i, 10, 5)) for i in range(20)]
        sched = make_scheduler(name, _cfg(max_batch_size=1), COST)
        res = run_workload(sched, arrivals, step_time=lambda plan: 0.01)
        return sum(r.finish_time - r.arrival_time for r in res.finished.values()) / len(res.finished)

    assert mean_latency("fastserve") < 0.5 * mean_latency("fcfs")
