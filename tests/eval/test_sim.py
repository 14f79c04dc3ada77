"""The simulator's event loop: closed-form latencies, the copy link, accounting, conservation, determinism,
and equality with a plain loop over ``schedule()``."""

from __future__ import annotations

import math

import pytest

from eval.records import WorkloadRequest
from eval.simulator import CopyLink, SimulationError, check_invariants, simulate, workload_requests
from schedulers import SchedulerConfig, StepPlan, make_scheduler
from schedulers.cost import FittedCostModel, default_cost_model
from schedulers.request import KVLocation, RequestState

COST = default_cost_model()  # OPT-13B / A100, DistServe fit
LINK = CopyLink(block_bytes=COST.block_bytes, bandwidth=25e9)


def _fcfs(**kw):
    cfg = SchedulerConfig(**{"num_device_blocks": 883, "num_host_blocks": 4587, **kw})
    return make_scheduler("fcfs", cfg, cost_model=COST)


def _decode_sum(prompt: int, out: int, batch: int = 1) -> float:
    """Seconds of the (out - 1) decode steps of ``batch`` identical requests, by the published fit (ms)."""
    total = 0.0
    for k in range(1, out):
        total += (19.93 + 6.27e-4 * batch * (prompt + k) + 0.0385 * batch) / 1e3
    return total


def test_single_request_latency_is_closed_form():
    w = workload_requests([(100, 50, 0.7)])
    res = simulate(_fcfs(), w, COST, LINK)
    (r,) = res.records
    prefill = (18.10 + 0.1019 * 100 + 7.12e-6 * 100**2) / 1e3
    assert r.first_token_time == pytest.approx(0.7 + prefill, rel=1e-12)
    assert r.finish_time == pytest.approx(0.7 + prefill + _decode_sum(100, 50), rel=1e-12)
    assert r.output_len == 50
    assert r.queued_time == pytest.approx(0.0, abs=1e-12)
    assert r.swapping_time == 0.0
    assert r.executing_time == pytest.approx(r.latency, rel=1e-12)
    assert len(res.iterations) == 50 and res.stop_reason == "completed"


def test_two_simultaneous_requests_share_steps_by_hand():
    w = workload_requests([(100, 20, 0.0), (300, 20, 0.0)])
    res = simulate(_fcfs(), w, COST, LINK)
    prefill = (18.10 + 0.1019 * 400 + 7.12e-6 * (100**2 + 300**2)) / 1e3
    decodes = sum((19.93 + 6.27e-4 * (100 + k + 300 + k) + 0.0385 * 2) / 1e3 for k in range(1, 20))
    for r in res.records:
        assert r.first_token_time == pytest.approx(prefill, rel=1e-12)
        assert r.finish_time == pytest.approx(prefill + decodes, rel=1e-12)


def test_idle_gap_jumps_to_next_arrival():
    w = workload_requests([(64, 8, 0.0), (64, 8, 1000.0)])
    res = simulate(_fcfs(), w, COST, LINK)
    a, b = res.records
    assert b.latency == pytest.approx(a.latency, rel=1e-9)
    assert b.first_token_time > 1000.0
    assert len(res.iterations) == 16  # no idle iterations were simulated


def test_request_arriving_mid_step_waits_for_the_boundary():
    prefill0 = COST.prefill_time(1000)
    w = workload_requests([(1000, 2, 0.0), (10, 2, prefill0 / 2)])
    res = simulate(_fcfs(), w, COST, LINK)
    late = res.records[1]
    # It is admitted at the end of the first step and queued for the half step it waited.
    assert late.queued_time == pytest.approx(prefill0 / 2, rel=1e-9)
    assert late.queued_time + late.executing_time + late.swapping_time == pytest.approx(late.latency, rel=1e-9)


def test_copy_link_half_and_full_duplex_by_hand():
    link = CopyLink(block_bytes=1_000_000, bandwidth=1e9, latency=0.001)
    assert link.one_way(0) == 0.0
    assert link.one_way(10) == pytest.approx(0.001 + 10e6 / 1e9)
    assert link.time(10, 5) == pytest.approx(0.011 + 0.006)
    full = CopyLink(block_bytes=1_000_000, bandwidth=1e9, latency=0.001, full_duplex=True)
    assert full.time(10, 5) == pytest.approx(0.011)
    with pytest.raises(ValueError, match="bandwidth"):
        CopyLink(block_bytes=1, bandwidth=0)


