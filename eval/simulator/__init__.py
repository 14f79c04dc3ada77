"""Discrete-event simulator that drives the real ``schedulers`` objects on a calibrated iteration-cost model.

* ``loop.simulate``: the event loop (arrivals, ``schedule``, step duration from the cost model and the copy
  link, ``on_step_end``), per-request records and the iteration trace.
* ``link.CopyLink``: the host<->device copy engine timeline (half or full duplex).
* ``trace``: ``IterationTrace`` (per-step columns) and ``RequestTimeline`` (opt-in per-request states).
* ``saturation.saturation_throughput``: the request rate a scheduler sustains with a queue that never empties.
"""

from .link import CopyLink
from .loop import SimResult, SimulationError, check_invariants, simulate, workload_requests
from .saturation import saturation_throughput
from .trace import IterationTrace, RequestTimeline

__all__ = [
    "CopyLink",
    "SimResult",
    "SimulationError",
    "check_invariants",
    "simulate",
    "workload_requests",
    "saturation_throughput",
    "IterationTrace",
    "RequestTimeline",
]
