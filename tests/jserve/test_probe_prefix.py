"""Adversarial checks of prefix caching in the engine (from the probe pass; the block-manager case it found
is in tests/schedulers/test_blocks.py).

The engine on the tiny random Llama under memory pressure, with prompts that share a prefix of exactly a
   page multiple, one token more or less, identical prompts and a prompt that is a prefix of another; with
   aborts of requests holding shared pages (also while their page-completing chunk is in flight under async
   scheduling), reused request ids, and invariants checked after every step: greedy outputs equal
   ``jserve.models.greedy_generate`` and every page returns to the pool.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.models import greedy_generate
from test_engine import TIGHT


# ---------------------------------------------------------------------------------------------- engine

NEW = 12
GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)
ROOMY = dict(TIGHT, num_device_blocks=64)
CHUNKED = dict(ROOMY, max_tokens_per_batch=24)  # a 60-token prompt prefills in chunks of 24, 24, 12


@pytest.fixture(scope="module")
def pool():
    """Prompts around a common 64-token text: cut at a page multiple, one token short or past it, identical
    twice, prefixes of one another, one sharing a single page, one unrelated."""
    rng = np.random.default_rng(11)
    ids = lambda n: list(map(int, rng.integers(3, 120, size=n)))  # noqa: E731
    common = ids(64)
    prompts = [common[:n] for n in (15, 16, 17, 31, 32, 33, 48, 49, 60)]
    prompts += [common[:32], common[:32] + ids(9), common[:16] + ids(20), common[:47] + ids(6), ids(33)]
    return prompts


@pytest.fixture(scope="module")
def reference(tiny, pool):
    return greedy_generate(tiny, pool, NEW)


def _step(engine) -> None:
    engine.step()
    engine.scheduler.check_invariants()


def _drain(engine) -> None:
    while engine.has_unfinished():
        _step(engine)
    blocks = engine.scheduler.blocks
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks  # cached pages count as free
    assert blocks.num_free_host_blocks == blocks.num_host_blocks and engine.kv.num_host_ids == 0


def test_an_abort_while_the_page_completing_chunk_is_in_flight_caches_only_the_finished_pages(tiny, pool, reference):
    engine = LLM(tiny, scheduler="fcfs", enable_prefix_caching=True, async_scheduling=True, **CHUNKED).engine
    long = 8  # 60 tokens: chunk 1 completes page 0, chunk 2 (tokens 24..47) pages 1 and 2
    engine.add_request(pool[long], GREEDY, request_id="x")
    _step(engine)  # chunk 1 dispatched
    _step(engine)  # chunk 1 ended (page 0 cached), chunk 2 dispatched and still running
    assert engine.abort("x")
    again = engine.add_request(pool[long], GREEDY, request_id="x")  # the same id and prompt at once
    _drain(engine)
    # Pages 1 and 2 were computed by a step whose request was gone when it ended: never cached.
    assert again.num_cached_tokens == 16 and again.token_ids == reference[long]
    later = engine.add_request(pool[long], GREEDY)
    _drain(engine)
    assert later.num_cached_tokens == 48 and later.token_ids == reference[long]


def test_aborting_the_request_whose_pages_another_took_leaves_them_with_the_taker(tiny, pool, reference):
    engine = LLM(tiny, scheduler="fcfs", enable_prefix_caching=True, async_scheduling=False, **ROOMY).engine
    a = engine.add_request(pool[7], GREEDY, request_id="a")  # 49 tokens: pages 0..2 cached by its prefill
    _step(engine)
    assert len(a.token_ids) == 1
    b = engine.add_request(pool[8], GREEDY, request_id="b")  # 60 tokens: takes the three pages
    _step(engine)
    assert b.num_cached_tokens == 48
    blocks, held = engine.scheduler.blocks, engine.scheduler.requests["b"]
    assert blocks.num_releasable(held) == 1  # of its 4 pages, 3 are shared with a
    assert engine.abort("a")
    assert blocks.num_releasable(held) == 4  # b alone holds them now
    _drain(engine)
    assert b.token_ids == reference[8] and a.finish_reason == "abort"
    assert a.token_ids == reference[7][: len(a.token_ids)]


FUZZ = [("fastserve", {"swap_mode": "proactive"}, True), ("fastserve", {"swap_mode": "recompute"}, False),
        ("vllm", {}, True), ("mlfq", {"swap_mode": "reactive"}, False), ("srpt", {"swap_mode": "proactive"}, False),
        ("cp", {}, True)]


def test_random_arrivals_aborts_and_reused_ids_under_pressure_stay_exact(tiny, pool, reference):
    """Random adds (a third reusing an earlier id), aborts and steps on a 7-page pool with small host pools;
    invariants after every step and abort; finished outputs equal the reference, aborted ones a prefix of it."""
    totals = dict(hits=0, preempted=0, aborted=0, reused=0)
    for seed, (policy, options, pipelined) in enumerate(FUZZ):
        rng = random.Random(seed)
        engine = LLM(tiny, scheduler=policy, scheduler_options=options, enable_prefix_caching=True,
                     async_scheduling=pipelined, **dict(TIGHT, num_device_blocks=8,
                                                        num_host_blocks=rng.choice([0, 6]))).engine
        outs, used = [], []
        for it in range(60):
            if rng.random() < 0.4 and len(engine.scheduler.requests) < 8:
                i = rng.randrange(len(pool))
                rid = rng.choice(used) if used and rng.random() < 0.3 else f"r{it}"
                try:
                    outs.append((engine.add_request(pool[i], GREEDY, request_id=rid), i))
                except ValueError:  # that id is still live
                    continue
                totals["reused"] += rid in used
                used.append(rid)
            elif rng.random() < 0.25 and used:
                totals["aborted"] += engine.abort(rng.choice(used))
                engine.scheduler.check_invariants()
            if engine.has_unfinished():
                _step(engine)
        _drain(engine)
        for out, i in outs:
            if out.finish_reason == "abort":
                assert out.token_ids == reference[i][: len(out.token_ids)], (policy, out.request_id)
            else:
                assert (out.finish_reason, out.token_ids) == ("length", reference[i]), (policy, out.request_id)
        totals["hits"] += engine.stats["prefix_cache_hits"]
        totals["preempted"] += engine.stats["drops"] + engine.stats["blocks_out"]
    assert all(v > 0 for v in totals.values()), totals  # every path ran


def _mixed(i: int) -> SamplingParams:
    """Seeded sampling, logit_bias with min_tokens and stop ids, penalties: whatever the cache skips must
    still count (the penalty tables see the whole prompt, min_tokens counts generated tokens only)."""
    return [
        SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.9, top_k=20, top_p=0.9, seed=100 + i),
        SamplingParams(max_tokens=NEW, logit_bias={5: 3.0, 7: -100.0}, min_tokens=6, stop_token_ids=(11, 12)),
        SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=1.0, seed=7, frequency_penalty=1.0),
        SamplingParams(max_tokens=NEW, ignore_eos=True, repetition_penalty=1.4, presence_penalty=0.6),
    ][i % 4]


@pytest.mark.parametrize("policy, options, pipelined", [("fastserve", {"swap_mode": "recompute"}, False),
                                                        ("mlfq", {"swap_mode": "proactive"}, True)])
def test_sampling_options_beside_cache_hits_equal_the_engine_without_cache(tiny, pool, policy, options, pipelined):
    outs, stats = {}, {}
    for cache in (False, True):
        llm = LLM(tiny, scheduler=policy, scheduler_options=options, enable_prefix_caching=cache,
                  async_scheduling=pipelined, max_penalty_requests=4, **dict(TIGHT, num_device_blocks=6))
        got = llm.generate(pool, [_mixed(i) for i in range(len(pool))])
        outs[cache] = [(o.finish_reason, o.token_ids) for o in got]
        stats[cache] = llm.engine.stats
    assert outs[True] == outs[False]
    assert stats[True]["prefix_cache_hits"] > 0 and stats[True]["drops"] + stats[True]["blocks_out"] > 0, stats[True]
