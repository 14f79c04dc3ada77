"""The discrete-event loop: drive any ``schedulers.Scheduler`` through the executor contract, on a cost model.

Flow of one iteration (the order ``schedulers.plan`` fixes for every executor):

1. Every workload request whose arrival time is ``<= now`` is ``add``-ed (at ``now``; its ``arrival_time``
   keeps the true arrival, so time spent before the step boundary counts as queuing).
2. ``plan = scheduler.schedule(now)``.
3. Duration: ``sync = link.time(sync_swap_out, sync_swap_in)`` (critical path), ``compute`` from the cost
   model (``plan_compute_time``, read before ``on_step_end``), ``overlap = link.time(swap_out, swap_in)``;
   ``duration = sync + max(compute, overlap)``. Swaps hidden behind compute cost nothing; swaps on the
   critical path, and overlapped copies longer than the compute, do.
4. ``scheduler.on_step_end(plan, now + duration, duration)``; finished requests are recorded.

When the scheduler has nothing to run, time jumps to the next arrival. Every ``schedule`` call is followed by
an ``on_step_end`` call, even for an empty plan (elapsed 0), so schedulers see the same call sequence as on
the engine.

Per request, the time from arrival to finish splits into ``executing`` (compute time of steps it ran in),
``swapping`` (critical-path copy time of those steps plus any overlapped-copy time that outlasted their
compute) and ``queued`` (the rest: waiting, including while its own KV was being offloaded or uploaded
behind other requests' compute).
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from schedulers import contract
from schedulers.cost import IterationCostModel
from schedulers.request import KVLocation, Request

from ..records import RequestRecord, WorkloadRequest
from .link import CopyLink
from .trace import IterationTrace, RequestTimeline

DEFAULT_MAX_ITERATIONS = 20_000_000
DEFAULT_LIVELOCK_ITERATIONS = 100_000


class SimulationError(RuntimeError):
    """The scheduler broke the executor contract (``check=True``), or the run could not proceed."""


@dataclass
class SimResult:
    records: list[RequestRecord]  # one per workload request, in workload order
    iterations: IterationTrace
    end_time: float  # simulated seconds when the run stopped
    stop_reason: str  # "completed" | "stalled" | "livelock" | "horizon" | "max_iterations"
    wall_seconds: float  # real time the loop took
    timeline: RequestTimeline | None = None
    stats: dict = field(default_factory=dict)

    @property
    def num_finished(self) -> int:
        return sum(1 for r in self.records if r.finish_time is not None)


def _pool_usage_reader(scheduler) -> Callable[[], tuple[int, int]]:
    """A cheap function returning (device blocks used, host blocks used) for ``scheduler``'s block manager."""
    bm = getattr(scheduler, "blocks", None)
    for dev_attr, host_attr, mode in (
        ("num_used_device_blocks", "num_used_host_blocks", "used"),
        ("num_free_device_blocks", "num_free_host_blocks", "free"),
    ):
        if bm is not None and hasattr(bm, dev_attr) and hasattr(bm, host_attr):
            total_dev = scheduler.config.num_device_blocks
            total_host = scheduler.config.num_host_blocks

            def read(bm=bm, dev_attr=dev_attr, host_attr=host_attr, mode=mode, td=total_dev, th=total_host):
                dev, host = getattr(bm, dev_attr), getattr(bm, host_attr)
                dev, host = (dev() if callable(dev) else dev), (host() if callable(host) else host)
                return (dev, host) if mode == "used" else (td - dev, th - host)

            return read

    def count(scheduler=scheduler):  # fallback: walk the live requests
        dev = host = 0
        for r in scheduler.requests.values():
            if r.kv_location is KVLocation.DEVICE:
                dev += len(r.blocks)
            elif r.kv_location is KVLocation.HOST:
                host += len(r.blocks)
        return dev, host

    return count


