"""The executor contract as checks: one set of rules for every executor that wants to verify a policy.

``check_plan(scheduler, plan)`` checks a plan just returned by ``schedule`` (before it runs);
``check_step_end(scheduler, finished)`` checks the state after ``on_step_end``, including the scheduler's own
``check_invariants()`` (block accounting and its queues). Both raise ``AssertionError`` naming the fault
(explicit raises: they hold under ``python -O``). The simulator's ``check=True`` and the test harness
(``tests/schedulers/sched_harness.py``) both call them; the harness adds what only an executor with fake KV
contents can check (that every swap moved the right data).

The rules need no KV contents, only the plan, the scheduler's live requests and its configuration
(``docs/schedulers.md``, "The contract"):

* a request appears at most once in a batch; ``max_batch_size`` and ``max_tokens_per_batch`` hold (every
  prefill token and one per decode);
* every batch member is live (the very object the scheduler holds), RUNNING, with its KV on the device and a
  block table covering the tokens it has computed and computes now; a prefill computes 1 to its uncomputed
  tokens, a decode exactly its one uncomputed token;
* nothing computes while its KV is still arriving: no page of a batch member is the destination of an
  overlapped ``swap_in`` (whatever else the plan copies, synchronously or not);
* the pages a step writes (those holding tokens it computes) belong to the writer alone, and no overlapped
  copy reads or fills them;
* a synchronous swap-in (run before the step) never reads a host page that an overlapped swap-out of the
  same step writes only later;
* swap pairs name physical pages of the right pools, never a reserved device page;
* ``dropped`` requests hold no KV and have nothing computed; ``rejected`` ones are REJECTED with a reason,
  are not live, and (when the caller keeps ``reported``) are reported once.
"""

from __future__ import annotations

from .request import KVLocation, RequestState