class _Scripted:
    """A minimal duck-typed scheduler that replays hand-written plans (tests the loop's timing rule)."""

    def __init__(self, script, config):
        self.script = list(script)
        self.config = config
        self.requests = {}
        self.blocks = None
        self.ended = []

    def add(self, request, now):
        request.state = RequestState.RUNNING
        request.kv_location = KVLocation.DEVICE
        self.requests[request.request_id] = request
        return True

    def schedule(self, now):
        make = self.script.pop(0) if self.script else (lambda reqs: StepPlan())
        return make(self.requests)

    def on_step_end(self, plan, now, elapsed, finished_ids=()):
        self.ended.append((now, elapsed))
        done = []
        for e in plan.prefill:
            e.request.num_computed_tokens += e.num_tokens
            e.request.num_generated_tokens += 1
        for r in plan.decode:
            r.num_computed_tokens += 1
            r.num_generated_tokens += 1
        for r in plan.batch():
            if r.num_generated_tokens >= r.max_new_tokens:
                r.state = RequestState.FINISHED
                done.append(self.requests.pop(r.request_id))
        return done


def test_step_duration_is_sync_plus_max_of_compute_and_overlapped_copies():
    from schedulers.plan import PrefillEntry

    link = CopyLink(block_bytes=COST.block_bytes, bandwidth=25e9)
    blk = COST.block_bytes / 25e9
    script = [
        # Step 1: prefill with 100 overlapped blocks out (more than the compute hides).
        lambda reqs: StepPlan(prefill=[PrefillEntry(reqs[0], 100)], swap_out=[(i, i) for i in range(100)]),
        # Step 2: decode with 3 sync blocks in and 1 overlapped block (hidden).
        lambda reqs: StepPlan(decode=[reqs[0]], sync_swap_in=[(i, i) for i in range(3)], swap_in=[(9, 9)]),
    ]
    res = simulate(_Scripted(script, SchedulerConfig()), workload_requests([(100, 2, 0.0)]), COST, link)
    it = res.iterations.as_arrays()
    compute1 = COST.prefill_time(100)
    assert it["duration"][0] == pytest.approx(max(compute1, 100 * blk))
    assert it["overlap_copy"][0] == pytest.approx(100 * blk)
    compute2 = COST.decode_time(1, 101)
    assert it["duration"][1] == pytest.approx(3 * blk + max(compute2, blk))
    assert list(it["blocks_out"]) == [100, 0] and list(it["blocks_in"]) == [0, 4]
    (r,) = res.records
    # Swapping time: the overlapped copy that outlasted compute, plus the critical-path copy.
    assert r.swapping_time == pytest.approx((100 * blk - compute1) + 3 * blk)
    assert r.executing_time == pytest.approx(compute1 + compute2)
    assert r.latency == pytest.approx(r.executing_time + r.swapping_time)
    assert res.stats["bytes_out"] == 100 * COST.block_bytes


def test_stalled_scheduler_stops_and_reports_unfinished():
    res = simulate(_Scripted([], SchedulerConfig()), workload_requests([(10, 5, 0.0), (10, 5, 2.0)]), COST, LINK)
    assert res.stop_reason == "stalled"
    assert res.num_finished == 0
    assert all(r.finish_time is None and r.first_token_time is None for r in res.records)
    assert res.records[0].queued_time == pytest.approx(2.0)  # waited until the run gave up at t=2


def test_horizon_and_rejection():
    w = workload_requests([(3000, 10, 0.0), (50, 500, 0.0), (50, 500, 0.0)])
    res = simulate(_fcfs(), w, COST, LINK, horizon=1.0)
    rejected, a, b = res.records
    assert rejected.rejected_reason and rejected.finish_time is None
    assert res.stop_reason == "horizon"
    assert a.finish_time is None and 0 < a.output_len < 500
    assert a.first_token_time is not None


def _random_workload(n=60, seed=3, rate=4.0):
    from eval.workloads import WorkloadSpec, make_workload

    return make_workload(WorkloadSpec(dataset="sharegpt", num_requests=n, rate=rate), seed)


