"""The burst-sized free-block reserve (schedulers/reserve.py), against hand-computed windows, and its use
by fastserve's proactive offload."""

from __future__ import annotations

import pytest

from schedulers import Request, SchedulerConfig, make_scheduler
from schedulers.cost import default_cost_model
from schedulers.reserve import BurstReserve


def test_reserve_is_the_peak_window_sum_within_history():
    r = BurstReserve(window=1.0, history=10.0, floor=4, cap=100)
    assert r.blocks(0.0) == 4  # no arrivals: the floor
    r.record(0.0, 3)
    r.record(0.5, 5)  # window (−0.5, 0.5] holds 3 + 5
    r.record(0.9, 2)  # 3 + 5 + 2 = 10
    r.record(1.6, 1)  # (0.6, 1.6]: 2 + 1 = 3
    assert r.blocks(1.6) == 10
    r.record(5.0, 6)
    assert r.blocks(5.0) == 10  # the 0.9 s burst is still within the last 10 s
    assert r.blocks(10.95) == 6  # 0.9 s has left the history; 5.0 s burst of 6 remains
    assert r.blocks(15.1) == 4  # nothing left: the floor


def test_reserve_is_capped_and_validates():
    r = BurstReserve(window=1.0, history=5.0, floor=2, cap=7)
    r.record(0.0, 50)
    assert r.blocks(0.0) == 7
    with pytest.raises(ValueError, match="window"):
        BurstReserve(window=0.0, history=5.0, floor=0, cap=1)
    with pytest.raises(ValueError, match="history"):
        BurstReserve(window=2.0, history=1.0, floor=0, cap=1)


@pytest.mark.parametrize("field, value", [("reserve_window", 0.0), ("reserve_history", -1.0),
                                          ("reserve_cap_fraction", 1.5)])
def test_config_names_the_bad_reserve_field(field, value):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field}"):
        SchedulerConfig(**{field: value})


def _after_burst(reserve_window):
    """Four long jobs fill most of a 200-block pool and decode; then six 8-block prompts arrive within 0.05 s.
    Returns (blocks offloaded by the first step after the burst, free device blocks once it ends)."""
    cfg = SchedulerConfig(num_device_blocks=200, num_host_blocks=400, reserve_window=reserve_window,
                          reserve_cap_fraction=0.25, reserve_blocks=4, max_batch_size=4, swap_overlap_factor=None)
    s = make_scheduler("fastserve", cfg, cost_model=default_cost_model())
    for i in range(4):  # 4 x 44 blocks of 200
        s.add(Request(f"long{i}", prompt_len=700, max_new_tokens=1000), 0.0)
    now = 0.0
    for _ in range(3):  # prefill (chunked) and start decoding
        plan = s.schedule(now)
        now += 0.3
        s.on_step_end(plan, now, 0.3)
    for i in range(6):
        s.add(Request(f"burst{i}", prompt_len=128, max_new_tokens=4), now + 0.01 * i)
    now += 0.1
    plan = s.schedule(now)
    s.on_step_end(plan, now + 0.3, 0.3)
    return len(plan.swap_out), s.blocks.num_free_device_blocks


def test_burst_reserve_keeps_room_for_the_burst_that_the_fixed_reserve_does_not():
    fixed_out, fixed_free = _after_burst(None)
    burst_out, burst_free = _after_burst(1.0)
    # Both offload one long job (44 blocks) for the prompts that need blocks now; the burst-sized reserve
    # (48 blocks: six prompts of 8) offloads a second one and leaves that much free after the step.
    assert fixed_out == 44 and burst_out == 88
    assert burst_free >= 48 > fixed_free


def test_reserve_survives_clocks_where_now_minus_window_rounds_to_now():
    """At t = 1e20 s, ``t - 1.0 == t`` in floating point: the arrival just recorded must still count (it used to
    be popped at once, and the next read of the empty window raised IndexError; a 1e-20 req/s run hit it)."""
    r = BurstReserve(window=1.0, history=10.0, floor=0, cap=100)
    r.record(1e20, 3)
    r.record(1e20, 4)  # same instant: one burst of 3 + 4
    assert r.blocks(1e20) == 7
    r.record(2e20, 5)  # 1e20 s later: the old burst has left both the window and the history
    assert r.blocks(2e20) == 5
