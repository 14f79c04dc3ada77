"""What a simulation records: one row per iteration, and (opt-in) per-request state changes.

``IterationTrace`` is a struct of lists (one append per column per step keeps the hot loop cheap);
``as_arrays()`` turns it into numpy arrays and ``write_csv`` into a file. Columns:

=================  =====================================================================================
start, duration    step start time and length (s); duration = sync_copy + max(compute, overlap_copy)
compute            the cost model's compute time of the batch (s)
sync_copy          critical-path copy time (sync swaps, before compute) (s)
overlap_copy       copy time of the proactive swaps that run beside compute (s)
batch_size         requests computing in the step
prefill_tokens     tokens of prefill chunks (incl. recompute); decode_tokens: one per decoding request
levels_mask        bit p set when a request of priority level p is in the batch (MLFQ queues present; an
                   object column in ``as_arrays`` when a level above 62 occurs)
live               requests admitted and not finished at plan time
device_used        device KV blocks held after the step (host_used: host blocks)
blocks_out         device->host blocks copied in the step (sync + overlapped); blocks_in: host->device
swaps_out          requests swapped out in the step; swaps_in: swapped in; drops: KV dropped (recompute)
=================  =====================================================================================

``RequestTimeline`` (enabled with ``record_requests=True``) stores, per request, the times at which its
priority level, KV location or state changed: enough to draw each request's queue level over time.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

INT_COLUMNS = (
    "batch_size",
    "prefill_tokens",
    "decode_tokens",
    "levels_mask",
    "live",
    "device_used",
    "host_used",
    "blocks_out",
    "blocks_in",
    "swaps_out",
    "swaps_in",
    "drops",
)
FLOAT_COLUMNS = ("start", "duration", "compute", "sync_copy", "overlap_copy")


@dataclass
class IterationTrace:
    start: list[float] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    sync_copy: list[float] = field(default_factory=list)
    overlap_copy: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    levels_mask: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    device_used: list[int] = field(default_factory=list)
    host_used: list[int] = field(default_factory=list)
    blocks_out: list[int] = field(default_factory=list)
    blocks_in: list[int] = field(default_factory=list)
    swaps_out: list[int] = field(default_factory=list)
    swaps_in: list[int] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start)

    def as_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in fields(self):
            values = getattr(self, f.name)
            dtype = np.int64 if f.name in INT_COLUMNS else np.float64
            if f.name == "levels_mask" and values and max(values) >= 2**63:  # a policy with more than 63 levels
                dtype = object  # Python ints: the bits of every level
            out[f.name] = np.asarray(values, dtype=dtype)
        return out

    def write_csv(self, path: str | Path) -> None:
        names = [f.name for f in fields(self)]
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            writer.writerows(zip(*(getattr(self, n) for n in names)))


@dataclass
class RequestTimeline:
    """Per request: lists of (time, priority_level, kv_location, state) at each change, from admission on."""

    events: dict[int, list[tuple[float, int, str, str]]] = field(default_factory=dict)

    def observe(self, now: float, requests) -> None:
        for r in requests:
            row = (r.priority_level, r.kv_location.value, r.state.value)
            seq = self.events.get(r.request_id)
            if seq is None:
                self.events[r.request_id] = [(now, *row)]
            elif seq[-1][1:] != row:
                seq.append((now, *row))

    def close(self, now: float, request) -> None:
        """Record the final state of a request that left the scheduler (finished or aborted)."""
        seq = self.events.setdefault(request.request_id, [])
        seq.append((now, request.priority_level, request.kv_location.value, request.state.value))

    def level_steps(self, request_id: int) -> tuple[list[float], list[int]]:
        """Times and levels at which ``request_id``'s priority level changed (for a step plot)."""
        times, levels = [], []
        for t, level, _, _ in self.events.get(request_id, []):
            if not levels or levels[-1] != level:
                times.append(t)
                levels.append(level)
        return times, levels