@pytest.mark.parametrize(
    "policy, swap_mode",
    [(p, "proactive") for p in ("fcfs", "fastserve", "mlfq", "vllm", "cp", "static", "fixed-priority", "srpt")]
    + [("fastserve", "reactive"), ("fastserve", "recompute")],
)
def test_conservation_under_memory_pressure(policy, swap_mode):
    cfg = SchedulerConfig(num_device_blocks=120, num_host_blocks=400, max_batch_size=8, swap_mode=swap_mode)
    sched = make_scheduler(policy, cfg, cost_model=COST)
    w = _random_workload()
    usable = cfg.num_device_blocks
    res = simulate(sched, w, COST, LINK, check=True)
    assert res.stop_reason == "completed"
    # Every request finished exactly once, with exactly its output length.
    assert [r.request_id for r in res.records] == [x.request_id for x in w]
    for r, x in zip(res.records, w):
        if r.rejected_reason is None:
            assert r.finish_time is not None and r.output_len == x.output_len
            assert r.queued_time + r.swapping_time + r.executing_time == pytest.approx(r.latency, rel=1e-9)
    # Blocks: never more in use than exist, all returned at the end.
    it = res.iterations.as_arrays()
    assert it["device_used"].max() <= usable and it["host_used"].max() <= cfg.num_host_blocks
    assert sched.blocks.num_free_device_blocks == usable
    assert sched.blocks.num_free_host_blocks == cfg.num_host_blocks
    assert not sched.requests
    # The pool really was short: every policy that can preempt did.
    if policy != "static":
        assert res.stats["swaps_out"] + res.stats["drops"] > 0, res.stats
    # Bytes moved each way match the blocks the plans listed.
    assert res.stats["bytes_out"] == it["blocks_out"].sum() * LINK.block_bytes


def test_determinism_by_seed():
    w = _random_workload(seed=5)
    one = simulate(_fcfs(), w, COST, LINK)
    two = simulate(_fcfs(), _random_workload(seed=5), COST, LINK)
    assert one.records == two.records
    assert one.iterations.as_arrays()["duration"].tolist() == two.iterations.as_arrays()["duration"].tolist()
    other = simulate(_fcfs(), _random_workload(seed=6), COST, LINK)
    assert other.records != one.records


def _reference_loop(sched, workload, cost: FittedCostModel):
    """A plain loop over schedule() with the same costs, written independently of the simulator: returns
    (start, duration, batch ids) per non-empty step."""
    pending = sorted(workload, key=lambda w: w.arrival_time)
    from schedulers.request import Request

    now, i, steps = 0.0, 0, []
    while i < len(pending) or sched.has_unfinished():
        while i < len(pending) and pending[i].arrival_time <= now:
            w = pending[i]
            sched.add(Request(w.request_id, w.prompt_len, w.output_len, arrival_time=w.arrival_time,
                              oracle_output_len=w.output_len), now)
            i += 1
        if not sched.has_unfinished():
            now = pending[i].arrival_time
            continue
        plan = sched.schedule(now)
        if plan.is_empty:
            sched.on_step_end(plan, now, 0.0)
            now = pending[i].arrival_time
            continue
        pre = [(e.num_tokens, e.request.num_computed_tokens) for e in plan.prefill]
        dec = [r.num_computed_tokens + 1 for r in plan.decode]
        compute = cost.step_time(pre, dec)
        sync = cost.swap_time(len(plan.sync_swap_out)) + cost.swap_time(len(plan.sync_swap_in))
        overlap = cost.swap_time(len(plan.swap_out)) + cost.swap_time(len(plan.swap_in))
        dur = sync + max(compute, overlap)
        steps.append((now, dur, tuple(r.request_id for r in plan.batch())))
        sched.on_step_end(plan, now + dur, dur)
        now += dur
    return steps


@pytest.mark.parametrize("policy", ["fcfs", "fastserve"])
def test_schedule_matches_a_plain_loop(policy):
    cfg = SchedulerConfig(num_device_blocks=150, num_host_blocks=600, max_batch_size=8)
    w = _random_workload(n=50, seed=11, rate=3.0)
    ref = _reference_loop(make_scheduler(policy, cfg, cost_model=COST), w, COST)
    seen = []
    simulate(make_scheduler(policy, cfg, cost_model=COST), w, COST, LINK,
             on_step=lambda now, plan, dur: seen.append((now, dur, tuple(r.request_id for r in plan.batch()))))
    assert len(seen) == len(ref)
    for (t0, d0, b0), (t1, d1, b1) in zip(seen, ref):
        assert b0 == b1
        assert t0 == pytest.approx(t1, rel=1e-9, abs=1e-12) and d0 == pytest.approx(d1, rel=1e-9)


def test_check_invariants_catches_a_bad_plan():
    sched = _fcfs()
    from schedulers.request import Request

    r = Request(1, 10, 5)
    sched.add(r, 0.0)
    plan = sched.schedule(0.0)
    plan.decode.append(Request(99, 10, 5))  # a request the scheduler does not own
    with pytest.raises(SimulationError, match="not live"):
        check_invariants(sched, plan)


