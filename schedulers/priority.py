"""``PriorityScheduler``: preemptive priority batching with device/host KV management, shared by
``fastserve``/``mlfq`` (skip-join MLFQ), ``fixed-priority`` and ``srpt``.

A subclass defines the priority: every live request carries ``sched_key`` (a tuple, smaller runs first, the
last element a unique queue-entry number so that ties are FIFO). The core keeps three sorted indexes by
where the KV lives (none / device / host) and, every iteration:

1. **Batch** (rebuilt from scratch): scan requests in priority order (a merge of the indexes) and take each
   one that can run now while the batch has fewer than ``max_batch_size`` requests and the token budget
   lasts. A prefill is whole (a prompt longer than the whole budget is chunked: its first chunk takes the
   blocks of all its known tokens, and it is never evicted until it samples, so a drop cannot throw its chunks
   away over and over); a prefill that does not fit
   the remaining budget or the free blocks stops the admission of further prefills in this step (no
   overtaking); decodes of started requests keep joining. A request whose KV is on the host cannot run in
   this step (proactive mode) unless ``swap_mode`` is ``reactive``, where it is swapped in on the critical
   path and runs at once.
2. **Memory**, by ``swap_mode``:

   * ``reactive`` / ``recompute``: when a request in the scan needs blocks that are not free, idle device
     requests of lower priority are evicted on the critical path (synchronous swap-out, or dropped for
     recompute) until it fits; nothing moves otherwise.
   * ``proactive``: nothing in the scan waits for a copy. After the batch is fixed, overlapped copies
     (``swap_out``/``swap_in``) prepare the next steps, in this order:

     a. *blocked*: the highest-priority request that could not run for lack of blocks gets them, when
        offloading lower-priority device requests can make room for it (it runs next step). The scan picks
        its victims when it meets it, the best first (largest ENST for fastserve), just enough of them; they
        sit out of the batch and are offloaded after it, and the rest of the scan allocates no new blocks.
        When no offload can make room for it (higher-priority requests hold the blocks it lacks) nothing is
        set aside in this step: lower-priority requests keep running, as in the other modes;
     b. *wanted*: host requests that would have been in this batch (priority above the batch's cutoff) are
        uploaded, highest priority first; when blocks are short, idle requests worth evicting for them are
        offloaded (an exchange) and the upload follows next step. Neither b nor d uploads a request of lower
        priority than the blocked one into the blocks that a freed for it (else two idle requests can trade
        places every step while the blocked one waits, with no compute: a livelock that the property tests
        found);
     c. *reserve*: offload until ``reserve_blocks`` device blocks will be free (for arrivals);
     d. *prefetch*: upload further host requests while ``reserve + upload_margin`` blocks stay free.

     Offload victims and uploads are ranked by the subclass (``_victim_order``/``_upload_order``: ENST for
     fastserve, queue order otherwise). A victim must rank below the request it makes room for; with ENST,
     its ENST must exceed that request's ENST by the round-trip copy time (hysteresis). b-d are limited to
     the copies the step's compute hides (``swap_overlap_factor``), except that the first copy of a step is
     always allowed, so the most urgent request always progresses. With ``upload_only_without_offload``
     (the artifact), b-d upload nothing in a step that offloads, and b never exchanges.

Every eviction swaps out if the host pool has room, else drops the request for recompute. If a proactive
plan would otherwise be empty because its only action was such a drop (which frees blocks at once), the scan
runs again so that the executor never idles while work is possible.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Iterator

from .cost import plan_compute_time
from .plan import StepPlan
from .policy import PolicyBase, chunk_tokens
from .request import KVLocation, Request
from .reserve import BurstReserve

_INF_KEY = (float("inf"),)


class SortedQueue:
    """Requests sorted by ``sched_key`` (unique keys). ``entries`` holds ``(key, request)`` pairs."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[tuple, Request]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, r: Request) -> None:
        insort(self.entries, (r.sched_key, r))

    def remove(self, r: Request) -> None:
        entries = self.entries
        i = bisect_left(entries, (r.sched_key,))
        if i == len(entries) or entries[i][1] is not r:
            raise KeyError(f"request {r.request_id!r} is not in this queue (key {r.sched_key})")
        del entries[i]

    def requests(self) -> Iterator[Request]:
        for _, r in self.entries:
            yield r


