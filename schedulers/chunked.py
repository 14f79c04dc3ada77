"""``cp``: vLLM's chunked prefill (Sarathi-style, the V0 ``enable_chunked_prefill`` policy).

Every step fills one token budget (``max_tokens_per_batch``) in this order:

1. every running request that decodes (one token each), oldest first;
2. running requests whose prefill is in progress, oldest first, each taking as much of the remaining
   budget as it needs (a chunk when the budget is short);
3. new requests from the waiting queue in order (preempted ones first), while the batch has room and
   their *whole prompt* fits the device blocks with the watermark left free (admission allocates the whole
   prompt, as vLLM does); the last one admitted is chunked to fill the budget.

Decodes and prefill chunks share steps. Preemption is ``vllm``'s: when a running request cannot get a
block, the newest running request not yet served in this step is dropped for recompute and goes to the
front of the waiting queue. ``swap_mode`` is not read.
"""

from __future__ import annotations

from .plan import StepPlan
from .vllm import VLLMScheduler


class ChunkedPrefillScheduler(VLLMScheduler):
    """vLLM V0 with chunked prefill: decodes first, then prefill chunks filling the token budget."""

    name = "cp"
    chunk_prefills = True

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        budget = self.config.max_tokens_per_batch
        decoding = [r for r in self.running if not r.is_prefill]
        prefilling = [r for r in self.running if r.is_prefill]
        # Victims of a shortage are the newest running requests not yet served, prefills included: they
        # were admitted after the decoding ones in every case but a recompute re-admission.
        used = self._run(plan, decoding + prefilling, budget)
        self._admit(plan, budget - used, len(self.running), chunk_last=True)