def test_request_timeline_records_levels():
    w = workload_requests([(100, 5, 0.0), (20, 5, 0.01)])
    res = simulate(_fcfs(), w, COST, LINK, record_requests=True)
    times, levels = res.timeline.level_steps(0)
    assert times and levels == [0]
    assert res.timeline.events[0][-1][3] == "finished"
    assert math.isclose(res.timeline.events[1][-1][0], res.records[1].finish_time)


def test_workload_request_type():
    w = workload_requests([(5, 6, 0.5)])
    assert w == [WorkloadRequest(0, 5, 6, 0.5)]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("bad, match", [
    (WorkloadRequest(0, 10, 5, math.nan), r"workload\[1\] \(request 0\): arrival_time .* got nan"),
    (WorkloadRequest(0, 10, 5, math.inf), r"workload\[1\] \(request 0\): arrival_time .* got inf"),
    (WorkloadRequest(0, 10, 5, -1.0), r"workload\[1\] \(request 0\): arrival_time .* got -1.0"),
    (WorkloadRequest(0, 10, 0, 0.0), r"workload\[1\] \(request 0\): output_len .* got 0"),
    (WorkloadRequest(0, 0, 5, 0.0), r"workload\[1\] \(request 0\): prompt_len .* got 0"),
])
def test_a_bad_workload_request_is_named_before_the_run(bad, match):
    """A NaN arrival time used to spin the loop forever (``now`` became NaN and nothing ever arrived)."""
    w = [WorkloadRequest(7, 10, 5, 0.0), bad]
    with pytest.raises(ValueError, match=match):
        simulate(_fcfs(), w, COST, LINK)


def test_duplicate_request_ids_in_a_workload_are_an_error():
    """Two requests with one id, the second arriving after the first finished, used to be accepted and both
    records reported the second request's times."""
    w = [WorkloadRequest(3, 10, 5, 0.0), WorkloadRequest(3, 20, 5, 100.0)]
    with pytest.raises(ValueError, match=r"workload\[1\]: request id 3 repeats workload\[0\]"):
        simulate(_fcfs(), w, COST, LINK)


def test_bad_horizon_or_iteration_cap_is_an_error():
    """horizon=NaN used to be ignored silently (every comparison with NaN is false: the run went to completion)."""
    w = workload_requests([(10, 5, 0.0)])
    for horizon in (math.nan, "10"):
        with pytest.raises(ValueError, match=r"simulate: horizon must be None or a number, got"):
            simulate(_fcfs(), w, COST, LINK, horizon=horizon)
    with pytest.raises(ValueError, match=r"simulate: max_iterations must be an int >= 0, got -1"):
        simulate(_fcfs(), w, COST, LINK, max_iterations=-1)
    assert simulate(_fcfs(), w, COST, LINK, horizon=math.inf).stop_reason == "completed"


class _Thrashing(_Scripted):
    """Computes one prompt token of the first live request per step and drops its KV every 5 tokens, so it never
    reaches its last token: steps run forever and nothing is sampled. (The fastserve family does this for real
    with no host pool, a 16-token budget and recomputes longer than starvation_threshold: docs/eval.md.)"""

    def __init__(self, config):
        super().__init__([], config)

    def schedule(self, now):
        from schedulers.plan import PrefillEntry

        return StepPlan(prefill=[PrefillEntry(next(iter(self.requests.values())), 1)])

    def on_step_end(self, plan, now, elapsed, finished_ids=()):
        r = plan.prefill[0].request
        r.num_computed_tokens = (r.num_computed_tokens + 1) % 5
        return []


def test_a_livelocked_scheduler_is_stopped_and_reported():
    """Found as a real fastserve livelock that spun a run to max_iterations (20 million). The loop stops once
    no token was sampled for livelock_iterations + 4 * max_model_len * live iterations: 50 + 4 * 64 * 1 = 306,
    so at the 307th step."""
    res = simulate(_Thrashing(SchedulerConfig(max_model_len=64)), workload_requests([(40, 10, 0.0)]), COST, LINK,
                   livelock_iterations=50)
    assert res.stop_reason == "livelock" and len(res.iterations) == 307
    (r,) = res.records  # unfinished, reported, not dropped
    assert r.finish_time is None and r.first_token_time is None and r.output_len == 0