class PriorityScheduler(PolicyBase):
    """Batch by priority, manage KV by ``swap_mode`` (see the module docstring). Subclasses set keys."""

    def __init__(self, config, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self._index = {
            KVLocation.NONE: SortedQueue(),
            KVLocation.DEVICE: SortedQueue(),
            KVLocation.HOST: SortedQueue(),
        }
        self._deferring = False
        self._deferred: dict[int, tuple[Request, KVLocation]] = {}
        # id(request) -> its generated-token count when a prefill or recompute spanning several steps started:
        # until it samples again it is never evicted (``_catching_up``).
        self._catching: dict[int, int] = {}
        self._burst = None  # BurstReserve when the reserve is sized from arrival bursts (proactive mode)
        if config.swap_mode == "proactive" and config.reserve_window is not None:
            cap = int(config.reserve_cap_fraction * self.blocks.num_usable_device_blocks)
            self._burst = BurstReserve(
                config.reserve_window, config.reserve_history, config.effective_reserve_blocks, cap
            )

    # ------------------------------------------------------------------ subclass hooks

    def _initial_key(self, r: Request, now: float) -> tuple:
        raise NotImplementedError

    def _pre_step(self, now: float) -> None:
        """Called at the start of every ``schedule`` (starvation promotion)."""

    def _enst(self, r: Request, now: float) -> float | None:
        """Estimated time until ``r`` is next scheduled, or None when the policy ranks by queue order."""
        return None

    def _victim_order(self, now: float, exclude: set[int]) -> Iterator[Request]:
        """Device requests, best eviction victim first (default: lowest priority first). Callers skip the
        excluded and moved ones; the indexes do not change while a plan is built."""
        for _, r in reversed(self._index[KVLocation.DEVICE].entries):
            yield r

    def _upload_order(self, now: float) -> Iterator[Request]:
        """Host requests, most urgent upload first (default: priority order)."""
        for _, r in self._index[KVLocation.HOST].entries:
            yield r

    # ------------------------------------------------------------------ index maintenance

    def add(self, request: Request, now: float) -> bool:
        admitted = super().add(request, now)
        if admitted and self._burst is not None:  # arrivals size the reserve (schedulers/reserve.py)
            self._burst.record(now, -(-request.prompt_len // self.config.block_size))
        return admitted

    def _on_admit(self, r: Request, now: float) -> None:
        r.sched_key = self._initial_key(r, now)
        self._index[r.kv_location].add(r)

    def _on_remove(self, r: Request) -> None:
        self._index[r.kv_location].remove(r)
        self._catching.pop(id(r), None)

    def _catching_up(self, r: Request) -> bool:
        """``r`` is partway through a prefill or recompute that spans several steps and has not sampled since it
        began. Such a request is never evicted: with promotion flipping priorities every
        ``starvation_threshold`` seconds and no host room (every eviction a drop), two requests whose recompute
        took longer than that dropped each other forever and sampled nothing (a livelock the property tests
        found). It holds the blocks of all its tokens from its first chunk, so it is never short of blocks."""
        started = self._catching.get(id(r))
        if started is None:
            return False
        if r.num_generated_tokens != started or r.kv_location is not KVLocation.DEVICE:
            del self._catching[id(r)]
            return False
        return True

    def _on_location_change(self, r: Request, old: KVLocation) -> None:
        if self._deferring:
            self._deferred.setdefault(id(r), (r, old))
        else:
            self._index[old].remove(r)
            self._index[r.kv_location].add(r)

    def _rekey(self, r: Request, key: tuple) -> None:
        q = self._index[r.kv_location]
        q.remove(r)
        r.sched_key = key
        q.add(r)

    def _apply_deferred(self) -> None:
        self._deferring = False
        for r, old in self._deferred.values():
            if r.kv_location is not old:
                self._index[old].remove(r)
                self._index[r.kv_location].add(r)
        self._deferred.clear()

    def _check_queues(self) -> None:
        """Every live request is in the index of its ``kv_location``, once, under its ``sched_key``, and each
        index is sorted; no index move is pending outside a plan."""
        if self._deferring or self._deferred:
            raise AssertionError(f"{self.name}: index moves are pending outside a plan: "
                                 f"{[r.request_id for r, _ in self._deferred.values()][:8]}")
        queues = {}
        for loc, q in self._index.items():
            prev = None
            for key, r in q.entries:
                if key != r.sched_key:
                    raise AssertionError(f"{self.name}: request {r.request_id!r} sits in the {loc.value} index under "
                                         f"the key {key}, its sched_key is {r.sched_key}")
                if prev is not None and not prev < key:
                    raise AssertionError(f"{self.name}: the {loc.value} index is out of order at {r.request_id!r} "
                                         f"(key {key} after {prev})")
                prev = key
            queues[f"{loc.value} index"] = (q.requests(), (loc,))
        self._check_partition(queues)
        live = {id(r) for r in self.requests.values()}
        if any(k not in live for k in self._catching):
            raise AssertionError(f"{self.name}: a request that is not live is marked as catching up")

    def queue_snapshot(self) -> list[Request]:
        """Every live request in priority order (for traces and tests; O(n))."""
        merged = [e for q in self._index.values() for e in q.entries]
        merged.sort(key=lambda e: e[0])
        return [r for _, r in merged]

    # ------------------------------------------------------------------ the step

    def _build_plan(self, plan: StepPlan, now: float) -> None:
        self._pre_step(now)
        mode = self.config.swap_mode
        # Index moves are applied after the whole plan is built, so that the scans below walk stable lists;
        # requests moved in this step are recognised through ``self._deferred``.
        self._deferring = True
        try:
            cutoff, blocked, in_batch = self._scan(plan, now, mode)
            if mode == "proactive":
                self._proactive(plan, now, cutoff, blocked, in_batch)
                if plan.is_empty and plan.dropped:
                    # Victims were dropped (host pool full), which frees blocks at once: fill the batch
                    # now rather than return a plan that would let the executor idle.
                    self._scan(plan, now, mode)
        finally:
            self._apply_deferred()

    def _scan(self, plan: StepPlan, now: float, mode: str):
        """Fill the batch in priority order. Returns (cutoff key, the blocked request with the blocks it needs and
        its victims or None, ids in batch)."""
        cfg = self.config
        blocks = self.blocks
        max_batch = cfg.max_batch_size
        max_tokens = cfg.max_tokens_per_batch
        budget = max_tokens
        dev = self._index[KVLocation.DEVICE].entries
        new = self._index[KVLocation.NONE].entries
        host = self._index[KVLocation.HOST].entries if mode == "reactive" else []
        nd, nn, nh = len(dev), len(new), len(host)
        i = j = k = 0
        admit_open = True
        blocked: tuple[Request, int, list[Request]] | None = None  # (request, blocks it needs, its victims)
        held: set[int] = set()  # the blocked request's victims: they sit out of the batch (proactive)
        sought = False  # whether the victims of the first blocked request were looked for (proactive)
        in_batch: set[int] = set()
        moved = self._deferred
        count = 0
        while count < max_batch and budget > 0:
            kd = dev[i][0] if i < nd else _INF_KEY
            kn = new[j][0] if admit_open and j < nn else _INF_KEY
            kh = host[k][0] if k < nh else _INF_KEY
            if kd <= kn and kd <= kh:
                if kd is _INF_KEY:
                    break
                r = dev[i][1]
                i += 1
            elif kn <= kh:
                r = new[j][1]
                j += 1
            else:
                r = host[k][1]
                k += 1
            if id(r) in moved:  # evicted earlier in this scan
                continue
            n = chunk_tokens(r, budget, max_tokens)
            loc = r.kv_location
            if n == 0:
                if loc is KVLocation.NONE:
                    admit_open = False
                continue
            # A prefill that spans several steps (only when it exceeds the whole token budget) takes the blocks
            # of every token it knows at its first chunk: it is then never short of blocks, and is never
            # evicted, until it samples (``_catching_up``). Evicting it midway would throw its chunks away.
            alloc = r.num_tokens if (r.num_computed_tokens == 0 and n < r.num_uncomputed_tokens) else 0
            need = self._blocks_needed(r, n, alloc)
            if blocked is not None:
                # Proactive: the blocked request's victims sit out (they are offloaded after the scan), and the
                # free blocks are earmarked for it.
                if id(r) in held:
                    continue
                if need > 0:
                    if loc is KVLocation.NONE:
                        admit_open = False
                    continue
            if need > blocks.num_free_device_blocks:
                if mode != "proactive":
                    self._make_room_now(plan, now, r, need, in_batch, recompute=mode == "recompute")
                    need = self._blocks_needed(r, n, alloc)  # evictions may have released cached blocks
                elif not sought:  # the first blocked request only: one victim search per step
                    sought = True
                    victims = self._victims_to_free(r, need, blocks.num_free_device_blocks, now, in_batch)
                    if victims is not None:  # else no offload can help: everyone keeps running
                        blocked = (r, need, victims)
                        held = {id(v) for v in victims}
                if need > blocks.num_free_device_blocks:
                    if loc is KVLocation.NONE:
                        admit_open = False
                    continue
            if loc is KVLocation.HOST:
                self._swap_in(plan, r, sync=True)
            n = self._take(plan, r, n, alloc)
            if alloc:
                self._catching[id(r)] = r.num_generated_tokens
            budget -= n
            count += 1
            in_batch.add(id(r))
        cutoff = min(
            dev[i][0] if i < nd else _INF_KEY,
            new[j][0] if admit_open and j < nn else _INF_KEY,
            host[k][0] if k < nh else _INF_KEY,
        )
        return cutoff, blocked, in_batch

    def _make_room_now(self, plan: StepPlan, now: float, r: Request, need: int, in_batch: set[int], recompute: bool) -> None:
        """Critical-path eviction of lower-priority idle device requests so that ``need`` blocks are free."""
        victims = self._victims_to_free(r, need, self.blocks.num_free_device_blocks, now, in_batch)
        for v in victims or ():  # None: evicting cannot help; leave everyone in place
            self._evict(plan, v, recompute=recompute, sync=True)

    def _victims_to_free(self, r: Request, need: int, have: int, now: float, exclude: set[int],
                         enst_gap: bool = False) -> list[Request] | None:
        """The first victims for ``r`` (best first, ``_victims_for``) whose blocks bring ``have`` free blocks up
        to ``need``: [] when ``have`` suffices, None when all of them together would not."""
        if have >= need:
            return []
        chosen = []
        for v in self._victims_for(r, now, exclude, enst_gap=enst_gap):
            chosen.append(v)
            have += self.blocks.num_releasable(v)
            if have >= need:
                return chosen
        return None

    def _victims_for(self, r: Request | None, now: float, exclude: set[int], enst_gap: bool) -> Iterator[Request]:
        """Idle device requests that may be evicted to make room for ``r`` (any, when ``r`` is None), best
        first. A victim always ranks below ``r``; with ``enst_gap`` (exchanges) and an ENST policy, its ENST
        must also exceed ``r``'s by the round-trip copy time of both."""
        moved = self._deferred
        enst_r = self._enst(r, now) if (r is not None and enst_gap) else None
        cost = self.cost_model
        for v in self._victim_order(now, exclude):
            if id(v) in moved or id(v) in exclude or v.kv_location is not KVLocation.DEVICE or self._catching_up(v):
                continue
            if r is not None:
                if v.sched_key <= r.sched_key:
                    continue
                if enst_r is not None:
                    gap = self._enst(v, now) - enst_r
                    if cost is not None:
                        gap -= cost.swap_time(len(v.blocks)) + cost.swap_time(len(r.blocks))
                    if gap <= 0:
                        continue
            yield v

    # ------------------------------------------------------------------ proactive KV management

    def _proactive(self, plan: StepPlan, now: float, cutoff: tuple, blocked, in_batch: set[int]) -> None:
        cfg = self.config
        blocks = self.blocks
        reserve = cfg.effective_reserve_blocks if self._burst is None else self._burst.blocks(now)
        artifact = cfg.upload_only_without_offload
        moved = self._deferred
        exclude = set(in_batch)  # requests that compute or move in this step
        state = _Moves(self._swap_budget_blocks(plan))

        def offload(v: Request) -> None:
            exclude.add(id(v))
            state.released += blocks.num_releasable(v)
            state.offloaded = True
            state.copied += len(v.blocks)
            self._evict(plan, v, recompute=False, sync=False)

        def upload(h: Request) -> None:
            exclude.add(id(h))
            state.copied += len(h.blocks)
            self._swap_in(plan, h, sync=False)

        def spares_blocked(h: Request, n: int) -> bool:
            # Blocks that (a) freed for the blocked request are its own: an upload of a lower-priority request
            # may not take them (else the two idle requests trade places every step and nothing runs).
            return (earmark == 0 or h.sched_key < blocked[0].sched_key
                    or blocks.num_free_device_blocks - n + state.released >= earmark)

        def wanted_uploads() -> None:
            # b. Host requests that would have been in this batch, highest priority first.
            host_q = self._index[KVLocation.HOST].entries
            for key, h in host_q[: cfg.max_batch_size]:
                if key >= cutoff:
                    break
                if id(h) in moved:
                    continue
                n = len(h.blocks)
                if not spares_blocked(h, n):
                    break
                if n <= blocks.num_free_device_blocks and state.allows(n):
                    upload(h)
                    continue
                if not artifact:  # exchange: offload for it now, upload next step
                    self._offload_for(h, n, now, exclude, state, offload)
                break

        def keep_reserve() -> None:
            # c. Keep the reserve free for arrivals (best victims first).
            if blocks.num_free_device_blocks + state.released >= reserve:
                return
            for v in self._victims_for(None, now, exclude, enst_gap=False):
                if blocks.num_free_device_blocks + state.released >= reserve or not state.allows(len(v.blocks)):
                    break
                offload(v)

        # a. The highest-priority request that lacked blocks gets them: its victims, chosen by the scan, are
        # offloaded (not limited by the budget).
        earmark = 0  # free blocks at the end of this step that belong to the blocked request
        if blocked is not None:
            r, need, victims = blocked
            exclude.add(id(r))
            for v in victims:
                offload(v)
            earmark = need
        if artifact:  # offload first; upload only in a step that offloads nothing
            keep_reserve()
            if state.offloaded:
                return
            wanted_uploads()
        else:
            wanted_uploads()
            keep_reserve()
        # d. Prefetch while the reserve and the margin stay free.
        if artifact and state.offloaded:
            return
        keep = reserve + cfg.effective_upload_margin_blocks
        for h in self._upload_order(now):
            if id(h) in exclude or id(h) in moved or h.kv_location is not KVLocation.HOST:
                continue
            n = len(h.blocks)
            if blocks.num_free_device_blocks - n < keep or not state.allows(n) or not spares_blocked(h, n):
                break
            upload(h)

    def _offload_for(self, r, need, now, exclude, state, offload) -> None:
        """Exchange: offload victims worth their round trip (``enst_gap``) for ``r`` until ``need`` blocks are
        free after this step, within the step's copy budget (nothing when that is not possible)."""
        have = self.blocks.num_free_device_blocks + state.released
        for v in self._victims_to_free(r, need, have, now, exclude, enst_gap=True) or ():
            if not state.allows(len(v.blocks)):
                return
            offload(v)

    def _swap_budget_blocks(self, plan: StepPlan) -> float:
        """Blocks of overlapped copies that this step's compute hides (``swap_overlap_factor``)."""
        factor = self.config.swap_overlap_factor
        cost = self.cost_model
        if factor is None or cost is None:
            return float("inf")
        per_block = cost.swap_time(1)
        if per_block <= 0:
            return float("inf")
        return factor * plan_compute_time(cost, plan) / per_block


class _Moves:
    """Book-keeping of one step's proactive copies."""

    __slots__ = ("budget", "copied", "released", "offloaded")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.copied = 0  # blocks copied by overlapped swaps in this step
        self.released = 0  # device blocks that return at the end of the step
        self.offloaded = False

    def allows(self, n: int) -> bool:
        """The first copy of a step is always allowed; later ones only within the budget."""
        return self.copied == 0 or self.copied + n <= self.budget
