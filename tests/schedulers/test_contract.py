"""The Scheduler contract every policy shares: add/abort/schedule/on_step_end rules and their errors."""

from __future__ import annotations

import json

import pytest
from sched_harness import StrictExecutor

from schedulers import POLICY_NAMES, KVLocation, Request, RequestState, SchedulerConfig, make_scheduler
from schedulers.bench import main as bench_main


def _cfg(**kw):
    base = dict(block_size=4, max_batch_size=4, max_tokens_per_batch=64, max_model_len=64,
                num_device_blocks=40, num_host_blocks=40)
    base.update(kw)
    return SchedulerConfig(**base)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_duplicate_and_reused_requests_are_refused(policy):
    s = make_scheduler(policy, _cfg())
    r = Request("x", 4, 2)
    assert s.add(r, 0.0)
    with pytest.raises(ValueError, match="request_id 'x' is already live"):
        s.add(Request("x", 4, 2), 0.0)
    StrictExecutor(s).step(0.0)
    with pytest.raises(ValueError, match="is not fresh"):
        make_scheduler(policy, _cfg()).add(r, 0.0)
    with pytest.raises(TypeError, match="expected a Request"):
        s.add(("y", 4, 2), 0.0)
    with pytest.raises(ValueError, match="now must be a finite time"):
        s.add(Request("z", 4, 2), float("nan"))


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_protocol_errors_name_the_mistake(policy):
    s = make_scheduler(policy, _cfg())
    s.add(Request("a", 4, 3), 0.0)
    plan = s.schedule(0.0)
    with pytest.raises(RuntimeError, match="on_step_end was not called"):
        s.schedule(0.1)
    with pytest.raises(RuntimeError, match="not the one returned"):
        s.on_step_end(type(plan)(), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"finished_ids \['ghost'\]"):
        s.on_step_end(plan, 0.1, 0.1, finished_ids=["ghost"])
    s.on_step_end(plan, 0.1, 0.1)
    empty_ok = make_scheduler(policy, _cfg())
    empty_ok.schedule(0.0)
    empty_ok.schedule(0.1)  # an empty plan needs no on_step_end


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_abort_frees_blocks_in_every_state_and_between_schedule_and_step_end(policy):
    s = make_scheduler(policy, _cfg(num_device_blocks=10, max_batch_size=2))
    ex = StrictExecutor(s)
    reqs = [Request(i, 9, 20) for i in range(5)]
    for r in reqs:
        s.add(r, 0.0)
    for k in range(4):
        ex.step(float(k))
    assert not s.abort("nobody")
    victims = [r for r in reqs if r.request_id in s.requests][:2]
    for r in victims:
        assert s.abort(r.request_id)
        assert r.state is RequestState.ABORTED and r.kv_location is KVLocation.NONE and r.blocks == []
        assert not s.abort(r.request_id)
    s.check_invariants()
    # An abort while a plan is outstanding: the aborted request makes no progress in on_step_end.
    seen = {}

    def abort_first(plan):
        if plan.batch():
            gone = plan.batch()[0]
            seen["r"], seen["gen"] = gone, gone.num_generated_tokens
            assert s.abort(gone.request_id)

    ex.step(10.0, during=abort_first)
    assert seen, "three live requests should have produced a batch"
    assert seen["r"].num_generated_tokens == seen["gen"] and seen["r"].state is RequestState.ABORTED
    now = 12.0
    while s.has_unfinished():
        ex.step(now)
        now += 1
    assert s.blocks.num_free_device_blocks == s.blocks.num_usable_device_blocks


def test_finished_ids_stop_a_request_early_and_free_its_blocks():
    s = make_scheduler("fastserve", _cfg())
    s.add(Request("a", 4, 50), 0.0)
    plan = s.schedule(0.0)
    fin = s.on_step_end(plan, 0.1, 0.1, finished_ids=["a"])
    assert [r.request_id for r in fin] == ["a"]
    assert fin[0].num_generated_tokens == 1 and fin[0].finish_time == 0.1 and fin[0].first_token_time == 0.1
    assert s.blocks.num_free_device_blocks == 40 and not s.has_unfinished()


def test_a_mid_prompt_chunk_samples_no_token_and_cannot_be_finished():
    s = make_scheduler("cp", _cfg(max_tokens_per_batch=8))
    s.add(Request("a", 20, 5), 0.0)
    plan = s.schedule(0.0)
    assert plan.prefill[0].num_tokens == 8 and not plan.prefill[0].samples_token
    with pytest.raises(ValueError, match="sampled no token"):
        s.on_step_end(plan, 0.1, 0.1, finished_ids=["a"])
    s.on_step_end(plan, 0.1, 0.1)
    assert s.get("a").num_computed_tokens == 8 and s.get("a").num_generated_tokens == 0


