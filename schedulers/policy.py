"""``PolicyBase``: the request life cycle every policy shares (admission, abort, step accounting, swaps).

A concrete policy implements four hooks and inherits the rest of the ``Scheduler`` contract:

* ``_on_admit(request, now)``: put a newly admitted request into the policy's queues;
* ``_on_remove(request)``: take a finished or aborted request out of them;
* ``_build_plan(plan, now)``: fill ``plan`` (batch, swaps, drops) for the step starting at ``now``;
* ``_after_step(plan, now, elapsed)`` (optional): policy accounting after progress was applied;
* ``_check_queues()`` (optional, recommended): ``check_invariants`` calls it to check the policy's queues
  against the live requests (``_check_partition`` does the usual check: every live request in exactly one
  queue, with a ``kv_location`` that queue allows).

The base class owns what must be identical across policies:

* admission control (``add``): a request that can never run is rejected with a reason (prompt or
  prompt + max_new_tokens beyond ``max_model_len``, a full sequence that needs more blocks than the whole
  device pool, or a policy's own limit via ``_policy_reject_reason``) and reported once in the next plan;
* the progress rule of ``schedulers.request`` in ``on_step_end`` (a chunk that reaches the last known token
  samples one; a request finishes at ``max_new_tokens`` or when named in ``finished_ids``);
* the protocol check: a non-empty plan must be ended with ``on_step_end`` before the next ``schedule``;
* plan helpers that move blocks and record the move in the plan (``_take``, ``_swap_out``, ``_swap_in``,
  ``_drop``, ``_evict``), so that block tables, request states and plan lists always agree.

Counters of what a policy did (swaps, drops, promotions, ...) are kept in ``self.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .base import Scheduler
from .blocks import BlockError
from .config import SchedulerConfig
from .cost import IterationCostModel
from .plan import PrefillEntry, StepPlan
from .request import KVLocation, Request, RequestId, RequestState


@dataclass(slots=True)
class SchedulerStats:
    """Running totals of a scheduler's decisions (for traces, tests and the simulator's breakdowns)."""

    num_admitted: int = 0
    num_rejected: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0  # requests moved device -> host
    num_swap_ins: int = 0
    num_drops: int = 0  # recompute preemptions
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    sync_blocks_swapped: int = 0  # of the above, on the critical path
    num_promotions: int = 0  # starvation promotions (fastserve family)
    num_demotions: int = 0
    prefix_cache_queries: int = 0  # tokens of requests that looked up the prefix cache as they (re)started
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed)


class PolicyBase(Scheduler):
    """Shared implementation of ``Scheduler``; subclasses provide the policy (see module docstring)."""

    def __init__(self, config: SchedulerConfig, cost_model: IterationCostModel | None = None) -> None:
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"{type(self).__name__}: config must be a SchedulerConfig, got {type(config).__name__}")
        super().__init__(config, cost_model)
        self.iteration = 0
        self.stats = SchedulerStats()
        self._seq = 0  # admission / queue-entry counter (FIFO tie-break)
        self._rejected_out: list[tuple[Request, str]] = []
        self._outstanding: StepPlan | None = None

    # ------------------------------------------------------------------ hooks

    def _policy_reject_reason(self, request: Request) -> str | None:
        return None

    def _on_admit(self, request: Request, now: float) -> None:
        raise NotImplementedError

    def _on_remove(self, request: Request) -> None:
        raise NotImplementedError

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        raise NotImplementedError

    def _after_step(self, plan: StepPlan, now: float, elapsed: float) -> None:
        pass

    def _on_location_change(self, request: Request, old: KVLocation) -> None:
        """Called after a plan helper moved ``request``'s KV (``old`` -> ``request.kv_location``)."""

    # ------------------------------------------------------------------ Scheduler API

    def add(self, request: Request, now: float) -> bool:
        if not isinstance(request, Request):
            raise TypeError(f"{self.name}.add: expected a Request, got {type(request).__name__}")
        _check_time("now", now)
        if request.request_id in self.requests:
            raise ValueError(f"{self.name}.add: request_id {request.request_id!r} is already live")
        if (
            request.state is not RequestState.WAITING
            or request.num_computed_tokens
            or request.num_generated_tokens
            or request.blocks
            or request.kv_location is not KVLocation.NONE
        ):
            raise ValueError(
                f"{self.name}.add: request {request.request_id!r} is not fresh (state {request.state.value}, "
                f"{request.num_computed_tokens} computed, {request.num_generated_tokens} generated)"
            )
        reason = self._reject_reason(request)
        if reason is not None:
            request.state = RequestState.REJECTED
            request.reject_reason = reason
            self._rejected_out.append((request, reason))
            self.stats.num_rejected += 1
            return False
        request.starvation_clock = now
        self.requests[request.request_id] = request
        self.stats.num_admitted += 1
        self._on_admit(request, now)
        return True

    def abort(self, request_id: RequestId) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self._on_remove(request)
        self.blocks.free(request)
        request.state = RequestState.ABORTED
        self.stats.num_aborted += 1
        return True

    def schedule(self, now: float) -> StepPlan:
        _check_time("now", now)
        if self._outstanding is not None and not self._outstanding.is_empty:
            raise RuntimeError(f"{self.name}.schedule: on_step_end was not called for the previous non-empty plan")
        self._outstanding = None
        self.iteration += 1
        plan = StepPlan()
        if self._rejected_out:
            plan.rejected, self._rejected_out = self._rejected_out, []
        self._build_plan(plan, now)
        for r in plan.batch():
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
            r.last_scheduled_time = now
        self._outstanding = plan
        return plan

    def on_step_end(
        self, plan: StepPlan, now: float, elapsed: float, finished_ids: Iterable[RequestId] = ()
    ) -> list[Request]:
        if plan is not self._outstanding:
            raise RuntimeError(f"{self.name}.on_step_end: plan is not the one returned by the last schedule()")
        _check_time("now", now)
        _check_time("elapsed", elapsed)
        early = set(finished_ids)
        if early:
            sampling = {e.request.request_id for e in plan.prefill if e.samples_token}
            sampling.update(r.request_id for r in plan.decode)
            bad = [rid for rid in early if rid not in sampling]
            if bad:
                raise ValueError(
                    f"{self.name}.on_step_end: finished_ids {bad!r} name requests that sampled no token in this step"
                )
        self._outstanding = None
        self.blocks.end_step()
        self.stats.num_steps += 1
        sampled: list[Request] = []
        for e in plan.prefill:
            r = e.request
            if r.is_finished:  # aborted during the step
                continue
            if r.prefix_hashes:
                self.blocks.register_prefix(r, r.num_computed_tokens, r.num_computed_tokens + e.num_tokens)
            r.num_computed_tokens += e.num_tokens
            if r.num_computed_tokens == r.num_tokens:
                r.num_generated_tokens += 1
                sampled.append(r)
        for r in plan.decode:
            if r.is_finished:
                continue
            if r.prefix_hashes:
                self.blocks.register_prefix(r, r.num_computed_tokens, r.num_computed_tokens + 1)
            r.num_computed_tokens += 1
            r.num_generated_tokens += 1
            sampled.append(r)
        finished: list[Request] = []
        for r in sampled:
            if r.first_token_time is None:
                r.first_token_time = now
            if r.num_generated_tokens >= r.max_new_tokens or (early and r.request_id in early):
                self._finish(r, now)
                finished.append(r)
        self._after_step(plan, now, elapsed)
        return finished

    # ------------------------------------------------------------------ admission

    def _reject_reason(self, r: Request) -> str | None:
        cfg = self.config
        if r.prompt_len > cfg.max_model_len:
            return f"prompt_len {r.prompt_len} exceeds max_model_len {cfg.max_model_len}"
        total = r.prompt_len + r.max_new_tokens
        if total > cfg.max_model_len:
            return (
                f"prompt_len + max_new_tokens = {r.prompt_len} + {r.max_new_tokens} = {total} exceeds "
                f"max_model_len {cfg.max_model_len}"
            )
        need = self.blocks.blocks_for_tokens(total - 1)
        if need > self.blocks.num_usable_device_blocks:
            return (
                f"the full sequence ({total - 1} cached tokens) needs {need} KV blocks of {cfg.block_size} tokens, "
                f"more than the {self.blocks.num_usable_device_blocks} usable device blocks"
            )
        return self._policy_reject_reason(r)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ plan helpers

    def _take(self, plan: StepPlan, r: Request, n: int, alloc_tokens: int = 0) -> int:
        """Put ``r`` in the batch for ``n`` tokens, allocating the device blocks they need (or, when larger,
        blocks for ``alloc_tokens`` tokens: vLLM allocates a whole prompt at admission). Returns the tokens
        it computes: ``n``, or fewer when a restart takes cached prefix blocks (the rest of the step's token
        budget stays with the policy)."""
        assert 1 <= n <= r.num_uncomputed_tokens, (r.request_id, n, r.num_uncomputed_tokens)
        old = r.kv_location
        if r.prefix_hashes and old is KVLocation.NONE and r.num_computed_tokens == 0:
            n = self._use_prefix_cache(r, n, alloc_tokens)
        self.blocks.allocate(r, max(r.num_computed_tokens + n, alloc_tokens))
        if old is not KVLocation.DEVICE:
            self._on_location_change(r, old)
        r.state = RequestState.RUNNING
        if r.is_prefill:
            plan.prefill.append(PrefillEntry(r, n))
        else:
            plan.decode.append(r)
        return n

    def _blocks_needed(self, r: Request, n: int, alloc_tokens: int = 0) -> int:
        """Free device blocks that ``_take(plan, r, n, alloc_tokens)`` would use now (after the full swap-in
        of a request on the host). A request that (re)starts with cached prefix blocks needs the fewest over
        the prefixes it could take, which ``_use_prefix_cache`` then finds: the blocks other requests hold
        cost nothing, so a request that shares a long cached prefix fits where its whole chunk would not."""
        need = self.blocks.extra_device_blocks(r, max(r.num_computed_tokens + n, alloc_tokens))
        if r.prefix_hashes and r.kv_location is KVLocation.NONE and r.num_computed_tokens == 0:
            need = min([need, *(cost for _, cost in self._prefix_options(r, n, alloc_tokens))])
        return need

    def _prefix_options(self, r: Request, n: int, alloc_tokens: int):
        """For a request with no KV starting with a chunk of ``n`` tokens: ``(h, cost)`` for each ``h`` of
        its cached prefix blocks it could take (leaving its last known token to compute), ``cost`` being the
        free blocks that takes: the evictable ones among the ``h``, plus the new blocks the chunk (which then
        starts after them) and ``alloc_tokens`` need."""
        blocks = self.blocks
        bs = blocks.block_size
        evictable = 0
        for h, from_free in enumerate(blocks.cached_prefix(r, (r.num_tokens - 1) // bs), start=1):
            evictable += from_free
            k = h * bs
            new = max(blocks.blocks_for_tokens(max(k + min(n, r.num_tokens - k), alloc_tokens)) - h, 0)
            yield h, evictable + new

    def _use_prefix_cache(self, r: Request, n: int, alloc_tokens: int) -> int:
        """A request (re)starting with a chunk of ``n`` tokens takes cached blocks of its known tokens' prefix
        (a recompute's generated tokens included; at least its last known token is left to compute); the
        chunk then starts after them and computes ``min(n, tokens left)``, which is returned (the chunk's
        tokens only shrink). It takes the longest cached prefix whose cost (``_prefix_options``) the free
        blocks cover now; that may be more free blocks than the chunk alone needed without the cache (cached
        blocks past the chunk, which the request needs in its next steps anyway), and every policy checks
        the free count it leaves before placing anything else."""
        st = self.stats
        st.prefix_cache_queries += r.num_tokens
        allowed = self.blocks.num_free_device_blocks
        best = max((h for h, cost in self._prefix_options(r, n, alloc_tokens) if cost <= allowed), default=0)
        hit = self.blocks.lookup_prefix(r, best) * self.blocks.block_size
        r.num_cached_tokens = hit
        if not hit:
            return n
        st.prefix_cache_hits += hit
        r.num_computed_tokens = hit
        return min(n, r.num_tokens - hit)

    def _swap_out(self, plan: StepPlan, r: Request, sync: bool) -> None:
        pairs = self.blocks.swap_out(r, overlapped=not sync)
        (plan.sync_swap_out if sync else plan.swap_out).extend(pairs)
        plan.swapped_out.append(r)
        r.state = RequestState.SWAPPED
        r.num_swaps_out += 1
        r.num_preemptions += 1
        st = self.stats
        st.num_swap_outs += 1
        st.num_preemptions += 1
        st.blocks_swapped_out += len(pairs)
        if sync:
            st.sync_blocks_swapped += len(pairs)
        self._on_location_change(r, KVLocation.DEVICE)

    def _swap_in(self, plan: StepPlan, r: Request, sync: bool) -> None:
        pairs = self.blocks.swap_in(r, overlapped=not sync)
        (plan.sync_swap_in if sync else plan.swap_in).extend(pairs)
        plan.swapped_in.append(r)
        r.state = RequestState.RUNNING
        r.num_swaps_in += 1
        st = self.stats
        st.num_swap_ins += 1
        st.blocks_swapped_in += len(pairs)
        if sync:
            st.sync_blocks_swapped += len(pairs)
        self._on_location_change(r, KVLocation.HOST)

    def _drop(self, plan: StepPlan, r: Request) -> None:
        """Recompute preemption: free ``r``'s KV; it will prefill its prompt and generated tokens again."""
        old = r.kv_location
        self.blocks.free(r)
        r.num_computed_tokens = 0
        r.state = RequestState.WAITING
        r.num_preemptions += 1
        plan.dropped.append(r)
        self.stats.num_drops += 1
        self.stats.num_preemptions += 1
        if old is not KVLocation.NONE:
            self._on_location_change(r, old)

    def _evict(self, plan: StepPlan, r: Request, recompute: bool, sync: bool) -> int:
        """Free ``r``'s device blocks by swapping it out (or dropping it when ``recompute`` or when the host
        pool is full). Returns the device blocks released (at once when sync or dropped, else at step end;
        prefix-cached blocks that other requests still hold are not, and a shared one that an overlapped
        swap-out of this step reads is released at step end)."""
        n = self.blocks.num_releasable(r)
        if recompute or not self.blocks.can_swap_out(r):
            self._drop(plan, r)
        else:
            self._swap_out(plan, r, sync)
        return n

    def _finish(self, r: Request, now: float) -> None:
        del self.requests[r.request_id]
        self._on_remove(r)  # while the request still shows where its KV is
        self.blocks.free(r)
        r.state = RequestState.FINISHED
        r.finish_time = now
        self.stats.num_finished += 1

    # ------------------------------------------------------------------ verification

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if block accounting, request states or the policy's own queues are
        inconsistent (tests, debugging, the simulator's ``check=True``; O(pool + live requests), never called on
        the hot path)."""
        self.blocks.check(self.requests.values())
        for rid, r in self.requests.items():
            if r.request_id != rid:
                raise AssertionError(f"request {r.request_id!r} is live under the id {rid!r}")
            if r.state not in _LIVE_STATES:
                raise AssertionError(f"request {rid!r} is live in state {r.state.value}")
            if not 0 <= r.num_generated_tokens < r.max_new_tokens:
                raise AssertionError(f"request {rid!r} is live with {r.num_generated_tokens} generated tokens of "
                                     f"max_new_tokens {r.max_new_tokens} (it finishes when it reaches them)")
            if not 0 <= r.num_computed_tokens <= r.num_tokens:
                raise AssertionError(f"request {rid!r}: {r.num_computed_tokens} computed tokens of {r.num_tokens} known")
            loc = r.kv_location
            if r.state is RequestState.SWAPPED and loc is not KVLocation.HOST:
                raise AssertionError(f"request {r.request_id!r} is SWAPPED but its KV is {loc.value}")
            if loc is KVLocation.HOST and r.state is not RequestState.SWAPPED:
                raise AssertionError(f"request {r.request_id!r} has KV on the host but state {r.state.value}")
            if loc is KVLocation.NONE and r.num_computed_tokens:
                raise AssertionError(f"request {r.request_id!r} has {r.num_computed_tokens} computed tokens but no KV")
            if loc is not KVLocation.NONE and len(r.blocks) < self.blocks.blocks_for_tokens(r.num_computed_tokens):
                raise AssertionError(f"request {r.request_id!r}: {len(r.blocks)} blocks hold fewer than its computed tokens")
        self._check_queues()

    def _check_queues(self) -> None:
        """Hook for ``check_invariants``: raise ``AssertionError`` if the policy's own queues disagree with the
        live requests (a live request in no queue never runs again). Every built-in policy overrides it, most
        through ``_check_partition``; a policy of your own should too. O(live requests)."""

    def _check_partition(self, queues: dict) -> None:
        """Check that the policy's queues partition the live requests: ``queues`` maps a queue's name to
        ``(its requests, the KV locations allowed in it)``. Every live request must be in exactly one queue, every
        queued request must be live (the very object), and its ``kv_location`` one that its queue allows."""
        live = self.requests
        seen: dict[int, str] = {}
        for qname, (members, allowed) in queues.items():
            for r in members:
                if live.get(r.request_id) is not r:
                    raise AssertionError(f"{self.name}: request {r.request_id!r} is in its {qname} but not live")
                if id(r) in seen:
                    raise AssertionError(f"{self.name}: request {r.request_id!r} is in its {seen[id(r)]} and "
                                         f"{'again in it' if seen[id(r)] == qname else 'in its ' + qname}")
                seen[id(r)] = qname
                if r.kv_location not in allowed:
                    raise AssertionError(f"{self.name}: request {r.request_id!r} is in its {qname} with its KV on "
                                         f"{r.kv_location.value} (allowed there: "
                                         f"{', '.join(a.value for a in allowed)})")
        if len(seen) != len(live):
            lost = [rid for rid, r in live.items() if id(r) not in seen]
            raise AssertionError(f"{self.name}: live requests {lost[:8]} (KV on "
                                 f"{', '.join(sorted({live[rid].kv_location.value for rid in lost}))}) are in none of "
                                 f"its queues ({', '.join(queues)}): they would never run again")


_LIVE_STATES = (RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPED)


def chunk_tokens(r: Request, budget: int, max_tokens_per_batch: int) -> int:
    """Tokens ``r`` may compute with ``budget`` tokens left: all of its uncomputed tokens if they fit, a
    chunk of the budget if they could never fit in one step, else 0 (wait for a step with room)."""
    n = r.num_uncomputed_tokens
    if n <= budget:
        return n
    if n > max_tokens_per_batch:
        return budget
    return 0


def _check_time(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite time >= 0 in seconds, got {value!r}")


__all__ = ["PolicyBase", "SchedulerStats", "BlockError", "chunk_tokens"]
