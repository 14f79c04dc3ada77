"""``fcfs``: "FastServe-FCFS", continuous first-come-first-served batching with reactive swapping.

The paper's FCFS baseline runs on FastServe's own engine: jobs are served in arrival order, new jobs join
the running batch at every iteration while it has fewer than ``max_batch_size`` jobs and the token budget
allows, and prefills and decodes share iterations. When the device runs out of KV blocks, the most recently
admitted running job is swapped out to the host on the critical path (reactive swapping) and resumed, oldest
first, as soon as it fits again.

Each step, in this order:

1. every running job (admission order) gets its next token(s); if its blocks cannot grow, the newest running
   job is preempted (synchronous swap-out; dropped for recompute only when the host pool is full) until it
   fits, which may preempt the job itself when it is the newest;
2. if nothing was preempted in this step, preempted jobs resume oldest first (synchronous swap-in, or a
   recompute prefill for a dropped job) while the batch, the token budget and the free blocks allow;
3. only when no job is waiting to resume, new jobs are admitted in arrival order while they fit; the first
   that does not fit stops admission (no overtaking).

Invariant that keeps the order FIFO with plain queues: every running job was admitted before every
preempted job, and every preempted job before every waiting job.

A prompt longer than ``max_tokens_per_batch`` (possible only when ``max_model_len`` exceeds it) is prefilled
in chunks of the remaining budget; every other prefill is whole. ``swap_mode`` is not read: FCFS always swaps
reactively.
"""

from __future__ import annotations

from collections import deque
from itertools import chain

from .plan import StepPlan
from .policy import PolicyBase, chunk_tokens
from .request import KVLocation, Request


class FCFSScheduler(PolicyBase):
    """FastServe-FCFS: FIFO continuous batching, reactive swap-out of the newest job."""

    name = "fcfs"

    def __init__(self, config, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.running: dict = {}  # id -> Request with KV on the device, in admission order
        self.preempted: deque[Request] = deque()  # swapped out or dropped, oldest admission first
        self.waiting: deque[Request] = deque()  # never started, arrival order

    def _on_admit(self, request: Request, now: float) -> None:
        self.waiting.append(request)

    def _on_remove(self, request: Request) -> None:
        rid = request.request_id
        if self.running.pop(rid, None) is not None:
            return
        for q in (self.preempted, self.waiting):
            for i, r in enumerate(q):
                if r is request:
                    del q[i]
                    return

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        cfg = self.config
        blocks = self.blocks
        max_tokens = cfg.max_tokens_per_batch
        budget = max_tokens
        order = list(self.running.values())
        preempted_now = False
        # 1. Running jobs, oldest first; the newest ones give way when blocks run short.
        i = 0
        while i < len(order):
            r = order[i]
            n = chunk_tokens(r, budget, max_tokens)
            if n == 0:  # cannot happen with budget >= batch size, kept for safety
                i += 1
                continue
            need = blocks.extra_device_blocks(r, r.num_computed_tokens + n)
            while need > blocks.num_free_device_blocks and len(order) > i + 1:
                self._preempt(plan, order.pop())
                preempted_now = True
            if need > blocks.num_free_device_blocks:
                self._preempt(plan, order.pop())  # r itself is the newest left
                preempted_now = True
                break
            n = self._take(plan, r, n)
            budget -= n
            i += 1
        # 2. Resume preempted jobs, oldest first, unless this step just preempted (no swap ping-pong).
        while not preempted_now and self.preempted and plan.batch_size < cfg.max_batch_size and budget > 0:
            r = self.preempted[0]
            if r.kv_location is KVLocation.HOST:
                n = chunk_tokens(r, budget, max_tokens)
                need = blocks.blocks_for_tokens(r.num_computed_tokens + n)
                if n == 0 or need > blocks.num_free_device_blocks:
                    break
                self._swap_in(plan, r, sync=True)
            else:
                n = chunk_tokens(r, budget, max_tokens)
                if n == 0 or self._blocks_needed(r, n) > blocks.num_free_device_blocks:
                    break
            self.preempted.popleft()
            n = self._take(plan, r, n)
            self.running[r.request_id] = r
            budget -= n
        # 3. Admit new jobs in arrival order once nobody waits to resume.
        while not self.preempted and self.waiting and plan.batch_size < cfg.max_batch_size and budget > 0:
            r = self.waiting[0]
            n = chunk_tokens(r, budget, max_tokens)
            if n == 0 or self._blocks_needed(r, n) > blocks.num_free_device_blocks:
                break
            self.waiting.popleft()
            n = self._take(plan, r, n)
            self.running[r.request_id] = r
            budget -= n

    def _check_queues(self) -> None:
        for rid, r in self.running.items():
            if r.request_id != rid:
                raise AssertionError(f"fcfs: request {r.request_id!r} is running under the id {rid!r}")
        self._check_partition({
            "running jobs": (self.running.values(), (KVLocation.DEVICE,)),
            "preempted jobs": (self.preempted, (KVLocation.HOST, KVLocation.NONE)),
            "waiting queue": (self.waiting, (KVLocation.NONE,)),
        })
        # The invariant that keeps plain queues FIFO: running, then preempted, then waiting jobs, each in
        # admission order (the order of ``self.requests``).
        position = {id(r): k for k, r in enumerate(self.requests.values())}
        last, prev = -1, None
        for r in chain(self.running.values(), self.preempted, self.waiting):
            if position[id(r)] < last:
                raise AssertionError(f"fcfs: request {r.request_id!r} comes after {prev.request_id!r} in the queues "
                                     f"(running, preempted, waiting) but was admitted before it")
            last, prev = position[id(r)], r
        for r in self.waiting:
            if r.num_computed_tokens or r.num_generated_tokens:
                raise AssertionError(f"fcfs: request {r.request_id!r} is in the waiting queue but has started")

    def _preempt(self, plan: StepPlan, r: Request) -> None:
        del self.running[r.request_id]
        self._evict(plan, r, recompute=False, sync=True)
        self.preempted.appendleft(r)
