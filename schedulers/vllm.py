"""``vllm``: the default scheduling policy of vLLM 0.6 (the V0 engine), the paper's main baseline.

* **FCFS admission, prefill-only steps.** While the waiting queue's head fits, it is admitted: its whole
  prompt must fit the token budget and the batch (running + admitted < ``max_batch_size``), and its blocks
  must leave a watermark of ``watermark * num_device_blocks`` blocks free. Admission allocates the blocks of
  the whole prompt. A step that admits anything runs only those prefills (no decodes).
* **Decode steps.** Otherwise every running request decodes, oldest first. When one cannot get a block,
  the newest running request is preempted by *recompute* (its KV is dropped; it will prefill prompt and
  generated tokens again) and put at the front of the waiting queue (oldest preempted first), repeating
  until the block is found, which may preempt the request itself.

Limits that keep it live (stated, and checked at ``add``): a request whose full sequence needs more blocks
than the pool minus the watermark is rejected, since after a recompute preemption it could never be
admitted again. A recomputed sequence longer than ``max_tokens_per_batch`` (only when ``max_model_len``
exceeds it) is prefilled in chunks rather than ignored as vLLM would. ``swap_mode`` is not read.
"""

from __future__ import annotations

from collections import deque

from .plan import StepPlan
from .policy import PolicyBase, chunk_tokens
from .request import KVLocation, Request


class VLLMScheduler(PolicyBase):
    """vLLM V0: FCFS, prefill-prioritised steps, newest-first recompute preemption."""

    name = "vllm"
    chunk_prefills = False  # cp: running prefills take whatever is left of the budget

    def __init__(self, config, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.watermark_blocks = int(config.watermark * config.num_device_blocks)
        self.waiting: deque[Request] = deque()  # preempted (front) and new requests
        self.running: list[Request] = []  # admission order

    def _policy_reject_reason(self, r: Request) -> str | None:
        need = self.blocks.blocks_for_tokens(r.prompt_len + r.max_new_tokens - 1)
        limit = self.blocks.num_usable_device_blocks - self.watermark_blocks
        if need > limit:
            return (
                f"the full sequence needs {need} KV blocks but admission must leave the watermark of "
                f"{self.watermark_blocks} blocks free, so at most {limit} can be admitted"
            )
        return None

    def _on_admit(self, request: Request, now: float) -> None:
        self.waiting.append(request)

    def _on_remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _check_queues(self) -> None:
        self._check_partition({
            "running list": (self.running, (KVLocation.DEVICE,)),
            "waiting queue": (self.waiting, (KVLocation.NONE,)),  # new and recompute-preempted requests
        })

    def _admit(self, plan: StepPlan, budget: int, seqs: int, chunk_last: bool) -> int:
        """Admit from the waiting queue in order; returns the tokens used. ``chunk_last`` (chunked prefill)
        lets the last admitted prompt take only what is left of the budget."""
        cfg = self.config
        blocks = self.blocks
        used = 0
        while self.waiting and seqs < cfg.max_batch_size and budget - used > 0:
            r = self.waiting[0]
            left = budget - used
            n = chunk_tokens(r, left, cfg.max_tokens_per_batch)
            if n == 0 and chunk_last:
                n = left
            if n == 0:
                break
            need = self._blocks_needed(r, n, alloc_tokens=r.num_tokens)
            if not blocks.can_allocate(need, self.watermark_blocks):
                break
            self.waiting.popleft()
            n = self._take(plan, r, n, alloc_tokens=r.num_tokens)
            self.running.append(r)
            used += n
            seqs += 1
        return used

    def _run(self, plan: StepPlan, order: list[Request], budget: int) -> int:
        """Give each request of ``order`` its next tokens, oldest first. When blocks run short, the newest
        request not yet served (the end of ``order``) is preempted by recompute, possibly the request itself.
        Preempted requests go to the front of the waiting queue, oldest first. Returns the tokens used."""
        cfg = self.config
        blocks = self.blocks
        used = 0
        preempted: list[Request] = []  # newest first
        i = 0
        while i < len(order):
            r = order[i]
            n = chunk_tokens(r, budget - used, cfg.max_tokens_per_batch)
            if n == 0 and self.chunk_prefills:
                n = budget - used
            if n == 0:
                i += 1
                continue
            need = blocks.extra_device_blocks(r, r.num_computed_tokens + n)
            while need > blocks.num_free_device_blocks and len(order) > i + 1:
                preempted.append(self._preempt(plan, order.pop()))
            if need > blocks.num_free_device_blocks:
                preempted.append(self._preempt(plan, order.pop()))  # r itself
                break
            n = self._take(plan, r, n)
            used += n
            i += 1
        self.waiting.extendleft(preempted)  # extendleft reverses: the oldest preempted ends up first
        return used

    def _preempt(self, plan: StepPlan, r: Request) -> Request:
        self.running.remove(r)
        self._drop(plan, r)
        return r

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        if self._admit(plan, self.config.max_tokens_per_batch, len(self.running), chunk_last=False):
            return  # a prefill step runs no decodes
        self._run(plan, list(self.running), self.config.max_tokens_per_batch)