def check_plan(scheduler, plan, reported: set | None = None) -> None:
    """Check ``plan`` (just returned by ``scheduler.schedule``, not yet executed) against the contract.

    ``reported``: ids of requests already reported as rejected by earlier plans of this scheduler; when
    given, a second report fails and this plan's rejections are added to it."""
    cfg = scheduler.config
    live = scheduler.requests
    for r, reason in plan.rejected:
        if r.state is not RequestState.REJECTED or not reason:
            raise AssertionError(f"request {r.request_id!r} is reported rejected with state {r.state.value} and "
                                 f"reason {reason!r}")
        if live.get(r.request_id) is r:
            raise AssertionError(f"request {r.request_id!r} is reported rejected but is live")
        if reported is not None:
            if r.request_id in reported:
                raise AssertionError(f"request {r.request_id!r} is reported rejected twice")
            reported.add(r.request_id)
    batch = plan.batch()
    ids = [r.request_id for r in batch]
    if len(set(ids)) != len(ids):
        raise AssertionError(f"a request appears twice in one batch: {ids}")
    if len(batch) > cfg.max_batch_size:
        raise AssertionError(f"batch of {len(batch)} exceeds max_batch_size={cfg.max_batch_size}")
    if plan.num_batched_tokens > cfg.max_tokens_per_batch:
        raise AssertionError(
            f"the batch schedules {plan.num_batched_tokens} tokens, over max_tokens_per_batch={cfg.max_tokens_per_batch}"
        )
    for r in batch:
        if live.get(r.request_id) is not r:
            raise AssertionError(f"request {r.request_id!r} is in the batch but not live in the scheduler")
        if r.state is not RequestState.RUNNING:
            raise AssertionError(f"request {r.request_id!r} is in the batch in state {r.state.value}")
        if r.kv_location is not KVLocation.DEVICE:
            raise AssertionError(f"request {r.request_id!r} computes but its KV is on {r.kv_location.value}")

    reserved = set(cfg.reserved_device_ids)
    ndev, nhost = cfg.num_device_blocks, cfg.num_host_blocks
    for what, pairs, dev_at in (("swap_out", plan.swap_out, 0), ("sync_swap_out", plan.sync_swap_out, 0),
                                ("swap_in", plan.swap_in, 1), ("sync_swap_in", plan.sync_swap_in, 1)):
        for pair in pairs:
            d, h = pair[dev_at], pair[1 - dev_at]
            if not (_is_index(d, ndev) and d not in reserved and _is_index(h, nhost)):
                raise AssertionError(f"{what} pair {pair!r} is not (device page, host page) ids of the pools "
                                     f"({ndev} device pages less reserved {sorted(reserved)}, {nhost} host pages)")
    late_host = {h for _, h in plan.swap_out}
    early_reads = late_host.intersection(h for h, _ in plan.sync_swap_in)
    if early_reads:
        raise AssertionError(f"a sync swap-in reads host pages {sorted(early_reads)[:8]} that an overlapped swap-out "
                             f"of the same step writes only after it")

    in_flight = {d for _, d in plan.swap_in}
    out_src = {d for d, _ in plan.swap_out}
    bs = cfg.block_size
    entries = [(e.request, e.num_tokens) for e in plan.prefill] + [(r, 1) for r in plan.decode]
    holders: dict[int, object] | None = None
    for r, n in entries:
        rid = r.request_id
        if not 1 <= n <= r.num_uncomputed_tokens:
            raise AssertionError(f"request {rid!r}: {n} tokens scheduled, {r.num_uncomputed_tokens} uncomputed")
        c = r.num_computed_tokens
        if len(r.blocks) * bs < c + n:
            raise AssertionError(f"request {rid!r}: {len(r.blocks)} blocks cannot hold {c} + {n} tokens")
        arriving = in_flight.intersection(r.blocks)
        if arriving:
            raise AssertionError(f"request {rid!r} computes while its KV is still arriving through an overlapped "
                                 f"swap_in (pages {sorted(arriving)[:8]})")
        written = r.blocks[c // bs: -(-(c + n) // bs)]
        bad = out_src.intersection(written)
        if bad:
            raise AssertionError(f"request {rid!r} writes pages {sorted(bad)[:8]} that an overlapped swap-out reads")
        if holders is None:  # built once, only for plans that compute
            holders = {}
            for q in live.values():
                if q.kv_location is KVLocation.DEVICE:
                    for b in q.blocks:
                        holders[b] = q if holders.get(b, q) is q else _SHARED
        for b in written:
            if holders.get(b) is not r:
                raise AssertionError(f"request {rid!r} writes page {b}, which another live request also holds")
    for r in plan.decode:
        if r.num_uncomputed_tokens != 1:
            raise AssertionError(f"request {r.request_id!r} decodes with {r.num_uncomputed_tokens} uncomputed tokens")
    for r in plan.dropped:
        if r.kv_location is not KVLocation.NONE or r.num_computed_tokens or r.blocks:
            raise AssertionError(f"dropped request {r.request_id!r} still has KV ({r.kv_location.value}, "
                                 f"{r.num_computed_tokens} computed tokens)")


def check_step_end(scheduler, finished) -> None:
    """Check the state after ``on_step_end`` returned ``finished``: those requests are FINISHED, hold no KV and
    are not live; then the scheduler's own ``check_invariants()`` (when it has one: every ``PolicyBase``)."""
    live = scheduler.requests
    for r in finished:
        if r.state is not RequestState.FINISHED or r.kv_location is not KVLocation.NONE or r.blocks:
            raise AssertionError(f"finished request {r.request_id!r} is {r.state.value} with KV on "
                                 f"{r.kv_location.value}")
        if live.get(r.request_id) is r:
            raise AssertionError(f"finished request {r.request_id!r} is still live")
    own = getattr(scheduler, "check_invariants", None)
    if callable(own):
        own()


_SHARED = object()  # a page that several live tables hold (a prefix-cached page)


def _is_index(value, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size
