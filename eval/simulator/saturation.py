"""The request rate a scheduler sustains: its throughput with every request queued at once, by simulation.

A load level is a fraction of what the system can serve. ``saturation_throughput`` measures that denominator
the way a queue sees it: every request of the workload waits at time 0, the scheduler runs them on the cost
model, and the rate is the number of requests over the time the last one finishes. The batch composition is
then the scheduler's own at saturation (prefill steps beside decodes, partial batches from page limits, the
token budget), which a closed-form "one average request in a full batch" estimate leaves out.

The ramp (the first batch fills) and the drain (the last requests finish in a batch that can no longer be
filled) bias the rate low by about one long request's latency over the whole run: give it many requests
(hundreds; the simulator runs thousands of iterations a second). The completion curve's middle would avoid
that bias for FCFS, but not for a preemptive policy: MLFQ with every request queued at once round-robins
them all and finishes most of them near the end, so only the whole run's rate means the same for every
policy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from eval.records import WorkloadRequest

from .link import CopyLink
from .loop import simulate

__all__ = ["saturation_throughput"]


def saturation_throughput(make_scheduler: Callable[[], object], workload: Sequence[WorkloadRequest], cost,
                          link: CopyLink) -> float:
    """Requests per second ``make_scheduler()`` completes with all of ``workload`` queued at time 0 (arrival
    times are ignored): ``len(workload)`` over the last finish time (see the module docstring). Raises
    ``ValueError`` for an empty workload or a run that does not finish every request."""
    n = len(workload)
    if n == 0:
        raise ValueError("saturation_throughput needs at least one request")
    queued = [dataclasses.replace(w, arrival_time=0.0) for w in workload]
    res = simulate(make_scheduler(), queued, cost, link)
    done = [r.finish_time for r in res.records if r.finish_time is not None]
    if len(done) < n:
        raise ValueError(f"saturation_throughput: the run stopped ({res.stop_reason}) with {len(done)} of {n} "
                         f"requests finished")
    last = max(done)
    if not last > 0:
        raise ValueError(f"saturation_throughput: every request finished at t={last!r}: the cost model charges "
                         f"nothing")
    return n / last
