"""A tiny, strict executor for scheduler tests: applies plans to fake KV pools and checks every rule.

Every plan first passes ``schedulers.contract.check_plan`` and every step end ``check_step_end`` (the rules
that need no KV contents, which the simulator's ``check=True`` applies too; they include the scheduler's own
``check_invariants()``). On top of them the executor keeps a *content tag* in every device and host page:
``(request_id, logical_block)`` of the KV it holds. It performs a plan in the order ``schedulers.plan``
prescribes (sync swap-out, sync swap-in, then the compute together with the overlapped copies) and checks,
independently of the scheduler's own bookkeeping:

* a computing request's pages hold its own KV for every token already computed (so every swap mapping
  moved the right data to the right place), and its table covers the tokens it computes now;
* no request computes while its KV is on the host or arriving through an overlapped swap-in;
* overlapped copies never touch a page that the compute writes, and their sources are not reused;
* a prefix-cached page (a block with a ``prefix_hashes`` key, tagged by that key, so requests that share the
  key may read it) is never written by a step while another live request's table holds it; with
  ``grow_keys`` the executor keys generated blocks too, as an engine does: block ``i`` gets the key
  ``("gen", request_id, i)`` once the request knows its last token (its page, written so far under the
  request's own tag, is re-tagged: the key names the same tokens);
* batch size and token budget are respected; a request appears at most once in a step;
* rejected requests never run and are reported exactly once; block pools are conserved after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schedulers import KVLocation, Request, StepPlan
from schedulers.contract import check_plan, check_step_end


@dataclass
class RunResult:
    steps: int = 0
    finished: dict = field(default_factory=dict)  # request_id -> Request
    rejected: dict = field(default_factory=dict)  # request_id -> reason
    aborted: set = field(default_factory=set)
    plans: list = field(default_factory=list)  # kept when record=True
    max_device_used: int = 0


class StrictExecutor:
    def __init__(self, sched, step_time=None, record: bool = False, grow_keys: bool = False):
        self.s = sched
        self.grow_keys = grow_keys
        cfg = sched.config
        self.bs = cfg.block_size
        self.device: dict[int, tuple] = {}
        self.host: dict[int, tuple] = {}
        self.step_time = step_time  # callable(plan) -> seconds, default 1 ms + 0.01 ms per token
        self.result = RunResult()
        self.record = record
        self._reported_rejections: set = set()

    # ------------------------------------------------------------------ one step

    def step(self, now: float, early_stop=(), during=None) -> tuple[StepPlan, list[Request], float]:
        """Schedule, execute and end one step; ``during(plan)`` runs after execution, before on_step_end."""
        s = self.s
        plan = s.schedule(now)
        if self.record:
            self.result.plans.append(_summary(plan))
        # The rules that need no KV contents (batch and budget limits, live RUNNING device members, tables,
        # in-flight pages, pool ids, one-time rejections) are the contract's, shared with the simulator.
        check_plan(s, plan, self._reported_rejections)
        for r, reason in plan.rejected:
            self.result.rejected[r.request_id] = reason
        batch = plan.batch()
        for r in batch:
            assert r.request_id not in self.result.rejected

        # A swap-out copies a page. The copy of a prefix page (tagged by its key) leaves it in place, as on a
        # device, where a cached page keeps its contents until it is written again; any other swap-out
        # source is emptied, so that a read of it fails.
        def copy_out(d: int, h: int) -> None:
            got = self.device.get(d)
            self.host[h] = got if got is not None and got[0] == "prefix" else self.device.pop(d, None)

        # 1. Critical-path copies.
        for d, h in plan.sync_swap_out:
            copy_out(d, h)
        for h, d in plan.sync_swap_in:
            self.device[d] = self.host.pop(h, None)
        # 2. Compute (reads and writes) concurrently with overlapped copies. check_plan made sure that no page
        # it writes is another request's or touched by an overlapped copy; here the contents are checked.
        out_src = {d for d, _ in plan.swap_out}
        entries = [(e.request, e.num_tokens) for e in plan.prefill] + [(r, 1) for r in plan.decode]
        for r, n in entries:
            for b in out_src.intersection(r.blocks):  # only a prefix page shared with the request swapped out
                assert (self.device.get(b) or ("",))[0] == "prefix", f"{r.request_id} computes on blocks being swapped out"
            c = r.num_computed_tokens
            for i in range(-(-c // self.bs)):
                got = self.device.get(r.blocks[i])
                assert got == _tag(r, i), f"{r.request_id} block {i} (page {r.blocks[i]}) holds {got}"
            for i in range(c // self.bs, -(-(c + n) // self.bs)):
                self.device[r.blocks[i]] = _tag(r, i)
        for d, h in plan.swap_out:
            copy_out(d, h)
        for h, d in plan.swap_in:
            self.device[d] = self.host.pop(h, None)
        elapsed = self.step_time(plan) if self.step_time else 0.001 + 1e-5 * plan.num_batched_tokens
        if plan.is_empty:
            elapsed = 0.0
        finished_ids = []
        if early_stop:
            sampling = [e.request_id for e in plan.prefill if e.samples_token] + [r.request_id for r in plan.decode]
            finished_ids = [rid for rid in sampling if rid in early_stop]
        if during is not None:
            during(plan)
        finished = s.on_step_end(plan, now + elapsed, elapsed, finished_ids)
        if self.grow_keys:
            for r in batch:
                self._grow_keys(r)
        check_step_end(s, finished)  # finished requests hold nothing; the scheduler's check_invariants()
        for r in finished:
            self.result.finished[r.request_id] = r
        self.result.max_device_used = max(self.result.max_device_used, s.blocks.num_used_device_blocks)
        self.result.steps += 1
        return plan, finished, elapsed


    def _grow_keys(self, r: Request) -> None:
        """Key ``r``'s blocks whose tokens are all known now (it just sampled), and re-tag their pages."""
        if r.is_finished:
            return
        keys = list(r.prefix_hashes)
        for i in range(len(keys), r.num_tokens // self.bs):
            keys.append(("gen", r.request_id, i))
            if r.kv_location is KVLocation.DEVICE and i < len(r.blocks):
                page = r.blocks[i]
                if self.device.get(page) == (r.request_id, i):
                    self.device[page] = ("prefix", keys[i])
        r.prefix_hashes = tuple(keys)


def _tag(r: Request, i: int) -> tuple:
    """What logical block ``i`` of ``r`` holds: its prefix key for a keyed block (equal keys, equal KV), else
    the request's own block."""
    return ("prefix", r.prefix_hashes[i]) if i < len(r.prefix_hashes) else (r.request_id, i)


def _summary(plan: StepPlan) -> dict:
    return dict(
        prefill=[(e.request_id, e.num_tokens) for e in plan.prefill],
        decode=[r.request_id for r in plan.decode],
        swapped_out=[r.request_id for r in plan.swapped_out],
        swapped_in=[r.request_id for r in plan.swapped_in],
        sync=bool(plan.sync_swap_in or plan.sync_swap_out),
        dropped=[r.request_id for r in plan.dropped],
    )


def run_workload(sched, arrivals, max_steps=100_000, aborts=(), record=False, step_time=None, early_stop=(),
                 grow_keys=False):
    """Drive ``sched`` over ``arrivals`` (list of ``(time, Request)``) until every request is done.

    ``aborts`` holds ``(step_index, request_id)`` pairs; ``early_stop`` ids are reported in ``finished_ids`` at
    their first sampled token (an end-of-sequence stop). An empty plan with live requests and no pending
    arrival is a deadlock; more than ``max_steps`` steps is a livelock. Returns a ``RunResult``."""
    ex = StrictExecutor(sched, step_time=step_time, record=record, grow_keys=grow_keys)
    pending = sorted(arrivals, key=lambda a: a[0])
    aborts = sorted(aborts, key=lambda a: a[0])
    i = 0
    now = 0.0
    while True:
        while i < len(pending) and pending[i][0] <= now:
            sched.add(pending[i][1], now)
            i += 1
        while aborts and aborts[0][0] <= ex.result.steps:
            _, rid = aborts.pop(0)
            if sched.abort(rid):
                ex.result.aborted.add(rid)
        if not sched.has_unfinished() and i == len(pending):
            ex.step(now)  # flush the last rejections
            return ex.result
        assert ex.result.steps < max_steps, f"livelock: {len(sched.requests)} requests left after {max_steps} steps"
        plan, _, elapsed = ex.step(now, early_stop)
        if not plan.is_empty:
            now += elapsed
        elif i < len(pending):
            now = max(now, pending[i][0])
        else:
            raise AssertionError(f"deadlock: empty plan with {len(sched.requests)} live requests and no arrivals")
