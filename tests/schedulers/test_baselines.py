"""vllm, cp, static, fixed-priority and srpt: hand-built scenarios that pin each one's defining behaviour."""

from __future__ import annotations

from sched_harness import StrictExecutor

from schedulers import KVLocation, Request, RequestState, SchedulerConfig, make_scheduler


def _cfg(**kw):
    base = dict(block_size=4, max_batch_size=4, max_tokens_per_batch=64, max_model_len=64,
                num_device_blocks=100, num_host_blocks=100, watermark=0.0)
    base.update(kw)
    return SchedulerConfig(**base)


def _ids(plan):
    return [(e.request_id, e.num_tokens) for e in plan.prefill], [r.request_id for r in plan.decode]


# ---------------------------------------------------------------- vllm


def test_vllm_a_step_that_admits_prefills_runs_no_decodes():
    s = make_scheduler("vllm", _cfg())
    ex = StrictExecutor(s)
    s.add(Request("a", 8, 10), 0.0)
    ex.step(0.0)
    plan, _, _ = ex.step(1.0)
    assert _ids(plan) == ([], ["a"])
    s.add(Request("b", 6, 3), 1.5)
    plan, _, _ = ex.step(2.0)
    assert _ids(plan) == ([("b", 6)], [])  # a sits out the prefill step
    plan, _, _ = ex.step(3.0)
    assert _ids(plan) == ([], ["a", "b"])


def test_vllm_admission_leaves_the_watermark_free():
    # 100 blocks, watermark 10%: a prompt may be admitted only if 10 blocks stay free afterwards.
    s = make_scheduler("vllm", _cfg(watermark=0.1, max_model_len=400, max_tokens_per_batch=400))
    s.add(Request("a", 320, 1), 0.0)  # 80 blocks -> 20 left
    s.add(Request("b", 44, 1), 0.0)  # 11 blocks -> 9 left < 10
    plan = s.schedule(0.0)
    assert [e.request_id for e in plan.prefill] == ["a"]
    assert s.blocks.num_free_device_blocks == 20


def test_vllm_rejects_what_the_watermark_could_never_admit():
    s = make_scheduler("vllm", _cfg(watermark=0.1, num_device_blocks=20, max_model_len=128, max_tokens_per_batch=128))
    assert s.add(Request("fits", 70, 2), 0.0)  # 71 cached tokens = 18 blocks = 20 - 2
    r = Request("big", 74, 2)  # 75 cached tokens = 19 blocks > 20 - 2
    assert not s.add(r, 0.0) and "watermark" in r.reject_reason


def test_vllm_preempts_the_newest_by_recompute_to_the_front_of_the_waiting_queue():
    # 6 blocks of 4 tokens; three 8-token prompts fill them; their first decodes need a third block each.
    s = make_scheduler("vllm", _cfg(num_device_blocks=6, max_model_len=32))
    ex = StrictExecutor(s)
    for rid in "abc":
        s.add(Request(rid, 8, 4), 0.0)
    ex.step(0.0)
    s.add(Request("d", 4, 2), 0.5)  # waiting behind; blocks are short anyway
    plan, _, _ = ex.step(1.0)
    assert [r.request_id for r in plan.dropped] == ["c"]
    assert _ids(plan) == ([], ["a", "b"])
    c = s.get("c")
    assert c.kv_location is KVLocation.NONE and c.num_computed_tokens == 0 and c.state is RequestState.WAITING
    assert [r.request_id for r in s.waiting] == ["c", "d"]  # front of the queue, ahead of d
    assert c.num_generated_tokens == 1 and c.num_tokens == 9  # it will prefill prompt + generated token


def test_vllm_several_preemptions_keep_the_oldest_first():
    s = make_scheduler("vllm", _cfg(num_device_blocks=8, max_model_len=32))
    ex = StrictExecutor(s)
    for rid in "abcd":
        s.add(Request(rid, 8, 4), 0.0)
    ex.step(0.0)  # 8 blocks used
    s.add(Request("e", 4, 2), 0.5)
    plan, _, _ = ex.step(1.0)
    # a needs one block: d goes; b needs one: c goes.
    assert [r.request_id for r in plan.dropped] == ["d", "c"]
    assert [r.request_id for r in s.waiting] == ["c", "d", "e"]


# ---------------------------------------------------------------- cp


