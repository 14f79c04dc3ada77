"""The simulator's ``check=True``: the contract checker a researcher gets for a policy of their own.

Each policy here breaks one rule that ``tests/schedulers/sched_harness.py`` (``StrictExecutor``) catches; the
simulator must catch it too (the rules are ``schedulers.contract``'s, shared by both)."""

from __future__ import annotations

import pytest

from eval.simulator import CopyLink, SimulationError, check_invariants, simulate, workload_requests
from schedulers import PolicyBase, Request, SchedulerConfig, make_scheduler, register_policy
from schedulers.contract import check_plan
from schedulers.cost import FittedCostModel
from schedulers.fcfs import FCFSScheduler
from schedulers.priority import PriorityScheduler
from schedulers.request import KVLocation

COST = FittedCostModel(p0=0.0, p1=0.001, p2=0.0, d0=0.01, d1=0.0, d2=0.0, block_bytes=1, swap_bandwidth=1000.0)
LINK = CopyLink(block_bytes=1, bandwidth=1000.0)
CFG = SchedulerConfig(block_size=4, num_device_blocks=64, num_host_blocks=64, max_batch_size=4,
                      max_tokens_per_batch=16, max_model_len=64)


class _Queue(PolicyBase):
    """A plain list of live requests, for the broken policies below."""

    name = "queue"

    def __init__(self, config, cost_model=None):
        super().__init__(config, cost_model)
        self.q = []

    def _on_admit(self, r, now):
        self.q.append(r)

    def _on_remove(self, r):
        self.q.remove(r)


class OverBudget(_Queue):
    """Prefills every whole prompt at once, ignoring ``max_tokens_per_batch``."""

    name = "overbudget"

    def _build_plan(self, plan, now):
        for r in self.q[: self.config.max_batch_size]:
            if self._blocks_needed(r, r.num_uncomputed_tokens) <= self.blocks.num_free_device_blocks:
                self._take(plan, r, r.num_uncomputed_tokens)


class InFlight(_Queue):
    """Offloads A in step 3; in step 4 swaps B out synchronously, brings A back with an overlapped swap-in and
    computes A in that same step (on KV that is still arriving)."""

    name = "inflight"

    def __init__(self, config, cost_model=None):
        super().__init__(config, cost_model)
        self.n = 0

    def _build_plan(self, plan, now):
        self.n += 1
        a = self.q[0]
        if self.n == 3 and len(self.q) > 1:
            self._swap_out(plan, a, sync=False)
            return
        if self.n == 4 and len(self.q) > 1:
            self._swap_out(plan, self.q[1], sync=True)  # any synchronous copy in the plan ...
            self._swap_in(plan, a, sync=False)  # ... A arrives overlapped ...
            self._take(plan, a, 1)  # ... and computes in the same step
            return
        for r in self.q:
            if r.kv_location is not KVLocation.HOST:
                self._take(plan, r, r.num_uncomputed_tokens)


class LeaksABlock(FCFSScheduler):
    """FCFS that loses a device block from a running request's table after its third step: only the
    scheduler's own ``check_invariants()`` (block accounting) sees it."""

    name = "leaky"

    def _after_step(self, plan, now, elapsed):
        if self.stats.num_steps == 3 and self.running:
            next(iter(self.running.values())).blocks.pop()


def test_check_catches_a_plan_over_the_token_budget():
    w = workload_requests([(15, 2, 0.0), (15, 2, 0.0), (15, 2, 0.0)])
    assert simulate(OverBudget(CFG, COST), w, COST, LINK).stop_reason == "completed"  # unchecked, it runs
    with pytest.raises(SimulationError, match=r"45 tokens, over max_tokens_per_batch=16"):
        simulate(OverBudget(CFG, COST), w, COST, LINK, check=True)


def test_check_catches_computing_on_an_overlapped_swap_in_even_beside_a_sync_copy():
    """The in-flight rule used to be switched off whenever the plan also had a synchronous copy."""
    w = workload_requests([(8, 6, 0.0), (8, 6, 0.0)])
    with pytest.raises(SimulationError, match=r"request 0 computes while its KV is still arriving through an "
                                              r"overlapped swap_in"):
        simulate(InFlight(CFG, COST), w, COST, LINK, check=True)


