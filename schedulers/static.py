"""``static``: request-level batching (FasterTransformer style), the paper's oldest baseline.

When no batch is running, take up to ``max_batch_size`` waiting requests in arrival order while the sum of
their prompts fits the token budget (so that one step prefills them all) and the blocks of their *full*
sequences (prompt + max_new_tokens - 1 tokens) fit the device pool together, as a static engine that sizes
its buffers for the whole generation does. Then run the batch, one token per member per step, until every
member has finished; nobody joins in the meantime. Members that finish early simply leave the batch.

Because the whole batch's worst case is reserved at formation, members never run out of blocks and
nothing is ever preempted or swapped. ``swap_mode`` is not read.
"""

from __future__ import annotations

from collections import deque

from .plan import StepPlan
from .policy import PolicyBase, chunk_tokens
from .request import KVLocation, Request


class StaticScheduler(PolicyBase):
    """Request-level batching: no joins until the whole batch finishes."""

    name = "static"

    def __init__(self, config, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []  # the running static batch, in arrival order

    def _on_admit(self, request: Request, now: float) -> None:
        self.waiting.append(request)

    def _on_remove(self, request: Request) -> None:
        if request in self.batch:
            self.batch.remove(request)
        else:
            self.waiting.remove(request)

    def _check_queues(self) -> None:
        self._check_partition({
            "static batch": (self.batch, (KVLocation.DEVICE,)),
            "waiting queue": (self.waiting, (KVLocation.NONE,)),
        })

    def _form_batch(self) -> None:
        cfg = self.config
        blocks = self.blocks
        tokens = 0
        reserved = 0
        while self.waiting and len(self.batch) < cfg.max_batch_size:
            r = self.waiting[0]
            full = blocks.blocks_for_tokens(r.prompt_len + r.max_new_tokens - 1)
            prompt = min(r.prompt_len, cfg.max_tokens_per_batch)
            if self.batch and (tokens + prompt > cfg.max_tokens_per_batch or reserved + full > blocks.num_usable_device_blocks):
                break
            self.waiting.popleft()
            self.batch.append(r)
            tokens += prompt
            reserved += full

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        if not self.batch:
            self._form_batch()
        budget = self.config.max_tokens_per_batch
        for r in self.batch:
            n = chunk_tokens(r, budget, self.config.max_tokens_per_batch)
            if n == 0:
                continue
            n = self._take(plan, r, n)
            budget -= n
