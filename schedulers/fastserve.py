"""``fastserve`` (and ``mlfq``): skip-join multi-level feedback queues with proactive KV offload/upload.

The policy of the FastServe paper (NSDI'26), built on ``PriorityScheduler`` (batching and the KV machinery,
see ``schedulers.priority``). Priority is the queue level, FIFO within a level (``sched_key = (level,
entry number)``). Defaults follow the paper; ``SchedulerConfig.preset("artifact")`` gives the public
artifact's choices (``docs/schedulers.md`` has the table).

* **Queues.** ``num_queues`` levels; the quantum of level ``p`` is ``q0 * quantum_ratio ** p``. ``q0``
  defaults to the cost model's batch-1 decode iteration (the paper's "minimum iteration time"; the artifact
  uses 10 ms).
* **Skip-join.** An arriving job goes to the highest level whose quantum covers its predicted batch-1
  prefill time: ``p = min{p : quantum(p) >= prefill_time(prompt_len)}``. ``mlfq`` (``skip_join=False``)
  puts every job in level 0.
* **Demotion.** Each step adds its duration to the attained service of every job in the batch; a job whose
  attained service exceeds its level's quantum moves down one level (to the tail) and starts from zero.
* **Starvation promotion.** Every ``starvation_check_interval`` iterations, jobs that have not run for
  ``starvation_threshold`` seconds (alpha) move to the tail of level 0 with zero attained service. The clock
  restarts at the promotion, so a job is promoted at most once per alpha.
* **ENST** (estimated next scheduled time, ``offload_ranking="enst"``): ``min(time until its promotion,
  wait)``, where ``wait`` is the quantum that every job in a higher level will still use before it is
  demoted to this job's level, divided by ``max_batch_size``. The paper counts *higher-priority queues*, so
  jobs in the same level contribute nothing; FIFO order breaks ties. Kept per level with running counts and
  attained-service sums, so ENST is O(1) per job after an O(levels) pass per step. Offload takes the
  largest ENST first; upload the smallest first (an exact lazy merge of the level order and the starvation
  clock order). ``"queue_order"`` (the artifact) offloads the lowest priority and uploads the highest.

**Against promotion thrash** (DESIGN.md section 8: promotions reshuffle the batch, each reshuffle moves KV
over PCIe, PCIe-bound steps grow, more jobs starve): (1) a promotion only changes priority and never forces a
copy by itself; a promoted job on the host is uploaded when blocks are free or by an *exchange* that is
worth its round trip (victim ENST > its ENST + both copy times); (2) ENST keeps jobs that are about to be
promoted on the device, since their ENST is small; (3) proactive copies beyond the first of a step are
limited to what the step's compute hides (``swap_overlap_factor``), so copies do not lengthen iterations,
and speculative uploads leave ``upload_margin_blocks`` above the reserve (hysteresis between offload and
upload).

Without a cost model the policy uses ``cost.default_cost_model()`` (OPT-13B on an A100, the paper's setting).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from heapq import heapify, heappop
from collections import OrderedDict
from typing import Iterator

from .cost import default_cost_model
from .priority import PriorityScheduler
from .request import KVLocation, Request


class FastServeScheduler(PriorityScheduler):
    """Skip-join MLFQ with proactive (or reactive / recompute) KV management."""

    name = "fastserve"

    def __init__(self, config, cost_model=None) -> None:
        if cost_model is None:
            cost_model = default_cost_model()
        super().__init__(config, cost_model)
        cfg = self.config
        q0 = cfg.q0 if cfg.q0 is not None else cost_model.decode_time(1, 1)
        if not q0 > 0:
            raise ValueError(f"fastserve: q0 must be > 0; the cost model's batch-1 decode time is {q0!r}")
        ratio = float(cfg.quantum_ratio)
        if not math.isfinite(q0) or not math.isfinite(q0 * ratio ** (cfg.num_queues - 1)):
            raise ValueError(f"fastserve: the last level's quantum, q0 * quantum_ratio ** (num_queues - 1) = {q0!r} * "
                             f"{ratio!r} ** {cfg.num_queues - 1}, overflows a float (q0 "
                             f"{'from SchedulerConfig.q0' if cfg.q0 is not None else 'is the cost model decode time'}); "
                             f"lower num_queues or quantum_ratio")
        self.q0 = q0
        self.quanta = [q0 * ratio**p for p in range(cfg.num_queues)]
        self.level_count = [0] * cfg.num_queues
        self.level_attained = [0.0] * cfg.num_queues
        self._clock_order: OrderedDict = OrderedDict()  # request_id -> Request, oldest starvation clock first
        self._wait_dirty = True
        self._wait: list[float] = []
        self._use_enst = cfg.offload_ranking == "enst"

    # ------------------------------------------------------------------ levels

    def join_level(self, prompt_len: int) -> int:
        """Skip-join level of a prompt: the first level whose quantum covers its batch-1 prefill time."""
        if not self.config.skip_join:
            return 0
        t = self.cost_model.prefill_time(prompt_len)
        return min(bisect_left(self.quanta, t), len(self.quanta) - 1)

    def _on_admit(self, r: Request, now: float) -> None:
        p = self.join_level(r.prompt_len)
        r.priority_level = p
        r.attained_service = 0.0
        r.sched_key = (p, self._next_seq())
        self.level_count[p] += 1
        self._wait_dirty = True
        self._clock_order[r.request_id] = r
        self._index[r.kv_location].add(r)

    def _on_remove(self, r: Request) -> None:
        super()._on_remove(r)
        p = r.priority_level
        self.level_count[p] -= 1
        self.level_attained[p] -= r.attained_service
        self._wait_dirty = True
        del self._clock_order[r.request_id]

    def _set_level(self, r: Request, p: int) -> None:
        old = r.priority_level
        self.level_count[old] -= 1
        self.level_attained[old] -= r.attained_service
        r.priority_level = p
        r.attained_service = 0.0
        self.level_count[p] += 1
        self._wait_dirty = True
        self._rekey(r, (p, self._next_seq()))

    def _check_queues(self) -> None:
        """The indexes (``PriorityScheduler``), plus: every live request's level is a level and its key's first
        element; ``level_count`` / ``level_attained`` are the per-level counts and attained-service sums of the
        live requests; the starvation-clock order holds exactly the live requests."""
        super()._check_queues()
        levels = len(self.quanta)
        count = [0] * levels
        attained = [0.0] * levels
        for r in self.requests.values():
            p = r.priority_level
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < levels:
                raise AssertionError(f"{self.name}: request {r.request_id!r} is at level {p!r} of {levels}")
            if r.sched_key[0] != p:
                raise AssertionError(f"{self.name}: request {r.request_id!r} is at level {p} under the key {r.sched_key}")
            if not (math.isfinite(r.attained_service) and r.attained_service >= 0.0):
                raise AssertionError(f"{self.name}: request {r.request_id!r} attained {r.attained_service!r} s")
            count[p] += 1
            attained[p] += r.attained_service
        if count != self.level_count:
            bad = [p for p in range(levels) if count[p] != self.level_count[p]]
            raise AssertionError(f"{self.name}: level_count {[self.level_count[p] for p in bad]} at levels {bad}, "
                                 f"but {[count[p] for p in bad]} live requests are there")
        for p in range(levels):
            if not math.isclose(attained[p], self.level_attained[p], rel_tol=1e-9, abs_tol=1e-6):
                raise AssertionError(f"{self.name}: level_attained[{p}] is {self.level_attained[p]!r} s, but its live "
                                     f"requests attained {attained[p]!r} s")
        clock = self._clock_order
        if len(clock) != len(self.requests) or any(self.requests.get(rid) is not r for rid, r in clock.items()):
            raise AssertionError(f"{self.name}: the starvation-clock order does not hold exactly the live requests")

    # ------------------------------------------------------------------ per-step accounting

    def _pre_step(self, now: float) -> None:
        alpha = self.config.starvation_threshold
        if alpha is None or self.iteration % self.config.starvation_check_interval:
            return
        due = []
        for r in self._clock_order.values():
            if r.starvation_clock + alpha > now:
                break
            due.append(r)
        to_top = self.config.promotion == "to_top"
        for r in due:
            if r.priority_level > 0:
                self._set_level(r, 0 if to_top else r.priority_level - 1)
                self.stats.num_promotions += 1
            r.starvation_clock = now
            self._clock_order.move_to_end(r.request_id)

    def _after_step(self, plan, now: float, elapsed: float) -> None:
        last = len(self.quanta) - 1
        self._wait_dirty = True
        for r in plan.batch():
            if r.is_finished:
                continue
            p = r.priority_level
            r.attained_service += elapsed
            self.level_attained[p] += elapsed
            r.starvation_clock = now
            self._clock_order.move_to_end(r.request_id)
            if r.attained_service > self.quanta[p] and p < last:
                self._set_level(r, p + 1)
                self.stats.num_demotions += 1

    # ------------------------------------------------------------------ ENST

    def level_wait(self) -> list[float]:
        """Per level, the wait behind every job in higher levels (seconds; O(levels), recomputed only after
        levels or attained service changed)."""
        if self._wait_dirty:
            quanta, count, att = self.quanta, self.level_count, self.level_attained
            b = self.config.max_batch_size
            wait = [0.0] * len(quanta)
            acc = 0.0
            n_above = 0
            for p in range(len(quanta) - 1):
                n_above += count[p]
                acc += n_above * quanta[p] - att[p]
                wait[p + 1] = max(acc, 0.0) / b
            self._wait = wait
            self._wait_dirty = False
        return self._wait

    def _starve_left(self, r: Request, now: float) -> float:
        alpha = self.config.starvation_threshold
        if alpha is None:
            return float("inf")
        left = alpha - (now - r.starvation_clock)
        return left if left > 0.0 else 0.0

    def enst(self, r: Request, now: float) -> float:
        """Estimated next scheduled time of ``r``, in seconds from ``now``."""
        w = self.level_wait()[r.priority_level]
        s = self._starve_left(r, now)
        return w if w < s else s

    def _enst(self, r: Request, now: float) -> float | None:
        return self.enst(r, now) if self._use_enst else None

    def _victim_order(self, now: float, exclude: set[int]) -> Iterator[Request]:
        if not self._use_enst:
            yield from super()._victim_order(now, exclude)
            return
        moved = self._deferred
        wait = self.level_wait()
        alpha = self.config.starvation_threshold
        heap = []
        for i, (_, r) in enumerate(reversed(self._index[KVLocation.DEVICE].entries)):
            if id(r) in exclude or id(r) in moved:
                continue
            w = wait[r.priority_level]
            if alpha is not None:
                s = r.starvation_clock + alpha - now  # time until its starvation promotion
                if s < w:
                    w = s if s > 0.0 else 0.0
            heap.append((-w, i, r))  # largest ENST first; ties: lowest priority first
        heapify(heap)
        while heap:
            yield heappop(heap)[2]

    def _upload_order(self, now: float) -> Iterator[Request]:
        if not self._use_enst or self.config.starvation_threshold is None:
            yield from super()._upload_order(now)
            return
        # Lazy merge of two streams sorted by their own key: host jobs by level wait (priority order) and
        # all jobs by time until promotion (clock order). The first appearance of each host job is in
        # ascending min(wait, time-to-promotion) = ENST order.
        wait = self.level_wait()
        host = (r for _, r in self._index[KVLocation.HOST].entries)  # indexes are stable while planning
        clock_iter = iter(self._clock_order.values())
        seen: set[int] = set()
        nxt = next(clock_iter, None)
        for r in host:
            w = wait[r.priority_level]
            while nxt is not None and self._starve_left(nxt, now) <= w:
                if nxt.kv_location is KVLocation.HOST and id(nxt) not in seen:
                    seen.add(id(nxt))
                    yield nxt
                nxt = next(clock_iter, None)
            if id(r) not in seen:
                seen.add(id(r))
                yield r