def check_invariants(scheduler, plan, reported: set | None = None) -> None:
    """Contract checks after ``schedule`` (used by ``check=True`` and the tests). Raises ``SimulationError``.

    The rules are ``schedulers.contract.check_plan``'s (the test harness checks the same ones): batch size and
    token budget, every batch member live, RUNNING and on the device with a table that covers its tokens, no
    computing on KV that an overlapped swap-in is still bringing, no write to a page another request holds or
    an overlapped copy touches, swap pairs inside the pools. Then the scheduler's own ``check_invariants()``
    (block accounting and its queues) when it has one; a scheduler without one gets a plain ownership check of
    the pools. ``reported``: ids already reported rejected by earlier plans (a second report fails)."""
    try:
        contract.check_plan(scheduler, plan, reported)
        own = getattr(scheduler, "check_invariants", None)
        if callable(own):
            own()
        else:
            _check_pools(scheduler)
    except AssertionError as exc:
        raise SimulationError(f"{getattr(scheduler, 'name', type(scheduler).__name__)}: {exc}") from exc


def check_step_end(scheduler, finished) -> None:
    """Contract checks after ``on_step_end`` (``check=True``): the finished requests are finished and hold no
    KV, and the scheduler's own ``check_invariants()`` holds. Raises ``SimulationError``."""
    try:
        contract.check_step_end(scheduler, finished)
    except AssertionError as exc:
        raise SimulationError(f"{getattr(scheduler, 'name', type(scheduler).__name__)}: {exc}") from exc


def _check_pools(scheduler) -> None:
    """For a scheduler without ``check_invariants``: live requests' blocks are distinct pages of their pool."""
    cfg = scheduler.config
    for pool, total in ((KVLocation.DEVICE, cfg.num_device_blocks), (KVLocation.HOST, cfg.num_host_blocks)):
        seen: set[int] = set()
        used = 0
        for r in scheduler.requests.values():
            if r.kv_location is pool:
                used += len(r.blocks)
                seen.update(r.blocks)
        if len(seen) != used:
            raise AssertionError(f"two live requests share a {pool.value} block")
        if used > total or (seen and (min(seen) < 0 or max(seen) >= total)):
            raise AssertionError(f"{pool.value} blocks out of range: {used} used of {total}")


