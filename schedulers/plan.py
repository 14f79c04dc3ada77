"""``StepPlan``: everything one iteration must do, decided by a scheduler and carried out by an executor.

Order of execution, which every executor (the engine and the simulator) follows:

1. ``sync_swap_out`` then ``sync_swap_in``: copies on the critical path (reactive swapping). They finish
   before the step's compute starts, so a request swapped in here may run in this very step, and device
   blocks freed by a sync swap-out may be written by this step.
2. The compute of ``prefill`` and ``decode`` entries, concurrently with
   ``swap_out`` and ``swap_in``: proactive copies that overlap the compute. The requests they move are not
   in this step's batch; the step ends when both the compute and these copies are done. Device blocks
   freed by an overlapped swap-out (and host blocks freed by an overlapped swap-in) return to their pools
   only at the end of the step, so nothing in this step can overwrite blocks that are still being read.

Because every swap-out of a plan runs before its swap-ins, host blocks freed by a *sync* swap-in are also
held back until the end of the step (a swap-out in the same plan must not overwrite them before they are
read); device blocks freed by a sync swap-out are free at once.

Block ids are the executor's physical page indices: device ids index the device KV pages, host ids index
the host pool. ``dropped`` requests lost their device blocks (recompute preemption); nothing is copied.
``rejected`` requests were refused at admission and will never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass(slots=True)
class PrefillEntry:
    """Compute ``num_tokens`` of ``request``'s uncomputed tokens, starting at ``request.num_computed_tokens``."""

    request: Request
    num_tokens: int

    @property
    def request_id(self):
        return self.request.request_id

    @property
    def context_before(self) -> int:
        """Tokens already in the KV cache before this chunk (read at plan time, before on_step_end)."""
        return self.request.num_computed_tokens

    @property
    def samples_token(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass(slots=True)
class StepPlan:
    """One iteration's decisions. Lists are in the order the scheduler chose (batch order)."""

    prefill: list[PrefillEntry] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)  # one token each
    # (device_block, host_block) pairs; overlapped with this step's compute.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    # (host_block, device_block) pairs; overlapped with this step's compute.
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Same pair shapes, but completed before this step's compute starts (critical path).
    sync_swap_out: list[tuple[int, int]] = field(default_factory=list)
    sync_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Requests whose swaps appear above, for executors and traces that track per-request swap time.
    swapped_out: list[Request] = field(default_factory=list)
    swapped_in: list[Request] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)  # KV freed; they will be recomputed
    rejected: list[tuple[Request, str]] = field(default_factory=list)  # (request, reason)

    @property
    def batch_size(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def num_batched_tokens(self) -> int:
        return sum(e.num_tokens for e in self.prefill) + len(self.decode)

    @property
    def is_empty(self) -> bool:
        """True when the step has no compute and no copies (the executor may idle until the next arrival)."""
        return not (
            self.prefill or self.decode or self.swap_out or self.swap_in or self.sync_swap_out or self.sync_swap_in
        )

    def batch(self) -> list[Request]:
        """Every request computing in this step, prefill entries first."""
        return [e.request for e in self.prefill] + self.decode