def test_cp_takes_decodes_first_then_chunks_prefills_to_fill_the_budget():
    s = make_scheduler("cp", _cfg(max_tokens_per_batch=16))
    ex = StrictExecutor(s)
    s.add(Request("a", 4, 20), 0.0)
    s.add(Request("b", 4, 20), 0.0)
    ex.step(0.0)
    s.add(Request("c", 30, 5), 0.5)
    s.add(Request("d", 20, 5), 0.5)
    plan, _, _ = ex.step(1.0)
    assert _ids(plan) == ([("c", 14)], ["a", "b"])  # 2 decodes + 14 prefill tokens = 16
    assert plan.num_batched_tokens == 16
    plan, _, _ = ex.step(2.0)
    assert _ids(plan) == ([("c", 14)], ["a", "b"])
    plan, _, _ = ex.step(3.0)
    # c's last 2 tokens (continuing prefill before new ones), then d chunked into the remaining 12.
    assert _ids(plan) == ([("c", 2), ("d", 12)], ["a", "b"])
    plan, _, _ = ex.step(4.0)
    assert _ids(plan) == ([("d", 8)], ["a", "b", "c"])


def test_cp_admission_allocates_the_whole_prompt():
    s = make_scheduler("cp", _cfg(max_tokens_per_batch=16))
    s.add(Request("c", 40, 5), 0.0)
    s.schedule(0.0)
    assert len(s.get("c").blocks) == 10  # 40 tokens of 4 per block, though only 16 are computed now


# ---------------------------------------------------------------- static


def test_static_admits_no_joins_until_the_whole_batch_finishes():
    s = make_scheduler("static", _cfg(max_batch_size=3))
    ex = StrictExecutor(s)
    s.add(Request("a", 4, 2), 0.0)
    s.add(Request("b", 4, 5), 0.0)
    plan, _, _ = ex.step(0.0)
    assert _ids(plan) == ([("a", 4), ("b", 4)], [])
    s.add(Request("c", 4, 2), 0.5)  # there is a free slot, but no joins
    batches = []
    now = 1.0
    while s.get("b") is not None:
        plan, _, _ = ex.step(now)
        batches.append(_ids(plan))
        now += 1
    assert all(p == [] for p, _ in batches) and ["c"] not in [d for _, d in batches]
    assert batches[0] == ([], ["a", "b"]) and batches[1] == ([], ["b"])  # a left early, nobody joined
    plan, _, _ = ex.step(now)
    assert _ids(plan) == ([("c", 4)], [])


def test_static_batch_reserves_full_sequences_and_token_budget():
    s = make_scheduler("static", _cfg(max_batch_size=4, max_tokens_per_batch=19, num_device_blocks=10))
    for rid, p, m in (("a", 8, 9), ("b", 8, 9), ("c", 4, 2)):
        s.add(Request(rid, p, m), 0.0)
    plan = s.schedule(0.0)
    # a and b reserve 4 blocks each (16 cached tokens); c's 2 more fit the pool but its 4 prompt tokens
    # do not fit the 3 tokens left of the budget.
    assert _ids(plan) == ([("a", 8), ("b", 8)], [])


# ---------------------------------------------------------------- fixed-priority and srpt


def test_fixed_priority_runs_shortest_prompt_first_and_preempts_for_a_shorter_arrival():
    s = make_scheduler("fixed-priority", _cfg(max_batch_size=1))
    ex = StrictExecutor(s)
    s.add(Request("mid", 20, 10), 0.0)
    s.add(Request("long", 40, 10), 0.0)
    plan, _, _ = ex.step(0.0)
    assert _ids(plan) == ([("mid", 20)], [])
    s.add(Request("short", 5, 2), 0.5)
    plan, _, _ = ex.step(1.0)
    assert _ids(plan) == ([("short", 5)], [])
    for i in range(3):
        ex.step(2.0 + i)
    assert s.get("short") is None and s.get("mid").priority_level == 0  # never demoted
    plan, _, _ = ex.step(9.0)
    assert _ids(plan) == ([], ["mid"])


def test_srpt_orders_by_remaining_oracle_output_and_updates_as_jobs_progress():
    s = make_scheduler("srpt", _cfg(max_batch_size=1))
    ex = StrictExecutor(s)
    s.add(Request("a", 4, 6, oracle_output_len=6), 0.0)
    s.add(Request("b", 4, 10, oracle_output_len=10), 0.0)
    plan, _, _ = ex.step(0.0)
    assert _ids(plan) == ([("a", 4)], [])
    s.add(Request("c", 4, 3, oracle_output_len=3), 0.5)  # 3 left < a's 5
    plan, _, _ = ex.step(1.0)
    assert _ids(plan) == ([("c", 4)], [])
    done = []
    now = 2.0
    while s.has_unfinished():
        _, fin, _ = ex.step(now)
        done += [r.request_id for r in fin]
        now += 1
    assert done == ["c", "a", "b"]
