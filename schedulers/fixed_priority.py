"""``fixed-priority``: preemptive shortest-input-first with a fixed priority (the paper's Fig 16 ablation).

A job's priority is its prompt length, fixed at arrival (shorter first, FIFO among equal lengths); it is
never demoted or promoted. Every iteration the batch is rebuilt from the highest-priority jobs, so a short
arrival preempts longer running jobs at the next iteration. KV management is ``PriorityScheduler``'s
(``swap_mode``, proactive by default), with offload and upload in queue order (lowest priority offloaded
first, highest uploaded first). Long prompts can starve under load: that is the point of the ablation.
"""

from __future__ import annotations

from .priority import PriorityScheduler
from .request import Request


class FixedPriorityScheduler(PriorityScheduler):
    name = "fixed-priority"

    def _initial_key(self, r: Request, now: float) -> tuple:
        return (r.prompt_len, self._next_seq())

    def _check_queues(self) -> None:
        super()._check_queues()
        for r in self.requests.values():
            if r.sched_key[0] != r.prompt_len:
                raise AssertionError(f"fixed-priority: request {r.request_id!r} has the key {r.sched_key} but a "
                                     f"{r.prompt_len}-token prompt")