def simulate(
    scheduler,
    workload: Sequence[WorkloadRequest],
    cost: IterationCostModel,
    link: CopyLink,
    *,
    horizon: float | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    livelock_iterations: int = DEFAULT_LIVELOCK_ITERATIONS,
    record_requests: bool = False,
    check: bool = False,
    on_step: Callable[[float, object, float], None] | None = None,
) -> SimResult:
    """Run ``workload`` through ``scheduler`` and return per-request records and the iteration trace.

    ``horizon`` stops the run at that simulated time (requests still running are reported unfinished);
    ``check`` validates every plan and the scheduler's state after every step against the executor contract
    (``check_invariants``, ``check_step_end``; slow) and raises ``SimulationError`` at the first fault;
    ``on_step(now, plan, duration)`` is called after each non-empty step (for tests and notebooks). A run in
    which steps keep running but no request samples a token for ``livelock_iterations + 4 * max_model_len *
    live requests`` iterations stops with ``livelock`` (each sample-free step computes at least one prompt
    token unless KV is dropped, so a live request can legitimately go at most about ``max_model_len`` steps
    per recompute without sampling)."""
    from schedulers.cost import plan_compute_time

    wall0 = _time.perf_counter()
    bad_horizon = isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or horizon != horizon
    if horizon is not None and bad_horizon:
        raise ValueError(f"simulate: horizon must be None or a number, got {horizon!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"simulate: max_iterations must be an int >= 0, got {max_iterations!r}")
    if isinstance(livelock_iterations, bool) or not isinstance(livelock_iterations, int) or livelock_iterations < 1:
        raise ValueError(f"simulate: livelock_iterations must be an int >= 1, got {livelock_iterations!r}")
    max_model_len = getattr(getattr(scheduler, "config", None), "max_model_len", 2048)
    _check_workload(workload)
    order = sorted(range(len(workload)), key=lambda k: (workload[k].arrival_time, k))
    pending = [workload[k] for k in order]
    n_total = len(pending)
    objs: dict = {}
    executing: dict = {}
    swapping: dict = {}
    first_token: dict = {}
    finish: dict = {}
    trace = IterationTrace()
    timeline = RequestTimeline() if record_requests else None
    usage = _pool_usage_reader(scheduler)
    link_time = link.time
    step_cost = cost.step_time
    live = scheduler.requests
    reported: set = set()  # rejections reported so far (check=True)

    t = trace
    a_start, a_dur, a_comp, a_sync, a_ovl = t.start.append, t.duration.append, t.compute.append, t.sync_copy.append, t.overlap_copy.append
    a_bs, a_pt, a_dt, a_lv, a_live = t.batch_size.append, t.prefill_tokens.append, t.decode_tokens.append, t.levels_mask.append, t.live.append
    a_du, a_hu, a_bo, a_bi = t.device_used.append, t.host_used.append, t.blocks_out.append, t.blocks_in.append
    a_so, a_si, a_dr = t.swaps_out.append, t.swaps_in.append, t.drops.append

    now = pending[0].arrival_time if pending else 0.0
    i = 0
    iterations = 0
    idle_plans = 0
    last_sample = 0  # iteration of the last step that sampled a token
    stop = "completed"
    while True:
        while i < n_total and pending[i].arrival_time <= now:
            w = pending[i]
            i += 1
            r = Request(
                w.request_id, w.prompt_len, w.output_len, arrival_time=w.arrival_time, oracle_output_len=w.output_len
            )
            objs[w.request_id] = r
            scheduler.add(r, now)
        if not live:
            if i >= n_total:
                break
            now = max(now, pending[i].arrival_time)
            continue
        if horizon is not None and now >= horizon:
            stop = "horizon"
            break
        if iterations >= max_iterations:
            stop = "max_iterations"
            break
        iterations += 1
        plan = scheduler.schedule(now)
        if check:
            check_invariants(scheduler, plan, reported)
        if plan.is_empty:
            done = scheduler.on_step_end(plan, now, 0.0)
            if check:
                check_step_end(scheduler, done)
            if i < n_total:
                now = pending[i].arrival_time
                idle_plans = 0
                continue
            idle_plans += 1
            if idle_plans >= 3 and not (plan.dropped or plan.rejected):
                stop = "stalled"
                break
            continue
        idle_plans = 0

        sync = link_time(len(plan.sync_swap_out), len(plan.sync_swap_in)) if (plan.sync_swap_out or plan.sync_swap_in) else 0.0
        overlap = link_time(len(plan.swap_out), len(plan.swap_in)) if (plan.swap_out or plan.swap_in) else 0.0
        prefill = plan.prefill
        decode = plan.decode
        if prefill:
            compute = plan_compute_time(cost, plan)
        else:
            compute = step_cost((), [r.num_computed_tokens + 1 for r in decode])
        duration = sync + (compute if compute >= overlap else overlap)
        stall = duration - compute
        end = now + duration

        levels = 0
        samplers = []
        if decode:
            last_sample = iterations
        for e in prefill:
            r = e.request
            rid = r.request_id
            executing[rid] = executing.get(rid, 0.0) + compute
            if stall:
                swapping[rid] = swapping.get(rid, 0.0) + stall
            levels |= 1 << r.priority_level
            if e.samples_token:
                last_sample = iterations
                if rid not in first_token:
                    samplers.append(rid)
        for r in decode:
            rid = r.request_id
            executing[rid] = executing.get(rid, 0.0) + compute
            if stall:
                swapping[rid] = swapping.get(rid, 0.0) + stall
            levels |= 1 << r.priority_level
            if rid not in first_token:
                samplers.append(rid)
        n_live = len(live)

        finished = scheduler.on_step_end(plan, end, duration)
        if check:
            check_step_end(scheduler, finished)
        for rid in samplers:
            first_token[rid] = end
        for r in finished:
            finish[r.request_id] = end
            if timeline is not None:
                timeline.close(end, r)
        if timeline is not None:
            timeline.observe(end, live.values())
        dev_used, host_used = usage()
        a_start(now)
        a_dur(duration)
        a_comp(compute)
        a_sync(sync)
        a_ovl(overlap)
        a_bs(len(prefill) + len(decode))
        a_pt(sum(e.num_tokens for e in prefill) if prefill else 0)
        a_dt(len(decode))
        a_lv(levels)
        a_live(n_live)
        a_du(dev_used)
        a_hu(host_used)
        a_bo(len(plan.sync_swap_out) + len(plan.swap_out))
        a_bi(len(plan.sync_swap_in) + len(plan.swap_in))
        a_so(len(plan.swapped_out))
        a_si(len(plan.swapped_in))
        a_dr(len(plan.dropped))
        if on_step is not None:
            on_step(now, plan, duration)
        now = end
        idle = iterations - last_sample
        if idle > livelock_iterations + 4 * max_model_len * len(live):
            stop = "livelock"  # steps run, KV is dropped and recomputed, and no token is ever sampled
            break

    records = _records(workload, objs, first_token, finish, executing, swapping, now)
    stats = _stats(trace, link)
    return SimResult(
        records=records,
        iterations=trace,
        end_time=now,
        stop_reason=stop,
        wall_seconds=_time.perf_counter() - wall0,
        timeline=timeline,
        stats=stats,
    )


def _check_workload(workload: Sequence[WorkloadRequest]) -> None:
    """Reject what the loop cannot run, naming the position and the field: a NaN arrival would stop time (the
    loop would wait forever for it) and a repeated id would merge two requests' records."""
    first_at: dict = {}
    for k, w in enumerate(workload):
        where = f"simulate: workload[{k}] (request {w.request_id!r})"
        t = w.arrival_time
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"{where}: arrival_time must be a finite number >= 0 seconds, got {t!r}")
        for name in ("prompt_len", "output_len"):
            v = getattr(w, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")
        if w.request_id in first_at:
            raise ValueError(f"simulate: workload[{k}]: request id {w.request_id!r} repeats "
                             f"workload[{first_at[w.request_id]}]")
        first_at[w.request_id] = k


def _records(workload, objs, first_token, finish, executing, swapping, end_time) -> list[RequestRecord]:
    out = []
    for w in workload:
        r = objs.get(w.request_id)
        rid = w.request_id
        done = finish.get(rid)
        ex = executing.get(rid, 0.0)
        sw = swapping.get(rid, 0.0)
        if r is None:  # never arrived before the run stopped
            out.append(RequestRecord(rid, w.prompt_len, 0, w.arrival_time))
            continue
        stop = done if done is not None else max(end_time, w.arrival_time)
        queued = max(0.0, (stop - w.arrival_time) - ex - sw)
        out.append(
            RequestRecord(
                request_id=rid,
                prompt_len=w.prompt_len,
                output_len=r.num_generated_tokens if done is None else max(r.num_generated_tokens, 1),
                arrival_time=w.arrival_time,
                first_token_time=first_token.get(rid),
                finish_time=done,
                queued_time=queued,
                swapping_time=sw,
                executing_time=ex,
                num_preemptions=r.num_preemptions,
                rejected_reason=r.reject_reason,
            )
        )
    return out


def _stats(trace: IterationTrace, link: CopyLink) -> dict:
    busy = sum(trace.duration)
    return {
        "iterations": len(trace),
        "busy_seconds": busy,
        "compute_seconds": sum(trace.compute),
        "sync_copy_seconds": sum(trace.sync_copy),
        "overlap_copy_seconds": sum(trace.overlap_copy),
        "blocks_out": sum(trace.blocks_out),
        "blocks_in": sum(trace.blocks_in),
        "bytes_out": sum(trace.blocks_out) * link.block_bytes,
        "bytes_in": sum(trace.blocks_in) * link.block_bytes,
        "swaps_out": sum(trace.swaps_out),
        "swaps_in": sum(trace.swaps_in),
        "drops": sum(trace.drops),
        "peak_device_blocks": max(trace.device_used, default=0),
        "peak_host_blocks": max(trace.host_used, default=0),
    }


def workload_requests(items: Iterable[tuple[int, int, float]]) -> list[WorkloadRequest]:
    """Convenience for tests and notebooks: ``(prompt_len, output_len, arrival_time)`` -> ``WorkloadRequest``s."""
    return [WorkloadRequest(k, p, o, a) for k, (p, o, a) in enumerate(items)]