def test_check_runs_the_schedulers_own_check_invariants():
    w = workload_requests([(8, 10, 0.0), (8, 10, 0.0)])
    assert simulate(LeaksABlock(CFG, COST), w, COST, LINK).stop_reason in ("completed", "stalled")
    with pytest.raises(SimulationError, match=r"leaky: device pool not conserved"):
        simulate(LeaksABlock(CFG, COST), w, COST, LINK, check=True)


def test_check_plan_refuses_a_sync_swap_in_of_pages_an_overlapped_swap_out_writes_later():
    """Sync copies run before the step, overlapped ones during it: a sync swap-in cannot read what an
    overlapped swap-out of the same plan has not written yet."""
    s = FCFSScheduler(CFG, COST)
    s.add(Request("a", 8, 4), 0.0)
    plan = s.schedule(0.0)
    plan.swap_out.append((60, 7))
    plan.sync_swap_in.append((7, 61))
    with pytest.raises(AssertionError, match=r"sync swap-in reads host pages \[7\]"):
        check_plan(s, plan)
    with pytest.raises(SimulationError, match=r"sync swap-in reads host pages \[7\]"):
        check_invariants(s, plan)


def test_check_plan_refuses_a_write_to_a_page_another_request_holds():
    s = FCFSScheduler(CFG, COST)
    s.add(Request("a", 8, 4), 0.0)
    s.add(Request("b", 8, 4), 0.0)
    plan = s.schedule(0.0)
    a, b = (e.request for e in plan.prefill)
    b.blocks[0] = a.blocks[0]  # b would write a's page
    with pytest.raises(AssertionError, match=r"request 'a' writes page .* which another live request also holds"):
        check_plan(s, plan)


def test_check_plan_refuses_a_second_report_of_one_rejection():
    s = FCFSScheduler(CFG, COST)
    s.add(Request("long", 60, 10), 0.0)  # prompt + max_new_tokens > max_model_len
    plan = s.schedule(0.0)
    reported: set = set()
    check_plan(s, plan, reported)
    assert reported == {"long"}
    with pytest.raises(AssertionError, match="reported rejected twice"):
        check_plan(s, plan, reported)


class LongestPromptFirst(PriorityScheduler):
    """A researcher's policy: the longest prompt first (KV management is PriorityScheduler's)."""

    def _initial_key(self, r, now):
        return (-r.prompt_len, self._next_seq())


@pytest.fixture
def registered(policy_registry):
    """``longest-first`` registered for the test; the registry is restored afterwards."""
    register_policy("longest-first", LongestPromptFirst)
    return "longest-first"


def test_a_registered_policy_runs_in_the_simulator_with_check(registered):
    w = workload_requests([(30, 4, 0.0), (5, 4, 0.0), (20, 4, 0.0), (12, 6, 0.01)])
    cfg = CFG.replace(max_batch_size=1)
    res = simulate(make_scheduler(registered, cfg, COST), w, COST, LINK, check=True)
    assert res.stop_reason == "completed" and res.num_finished == 4
    assert [r.request_id for r in sorted(res.records, key=lambda r: r.first_token_time)] == [0, 2, 3, 1]


def test_a_registered_policy_runs_through_runspec_and_the_sweep_runner(registered, tmp_path):
    from eval.experiments.systems import SystemSpec
    from eval.runner import RunSpec, run_sweep, simulate_spec

    system = SystemSpec("longest-first", registered, "Longest prompt first")
    spec = RunSpec(system, "sharegpt", 30, 4.0)
    sim = simulate_spec(spec, check=True)
    assert sim.stop_reason == "completed" and sim.num_finished == 30
    (res,) = run_sweep([spec], tmp_path, jobs=1, progress=False).values()
    assert res.ok and res.metrics["stop_reason"] == "completed", res.error