def test_long_chunked_prefills_are_not_mistaken_for_a_livelock():
    """One 2000-token prompt at 16 tokens a step samples nothing for 125 steps, far beyond a 10-step window,
    yet it is progress: the window grows with the live requests' possible work (4 * max_model_len each)."""
    cfg = SchedulerConfig(block_size=16, max_batch_size=1, max_tokens_per_batch=16, num_device_blocks=126,
                          num_host_blocks=0)
    res = simulate(make_scheduler("fcfs", cfg, cost_model=COST), workload_requests([(2000, 3, 0.0)]), COST, LINK,
                   livelock_iterations=10)
    assert res.stop_reason == "completed" and res.num_finished == 1 and len(res.iterations) == 125 + 2


# ------------------------------------------------------------------------------------------ saturation throughput

FLAT = FittedCostModel(p0=0.01, p1=0.0, p2=0.0, d0=0.01, d1=0.0, d2=0.0)  # every step costs 10 ms


@pytest.mark.parametrize("policy", ["fcfs", "vllm", "fastserve", "static", "cp"])
def test_saturation_throughput_of_identical_requests_by_hand(policy):
    # 40 requests of 8 + 10 tokens, batches of 4: each wave of 4 takes 10 steps (a prefill that samples the
    # first token, 9 decodes) of 10 ms, so 4 requests per 0.1 s, whatever the policy's order.
    from eval.simulator import saturation_throughput
    cfg = SchedulerConfig(max_batch_size=4, num_device_blocks=64, num_host_blocks=64)
    work = workload_requests([(8, 10, 5.0 * k) for k in range(40)])  # arrival times are ignored
    rate = saturation_throughput(lambda: make_scheduler(policy, cfg, cost_model=FLAT), work, FLAT, LINK)
    assert rate == pytest.approx(40.0, rel=1e-9)


def test_saturation_throughput_counts_the_steps_a_token_budget_adds():
    # vLLM prefills apart from decodes; a 16-token budget fits two 8-token prompts a step: a wave of 4 takes
    # 2 prefill steps + 9 decode steps = 11 steps, 4 / 0.11 req/s (a full-batch estimate would say 40)
    from eval.simulator import saturation_throughput
    cfg = SchedulerConfig(max_batch_size=4, max_tokens_per_batch=16, num_device_blocks=64, num_host_blocks=64)
    work = workload_requests([(8, 10, 0.0)] * 40)
    rate = saturation_throughput(lambda: make_scheduler("vllm", cfg, cost_model=FLAT), work, FLAT, LINK)
    assert rate == pytest.approx(4 / 0.11, rel=1e-9)


def test_saturation_throughput_refuses_what_it_cannot_measure():
    from eval.simulator import saturation_throughput
    cfg = SchedulerConfig(max_batch_size=4, num_device_blocks=64, num_host_blocks=64, max_model_len=64)
    fcfs = lambda: make_scheduler("fcfs", cfg, cost_model=FLAT)  # noqa: E731
    with pytest.raises(ValueError, match="at least one request"):
        saturation_throughput(fcfs, [], FLAT, LINK)
    with pytest.raises(ValueError, match="1 of 2 requests finished"):  # one request can never fit the model
        saturation_throughput(fcfs, workload_requests([(8, 10, 0.0), (60, 10, 0.0)]), FLAT, LINK)
    free = FittedCostModel(p0=0.0, p1=0.0, p2=0.0, d0=0.0, d1=0.0, d2=0.0)
    with pytest.raises(ValueError, match="charges nothing"):
        saturation_throughput(lambda: make_scheduler("fcfs", cfg, cost_model=free), workload_requests([(8, 2, 0.0)]),
                              free, LINK)


def test_a_policy_with_more_than_63_levels_keeps_its_level_masks_in_the_trace_arrays():
    """num_queues may be up to 1024; a level above 62 made as_arrays() raise OverflowError (int64 column)."""
    cfg = SchedulerConfig(block_size=16, num_device_blocks=64, num_host_blocks=0, max_batch_size=2,
                          max_tokens_per_batch=256, max_model_len=256, num_queues=80, quantum_ratio=1.0, q0=1e-4)
    res = simulate(make_scheduler("fastserve", cfg, COST), workload_requests([(40, 100, 0.0), (40, 100, 0.0)]),
                   COST, LINK, check=True)
    masks = res.iterations.as_arrays()["levels_mask"]  # each step demotes: the levels pass 63 on the way to 79
    assert max(masks) >= 2**63 and list(masks) == res.iterations.levels_mask