def test_bench_prints_json_of_the_documented_shape(capsys):
    assert bench_main(["--json", "--policies", "fcfs,fastserve", "--sizes", "2x10,4x20", "--steps", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"fcfs", "fastserve"}
    for row in out.values():
        assert set(row) == {"2x10", "4x20"}
        for cell in row.values():
            assert set(cell) == {"median_ms", "p99_ms"} and 0 < cell["median_ms"] <= cell["p99_ms"]


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--policies", "fifo"])
    assert e.value.code == 2 and "unknown policy 'fifo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["--sizes", "16by400"])
    assert "RUNNINGxWAITING" in capsys.readouterr().err
    # An empty list used to print a table with no rows or no columns and exit 0.
    for option in ("--policies", "--sizes"):
        with pytest.raises(SystemExit) as e:
            bench_main([option, ","])
        assert e.value.code == 2 and f"{option} needs at least one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_main(["--seed", "-1"])
    assert e.value.code == 2 and "--seed must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, error, message", [
    # A string or None arrival escaped as a bare "'<' not supported" TypeError; inf was accepted.
    ({"arrival_time": "0"}, ValueError, r"Request 'r': arrival_time must be a finite number >= 0, got '0'"),
    ({"arrival_time": None}, ValueError, r"Request 'r': arrival_time must be a finite number >= 0, got None"),
    ({"arrival_time": float("inf")}, ValueError, r"Request 'r': arrival_time must be a finite number >= 0, got inf"),
    ({"arrival_time": True}, ValueError, r"Request 'r': arrival_time must be a finite number >= 0, got True"),
    # Accepted, then srpt ranked by it (a string crashed its sort key; 0 ranked as already done).
    ({"oracle_output_len": 0}, ValueError, r"Request 'r': oracle_output_len must be None or an int >= 1, got 0"),
    ({"oracle_output_len": "x"}, ValueError, r"Request 'r': oracle_output_len must be None or an int >= 1"),
    ({"oracle_output_len": 2.0}, ValueError, r"Request 'r': oracle_output_len must be None or an int >= 1"),
])
def test_request_fields_are_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        Request("r", 4, 2, **kwargs)


def test_unhashable_request_id_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"Request \['a'\]: request_id must be hashable"):
        Request(["a"], 4, 2)


def test_valid_request_values_still_pass():
    import numpy as np  # the engine and tests pass numpy floats for times

    r = Request(("t", 1), 4, 2, arrival_time=np.float32(0.5), oracle_output_len=2)
    assert r.arrival_time == 0.5 and r.oracle_output_len == 2
    assert Request("s", 1, 1, arrival_time=3).arrival_time == 3


def _two_started(policy):
    """A scheduler of ``policy`` after one step of two requests (both hold device KV)."""
    s = make_scheduler(policy, _cfg(reserve_blocks=0, reserve_window=None))
    s.add(Request("a", 8, 8), 0.0)
    s.add(Request("b", 8, 8), 0.0)
    StrictExecutor(s).step(0.0)
    assert s.get("b").kv_location is KVLocation.DEVICE
    s.check_invariants()
    return s


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_check_invariants_finds_a_live_request_missing_from_the_policys_queues(policy):
    """A live request with KV that fell out of the policy's queues passed check_invariants and then never ran
    again (fastserve's device index, fcfs's queues: found by an audit)."""
    s = _two_started(policy)
    s._on_remove(s.get("b"))  # the policy's own hook: out of its queues, still live
    with pytest.raises(AssertionError, match=r"live requests \['b'\] \(KV on device\) are in none of its queues"):
        s.check_invariants()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_check_invariants_finds_generated_tokens_past_max_new_tokens(policy):
    s = _two_started(policy)
    s.get("a").num_generated_tokens = 50
    with pytest.raises(AssertionError, match="request 'a' is live with 50 generated tokens of max_new_tokens 8"):
        s.check_invariants()


def test_check_invariants_finds_a_request_in_the_wrong_or_in_two_queues():
    s = _two_started("fcfs")
    b = s.running.pop("b")
    s.waiting.append(b)
    with pytest.raises(AssertionError, match="fcfs: request 'b' is in its waiting queue with its KV on device"):
        s.check_invariants()
    s = _two_started("vllm")
    s.waiting.append(s.running[0])
    with pytest.raises(AssertionError, match="vllm: request 'a' is in its running list and in its waiting queue"):
        s.check_invariants()
    s = _two_started("fastserve")
    b = s.get("b")
    s._index[KVLocation.DEVICE].remove(b)
    s._index[KVLocation.HOST].add(b)
    with pytest.raises(AssertionError, match="fastserve: request 'b' is in its host index with its KV on device"):
        s.check_invariants()


def test_check_invariants_finds_fcfs_queues_out_of_admission_order():
    s = make_scheduler("fcfs", _cfg())
    for rid in "abc":
        s.add(Request(rid, 8, 8), 0.0)
    s.waiting.rotate(1)  # c, a, b
    with pytest.raises(AssertionError, match="fcfs: request 'a' comes after 'c' in the queues"):
        s.check_invariants()


def test_check_invariants_finds_corrupted_fastserve_level_accounting():
    s = _two_started("fastserve")
    s.level_count[0] += 5
    with pytest.raises(AssertionError, match=r"level_count \[7\] at levels \[0\], but \[2\] live requests"):
        s.check_invariants()
    s = _two_started("fastserve")
    p = s.get("a").priority_level
    s.level_attained[p] += 1.0
    with pytest.raises(AssertionError, match=rf"level_attained\[{p}\] is .* but its live requests attained"):
        s.check_invariants()
    s = _two_started("fastserve")
    del s._clock_order["a"]
    with pytest.raises(AssertionError, match="starvation-clock order does not hold exactly the live requests"):
        s.check_invariants()
    s = _two_started("srpt")
    a = s.get("a")
    s._rekey(a, (0,) + a.sched_key[1:])
    with pytest.raises(AssertionError, match="srpt: request 'a' has the key"):
        s.check_invariants()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_queue_checks_stay_off_the_hot_path(policy, monkeypatch):
    """_check_queues is O(live requests): only check_invariants calls it, never schedule or on_step_end."""
    s = make_scheduler(policy, _cfg())

    def boom():
        raise RuntimeError("_check_queues ran on the hot path")

    monkeypatch.setattr(s, "_check_queues", boom)
    s.add(Request("a", 8, 3), 0.0)
    now = 0.0
    while s.has_unfinished():
        plan = s.schedule(now)
        now += 0.01
        s.on_step_end(plan, now, 0.01)
    with pytest.raises(RuntimeError, match="hot path"):
        s.check_invariants()
