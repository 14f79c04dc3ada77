"""``srpt``: shortest remaining processing time first, with oracle knowledge of output lengths.

A lower bound for the preemptive policies, not a deployable one: it reads ``Request.oracle_output_len``
(falling back to ``max_new_tokens`` when the harness did not set it; the eval harness asks for exactly the
reference output length, so both agree). A job's remaining work is its output tokens still to generate;
ties go to the shorter prompt, then FIFO. The key is updated after every step for the jobs that ran, and
the batch is rebuilt from the smallest remaining work at every iteration, so a new short job preempts a
long running one at once. KV management is ``PriorityScheduler``'s (``swap_mode``, proactive by default),
in queue order.
"""

from __future__ import annotations

from .priority import PriorityScheduler
from .request import Request


class SRPTScheduler(PriorityScheduler):
    name = "srpt"

    def remaining_work(self, r: Request) -> int:
        total = r.oracle_output_len if r.oracle_output_len is not None else r.max_new_tokens
        return max(min(total, r.max_new_tokens) - r.num_generated_tokens, 0)

    def _initial_key(self, r: Request, now: float) -> tuple:
        return (self.remaining_work(r), r.prompt_len, self._next_seq())

    def _check_queues(self) -> None:
        super()._check_queues()
        for r in self.requests.values():
            if r.sched_key[:2] != (self.remaining_work(r), r.prompt_len):
                raise AssertionError(f"srpt: request {r.request_id!r} has the key {r.sched_key}, but "
                                     f"{self.remaining_work(r)} tokens of work left and a {r.prompt_len}-token prompt")

    def _after_step(self, plan, now: float, elapsed: float) -> None:
        for r in plan.batch():
            if not r.is_finished and r.sched_key[0] != self.remaining_work(r):
                self._rekey(r, (self.remaining_work(r), r.prompt_len, r.sched_key[2]))
