"""The serving engine on a tiny random Llama: every policy is transparent under memory pressure (outputs equal
an independent greedy decode with a roomy cache), nothing compiles after warm-up, bad requests are refused
one by one, stop conditions, streaming, the async engine, and abort.

The reference is ``jserve.models.greedy_generate`` (its own paged loop: one big pool, no scheduler)."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from jserve.engine import LLM, AsyncLLMEngine, SamplingParams
from jserve.models import greedy_generate

# Small shape buckets keep warm-up short; every engine below shares them, so they compile once per session.
SMALL = dict(max_batch_size=4, max_tokens_per_batch=64, max_model_len=128, decode_buckets=(4,),
             token_buckets=(64,), swap_buckets=(8,), progress=False)
TIGHT = dict(SMALL, num_device_blocks=14, num_host_blocks=64)  # 13 usable pages: forces preemption
ROOMY = dict(SMALL, num_device_blocks=64, num_host_blocks=64)
NEW = 24

POLICIES = [("fcfs", {}), ("vllm", {}), ("cp", {}), ("static", {}), ("fixed-priority", {}), ("srpt", {}),
            ("mlfq", {}), ("fastserve", {"swap_mode": "proactive"}), ("fastserve", {"swap_mode": "reactive"}),
            ("fastserve", {"swap_mode": "recompute"})]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(3, 256, size=int(n)))) for n in rng.integers(5, 60, size=10)]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return greedy_generate(tiny, prompts, NEW)


@pytest.mark.parametrize("policy, options", POLICIES, ids=[p + "-" + "-".join(o.values()) for p, o in POLICIES])
def test_preemption_is_transparent(tiny, prompts, reference, policy, options):
    llm = LLM(tiny, scheduler=policy, scheduler_options=options, **TIGHT)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    st = llm.engine.stats
    if policy != "static":  # static batching never preempts; every other policy must have been pushed here
        assert st["blocks_out"] + st["drops"] > 0, st
    if options.get("swap_mode") in ("proactive", "reactive"):
        assert st["blocks_out"] > 0 and st["blocks_in"] > 0, st
    assert st["compiles_after_warmup"] == 0
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks  # everything freed


def test_seeded_sampling_is_transparent_and_nothing_compiles_after_warmup(tiny, prompts):
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, top_k=50, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    roomy = LLM(tiny, scheduler="fcfs", **ROOMY).generate(prompts, params)
    llm = LLM(tiny, scheduler="fastserve", async_scheduling=True, **TIGHT)  # seeds follow the pipelined loop too
    tight = llm.generate(prompts, params)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    greedy = LLM(tiny, scheduler="fcfs", **ROOMY).generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in tight] != [o.token_ids for o in greedy]  # it really sampled
    assert llm.engine.stats["blocks_out"] > 0
    assert llm.engine.stats["compiles_after_warmup"] == 0


def test_bad_requests_are_refused_one_by_one(tiny, prompts, reference):
    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    good = SamplingParams(max_tokens=NEW, ignore_eos=True)
    batch = [prompts[0], [], [5] * 128, [1, 2, 999], "text needs a tokenizer", prompts[1], prompts[2]]
    params = [good, good, good, good, good, {"max_tokens": NEW, "temperature": -1.0}, {"max_tokens": NEW, "ignore_eos": True}]
    outs = llm.generate(batch, params)
    assert outs[0].token_ids == reference[0] and outs[0].error is None
    assert outs[6].token_ids == reference[2] and outs[6].error is None
    expected = {1: "empty", 2: "max_model_len", 3: "vocabulary", 4: "tokenizer", 5: "temperature"}
    for i, word in expected.items():
        assert outs[i].finish_reason == "error" and word in outs[i].error, (i, outs[i].error)
        assert outs[i].token_ids == []
    with pytest.raises(ValueError, match="3 sampling parameter sets for 2 prompts"):
        llm.generate(prompts[:2], [good] * 3)
    # a flat list starting with a bool is one bad prompt of ids (it was read as two prompts, True and 1)
    [bad] = llm.generate([True, 1], good)
    assert bad.finish_reason == "error" and "prompt token ids must be ints, got True" in bad.error


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_a_stopped_request_is_no_longer_live_once_its_output_is_finished(tiny, prompts, reference, pipelined):
    """A request that stopped (a stop id) reads as finished at once; with async scheduling the engine still
    held it for one more iteration, so ``abort`` rewrote its finished output ("stop" became "abort") and
    ``add_request`` refused its id as "already live". Both loops now behave alike: aborting a finished
    request returns False and leaves its output, its id can be reused at once, and nothing leaks."""
    llm = LLM(tiny, scheduler="fastserve", async_scheduling=pipelined, **ROOMY)
    eng = llm.engine
    ref = reference[0]
    stop = ref[4]
    expected = ref[: ref.index(stop) + 1]
    out = eng.add_request(prompts[0], SamplingParams(max_tokens=NEW, stop_token_ids=[stop], ignore_eos=True),
                          request_id="a")
    other = eng.add_request(prompts[1], SamplingParams(max_tokens=NEW, ignore_eos=True))
    while not out.finished:
        eng.step()
    assert out.token_ids == expected and out.finish_reason == "stop" and out.stop_reason == stop
    assert eng.get_output("a") is None
    assert not eng.abort("a")
    assert out.finish_reason == "stop" and out.token_ids == expected
    again = eng.add_request(prompts[2], SamplingParams(max_tokens=NEW, ignore_eos=True), request_id="a")
    assert again.error is None
    eng.run_until_done()
    assert again.token_ids == reference[2] and other.token_ids == reference[1]
    assert out.finish_reason == "stop" and out.token_ids == expected
    b = eng.scheduler.blocks
    assert b.num_free_device_blocks == b.num_usable_device_blocks and not eng.has_unfinished()
    assert eng.stats["compiles_after_warmup"] == 0


def test_stop_ids_max_tokens_and_context_limit(tiny, prompts, reference):
    llm = LLM(tiny, scheduler="fcfs", **ROOMY)
    ref = reference[0]
    stop_id = ref[5]
    first = ref.index(stop_id)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=NEW, stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "length"
    long_prompt = [7] * 120  # max_model_len 128: room for 8 new tokens whatever max_tokens says
    out = llm.generate([long_prompt], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert out.token_ids == greedy_generate(tiny, long_prompt, 8)
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_token_times_are_when_tokens_reach_the_host(tiny, prompts, monkeypatch, async_scheduling):
    # A step's tokens reach the host when InFlight.read returns; here it waits 0.15 s first, as a slow device
    # would. The first-token and finish times must come after that wait, never at the dispatch before it.
    from jserve.engine.records import InFlight

    llm = LLM(tiny, scheduler="fcfs", async_scheduling=async_scheduling, **ROOMY)
    eng = llm.engine
    ready: list[float] = []
    original = InFlight.read

    def slow_read(self):
        if self._host is None:
            time.sleep(0.15)
            tokens = original(self)
            ready.append(eng.now())
            return tokens
        return original(self)

    monkeypatch.setattr(InFlight, "read", slow_read)
    outs = [eng.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True)) for p in prompts[:2]]
    eng.run_until_done()
    for out in outs:
        m = out.metrics
        assert len(out.token_ids) == 3
        assert m.first_token_time >= ready[0] and m.finish_time >= ready[2]
        assert m.ttft >= 0.15 and m.finish_time - m.first_token_time >= 2 * 0.15


def test_eos_stops_unless_ignored(tiny, prompts, reference):
    import dataclasses

    ref = reference[4]
    eos = ref[6]  # make a token the reference emits the end-of-sequence id (same weights, new config)
    model = dataclasses.replace(tiny, config=tiny.config.replace(eos_token_id=eos))
    llm = LLM(model, scheduler="fcfs", **ROOMY)
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=NEW))[0]
    assert out.token_ids == ref[: ref.index(eos) + 1] and out.finish_reason == "stop"
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_streaming_yields_each_token(tiny, prompts, reference, pipelined):
    llm = LLM(tiny, scheduler="fastserve", async_scheduling=pipelined, **ROOMY)
    seen = []
    last = None
    for out in llm.stream(prompts[3], SamplingParams(max_tokens=NEW, ignore_eos=True)):
        seen.extend(out.new_token_ids)
        assert len(out.token_ids) == len(seen)
        last = out
    assert seen == reference[3] and last.finished


def test_async_engine_concurrent_streams_and_abort(tiny, prompts, reference):
    llm = LLM(tiny, scheduler="fastserve", **TIGHT)
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)

    async def collect(i):
        toks = []
        async for out in engine.generate(prompts[i], params, request_id=f"r{i}"):
            toks.extend(out.new_token_ids)
        return toks

    async def aborted():
        n = 0
        async for out in engine.generate(prompts[9], params, request_id="gone"):
            n += len(out.new_token_ids)
            if n >= 3:
                break  # leaving the stream aborts the request
        return n

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(6)), aborted())

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert results[:6] == reference[:6]
    assert results[6] == 3
    assert engine.error is None
    blocks = llm.engine.scheduler.blocks
    assert not llm.engine.has_unfinished()
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_abort_frees_device_and_host_blocks(tiny, prompts, pipelined):
    llm = LLM(tiny, scheduler="fastserve", async_scheduling=pipelined, **TIGHT)
    eng = llm.engine
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    outs = [eng.add_request(p, params, request_id=i) for i, p in enumerate(prompts)]
    for _ in range(200):  # run until some request has been offloaded to the host
        eng.step()
        if eng.stats["blocks_out"] and eng.scheduler.blocks.num_used_host_blocks:
            break
    live = [o.request_id for o in outs if not o.finished]
    assert live and eng.stats["blocks_out"] > 0
    for rid in live:
        assert eng.abort(rid)
    assert not eng.abort(live[0])  # no longer live
    assert all(o.finished for o in outs)
    assert {o.finish_reason for o in outs if o.request_id in live} == {"abort"}
    eng.step()  # the step that ends pending copies returns their sources
    b = eng.scheduler.blocks
    assert b.num_free_device_blocks == b.num_usable_device_blocks
    assert b.num_free_host_blocks == b.num_host_blocks


def test_cost_profile_path_drives_the_policy(tiny, tmp_path):
    import json

    profile = {"format": "jserve-cost-profile/1", "name": "hand-made", "prefill_ms": [1.0, 0.01, 0.0],
               "decode_ms": [2.0, 0.001, 0.05], "block_size": 16, "block_bytes": 4096,
               "swap": {"bandwidth_bytes_per_s": 1e9}, "num_device_blocks": 63}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    llm = LLM(tiny, scheduler="fastserve", cost_model=str(path), **ROOMY)
    cost = llm.engine.scheduler.cost_model
    assert abs(cost.decode_time(1, 10) - (2.0 + 0.01 + 0.05) / 1e3) < 1e-12
    path.write_text("{}")
    with pytest.raises(ValueError, match="p.json"):
        LLM(tiny, scheduler="fastserve", cost_model=str(path), **ROOMY)


@pytest.mark.parametrize("swap_mode", ["proactive", "recompute"])
def test_stops_under_pressure_with_and_without_async_scheduling(tiny, prompts, reference, swap_mode):
    """Every request stops at its own stop id (the first time the reference emits it), with a pool that forces
    preemption: the pipelined loop (which learns of a stop one iteration late) drops the token it computed past
    the stop, and gives exactly what the one-iteration-at-a-time loop gives."""
    stops = [ref[12 + i % 10] for i, ref in enumerate(reference)]
    expected = [ref[: ref.index(s) + 1] for ref, s in zip(reference, stops)]
    params = [SamplingParams(max_tokens=NEW, stop_token_ids=[s], ignore_eos=True) for s in stops]
    results = {}
    for mode in (True, False):
        llm = LLM(tiny, scheduler="fastserve", scheduler_options={"swap_mode": swap_mode}, async_scheduling=mode,
                  **dict(TIGHT, num_device_blocks=10))
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected, mode
        assert all(o.finish_reason == "stop" for o in outs)
        st = llm.engine.stats
        assert st["blocks_out"] + st["drops"] > 0 and st["compiles_after_warmup"] == 0, st
        b = llm.engine.scheduler.blocks
        assert b.num_free_device_blocks == b.num_usable_device_blocks and b.num_used_host_blocks == 0
        assert not llm.engine.has_unfinished()
        results[mode] = [o.token_ids for o in outs]
    assert results[True] == results[False]


def test_async_scheduling_dispatches_before_reading_tokens(tiny, prompts, reference, monkeypatch):
    """With async scheduling the next iteration is dispatched before the previous one's tokens are read (a
    row's newest token, still being sampled, is taken on the device); without it, each iteration's tokens are
    read before the next dispatch."""
    from jserve.engine import records

    orders = {}
    read = records.InFlight.read
    for mode in (True, False):
        llm = LLM(tiny, scheduler="fcfs", async_scheduling=mode, **ROOMY)
        eng, events = llm.engine, []
        launch, collect = eng.runner.launch, eng._collect
        eng.runner.launch = lambda *a, **k: (events.append("L"), launch(*a, **k))[1]
        eng._collect = lambda flight: (events.append("C"), collect(flight))[1]
        monkeypatch.setattr(records.InFlight, "read", lambda self: (events.append("R"), read(self))[1])
        outs = llm.generate(prompts[:3], SamplingParams(max_tokens=8, ignore_eos=True))
        assert [o.token_ids for o in outs] == [r[:8] for r in reference[:3]]
        orders[mode] = "".join(events)
    n = orders[False].count("L")  # iterations
    assert n > 8 and orders[False] == "LCR" * n
    # launch 1, then (launch k+1, collect and read k) for every k, then collect n: iteration k+1 was on the
    # device before the host read iteration k's tokens
    assert orders[True] == "L" + "LCR" * (n - 1) + "CR"


def test_odd_but_valid_inputs_run_and_bad_ones_never_break_the_engine(tiny, prompts, reference):
    """numpy prompts and parameters are accepted; a top_k past int32 (which overflowed the step's sampling
    arrays and left the scheduler mid-iteration, breaking every later call) runs as "no limit"; stop strings
    on a model without a tokenizer (which were silently ignored) are refused for that request only."""
    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    good = SamplingParams(max_tokens=NEW, ignore_eos=True)
    # one prompt as a 1-D array, or as a list of numpy ints, is one prompt (was: one refused prompt per id)
    for one in (np.array(prompts[0]), [np.int64(t) for t in prompts[0]]):
        outs = llm.generate(one, good)
        assert len(outs) == 1 and outs[0].token_ids == reference[0], outs[0].error
    # a 2-D array is a batch of prompts
    outs = llm.generate(np.array([prompts[1][:5], prompts[2][:5]]), SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == greedy_generate(tiny, [prompts[1][:5], prompts[2][:5]], 4)
    batch = [prompts[0], prompts[1], prompts[2]]
    params = [dict(max_tokens=NEW, ignore_eos=True, top_k=2**40),
              dict(max_tokens=np.int64(NEW), ignore_eos=True),
              dict(max_tokens=NEW, ignore_eos=True, stop=["x"])]
    outs = llm.generate(batch, params)
    assert outs[0].token_ids == reference[0] and outs[1].token_ids == reference[1]
    assert outs[2].finish_reason == "error" and "stop" in outs[2].error and "tokenizer" in outs[2].error
    assert llm.generate([prompts[3]], good)[0].token_ids == reference[3]  # the engine still serves
    for bad in (None, 5):
        with pytest.raises(ValueError, match="prompts must be"):
            llm.generate(bad, good)


def test_an_abandoned_stream_aborts_its_request(tiny, prompts, reference):
    """Leaving ``LLM.stream`` early (break, close, garbage collection) aborts the request and frees its pages;
    before, it stayed live, holding pages, and the next ``generate`` ran it to the end."""
    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    eng, blocks = llm.engine, llm.engine.scheduler.blocks
    stream = llm.stream(prompts[5], SamplingParams(max_tokens=NEW, ignore_eos=True))
    first = next(stream)
    assert first.token_ids == reference[5][:1] and blocks.num_free_device_blocks < blocks.num_usable_device_blocks
    stream.close()
    assert not eng.has_unfinished()
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks
    steps = eng.stats["steps"]
    assert llm.generate([prompts[6]], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids == reference[6][:2]
    assert eng.stats["steps"] - steps == 2  # only the new request ran


def test_interleaved_streams_each_see_every_token(tiny, prompts, reference):
    """Two ``LLM.stream`` iterators advanced in turn (``zip(llm.stream(a), llm.stream(b))``): a step driven by
    one also moves the other, whose tokens from that step were never yielded (its consumer lost them, and its
    finish when the other stream's step finished it). Each update now carries every id since the last one."""
    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (NEW, NEW // 2)]
    streams = {k: llm.stream(prompts[k], params[k]) for k in (0, 1)}
    seen, last = {0: [], 1: []}, {}
    while streams:
        for k in list(streams):
            out = next(streams[k], None)
            if out is None:
                del streams[k]
                continue
            seen[k] += out.new_token_ids
            assert out.token_ids == seen[k]
            last[k] = out
    assert seen == {0: reference[0], 1: reference[1][: NEW // 2]}
    assert last[0].finish_reason == last[1].finish_reason == "length"


def test_async_engine_survives_bad_requests_and_refuses_after_shutdown(tiny, prompts, reference):
    """A duplicate live request id is refused to the second caller (the first one used to hang: its stream was
    replaced); parameters that are not even the right kind (stop=5, which raised TypeError on the engine thread
    and killed it) fail that request only; ``generate`` after ``shutdown`` raises instead of waiting forever."""
    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)

    async def run(prompt, p, rid):
        outs = [out async for out in engine.generate(prompt, p, request_id=rid)]
        return sum((o.new_token_ids for o in outs), []), outs[-1]

    async def main():
        first = asyncio.ensure_future(run(prompts[0], params, "same"))
        await asyncio.sleep(0)  # the first stream is registered
        with pytest.raises(ValueError, match="'same' is already live"):
            await run(prompts[1], params, "same")
        with pytest.raises(ValueError, match="request_id must be hashable .* got list"):  # was a bare TypeError
            await run(prompts[1], params, ["same"])
        bad = await run(prompts[2], {"max_tokens": 4, "stop": 5}, "bad")
        return await asyncio.wait_for(first, 60), bad

    try:
        (toks, last), (bad_toks, bad) = asyncio.run(main())
    finally:
        engine.shutdown()
    assert toks == reference[0] and last.finish_reason == "length"
    assert bad_toks == [] and bad.finish_reason == "error" and "SamplingParams.stop" in bad.error
    assert engine.error is None

    async def after():
        async for _ in engine.generate(prompts[0], params):
            pass

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(asyncio.wait_for(after(), 10))


def test_async_stream_reusing_the_id_of_a_stream_left_early_gets_only_its_own_outputs(tiny, prompts, reference):
    """A caller leaves a stream after one output and retries with the same id. Outputs used to be routed by id
    alone, so the new stream got the old request's abort snapshot (its prompt, its tokens) and ended at once,
    while the new request ran on with nobody reading it."""
    llm = LLM(tiny, scheduler="fcfs", **ROOMY)
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)

    async def main():
        old = engine.generate(prompts[0], params, request_id="x")
        await anext(old)
        await old.aclose()  # aborts the old request
        return [out async for out in engine.generate(prompts[1], params, request_id="x")]

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert all(o.prompt_token_ids == prompts[1] for o in outs)
    assert outs[-1].token_ids == reference[1] and outs[-1].finish_reason == "length"
    assert not llm.engine.has_unfinished() and engine.error is None


def test_a_registered_policy_serves(tiny, prompts, reference, policy_registry):
    """``schedulers.register_policy`` makes a researcher's policy a name ``LLM(scheduler=...)`` accepts (the
    engine's configuration used to accept the built-in names only)."""
    from schedulers import register_policy
    from schedulers.fcfs import FCFSScheduler

    class MyFCFS(FCFSScheduler):
        schedules = 0

        def schedule(self, now):
            MyFCFS.schedules += 1
            return super().schedule(now)

    register_policy("test-my-fcfs", MyFCFS)
    llm = LLM(tiny, scheduler="test-my-fcfs", **TIGHT)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == reference
    assert isinstance(llm.engine.scheduler, MyFCFS) and MyFCFS.schedules > NEW
    with pytest.raises(ValueError, match="unknown scheduler policy 'nobody'; known policies: fcfs, .*, test-my-fcfs"):
        LLM(tiny, scheduler="nobody", **TIGHT)


def test_automatic_request_ids_skip_the_ids_callers_chose(tiny, prompts):
    """Automatic ids are 0, 1, 2, ...; a caller's own integer id 1 made the second automatic request fail with
    "request id 1 is already live"."""
    engine = LLM(tiny, scheduler="fcfs", **ROOMY).engine
    params = SamplingParams(max_tokens=2)
    outs = [engine.add_request(prompts[0], params, request_id=1), engine.add_request(prompts[1], params),
            engine.add_request(prompts[2], params)]
    assert [o.request_id for o in outs] == [1, 0, 2] and not any(o.finished for o in outs)
    assert engine.refuse("no prompt").request_id == 3


@pytest.mark.parametrize("options, message", [
    (dict(arrival_time=-1.0), "arrival_time must be a finite number >= 0 .* got -1.0"),
    (dict(arrival_time=float("nan")), "arrival_time .* got nan"),
    (dict(arrival_time="soon"), "arrival_time .* got 'soon'"),
    (dict(arrival_time=True), "arrival_time .* got True"),
    (dict(oracle_output_len=0), "oracle_output_len must be an int >= 1 .* got 0"),
    (dict(oracle_output_len=2.5), "oracle_output_len .* got 2.5"),
])
def test_a_bad_arrival_time_or_oracle_length_refuses_that_request_only(tiny, prompts, options, message):
    """These raised from float() or from the scheduler's Request instead of refusing the request."""
    engine = LLM(tiny, scheduler="srpt", **ROOMY).engine
    out = engine.add_request(prompts[0], SamplingParams(max_tokens=2), **options)
    assert out.finish_reason == "error" and re.search(message, out.error), out.error
    good = engine.add_request(prompts[0], SamplingParams(max_tokens=2), arrival_time=0.0, oracle_output_len=2)
    while engine.has_unfinished():
        engine.step()
    assert good.finish_reason == "length" and len(good.token_ids) == 2


def test_shutdown_ends_the_streams_still_running(tiny, prompts):
    """Streams waiting when the engine shuts down raise instead of waiting forever (they used to hang)."""
    import time

    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    step = llm.engine.step
    llm.engine.step = lambda: (time.sleep(0.02), step())[1]  # 100 tokens take >= 2 s: shutdown comes first
    engine = AsyncLLMEngine(llm.engine)

    async def main():
        stream = engine.generate(prompts[0][:8], SamplingParams(max_tokens=100, ignore_eos=True))
        first = await anext(stream)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(RuntimeError, match="shut down before the request finished"):
            async for _ in stream:
                pass
        return first

    first = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(first.token_ids) == 1 and engine.error is None


@pytest.mark.parametrize("options, message", [
    (dict(token_buckets=64), "EngineConfig.token_buckets must be a list of ints >= 1 (empty: the defaults), got 64"),  # was TypeError
    (dict(decode_buckets=(0, 4)), "EngineConfig.decode_buckets must be a list of ints >= 1"),
    (dict(swap_buckets=("8",)), "EngineConfig.swap_buckets must be a list of ints >= 1"),
    (dict(swap_space_gib=float("inf"), num_host_blocks=None), "EngineConfig.swap_space_gib must be a finite"),
    (dict(cpu_kv_cache_gib="1"), "EngineConfig.cpu_kv_cache_gib must be a finite"),  # was TypeError
    (dict(gpu_memory_utilization="0.9"), "EngineConfig.gpu_memory_utilization must be in"),
    (dict(async_scheduling="yes"), "EngineConfig.async_scheduling must be None or a bool"),  # was taken as True
    (dict(scheduler="nope"), "unknown scheduler policy 'nope'"),
    (dict(cost_model=5), "EngineConfig.cost_model must be"),  # was AttributeError inside the policy
    (dict(max_penalty_requests=0), "EngineConfig.max_penalty_requests must be None or an int >= 1, got 0"),
    (dict(max_penalty_requests=3, max_batch_size=4), "EngineConfig.max_penalty_requests (3) must be >= max_batch_size (4)"),
])
def test_bad_engine_options_raise_value_errors_naming_them(tiny, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(tiny, **dict(ROOMY, **options))


def test_bad_llm_arguments_raise_value_errors_naming_them(tiny):
    with pytest.raises(ValueError, match="model must be"):  # was TypeError from os.fspath
        LLM(5, **ROOMY)
    with pytest.raises(ValueError, match="unknown scheduler option"):  # was TypeError from SchedulerConfig
        LLM(tiny, scheduler_options={"nope": 1}, **ROOMY)
    with pytest.raises(ValueError, match="dtype 'bfloat16'.*already loaded.*float32"):  # was silently ignored
        LLM(tiny, dtype="bfloat16", **ROOMY)
    assert LLM(tiny, dtype="float32", **ROOMY).model is tiny  # the model's own dtype is fine


@pytest.mark.parametrize("where", ["inside", "between"])
def test_an_interrupted_generate_leaves_a_usable_engine(tiny, prompts, reference, where):
    """Ctrl-C inside a step (here: at the 5th dispatch, under memory pressure) used to leave the scheduler
    mid-iteration: every later call raised "on_step_end was not called" and the LLM had to be rebuilt. Ctrl-C
    between steps left the batch live, so the next generate ran all of it first. Now the interrupted requests
    are aborted, their pages freed, and the next generate runs only its own requests."""
    llm = LLM(tiny, scheduler="fastserve", **TIGHT)
    eng = llm.engine
    target = (eng.runner, "launch") if where == "inside" else (eng, "step")
    real, calls = getattr(*target), []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    setattr(*target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts[:6], SamplingParams(max_tokens=NEW, ignore_eos=True))
    setattr(*target, real)
    assert not eng.has_unfinished()
    b = eng.scheduler.blocks
    assert b.num_free_device_blocks == b.num_usable_device_blocks and b.num_used_host_blocks == 0
    assert eng.kv.num_host_ids == 0
    steps = eng.stats["steps"]
    outs = llm.generate(prompts[6:8], SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == reference[6:8]
    assert eng.stats["steps"] - steps <= NEW + 4  # only the new requests ran (about NEW decode steps)


def test_the_tokenizers_end_of_sequence_stops_too(tiny, prompts, reference):
    """Llama-3 Instruct's config.json lists eos ids [128001, 128008, 128009] (the model config keeps the
    first) while its tokenizer's eos is <|eot_id|> (128009), which ends every chat turn: only the config's id
    stopped generation, so chat answers ran on to max_tokens. Both ids stop now."""
    import dataclasses

    class Tok:  # the engine needs only these of a tokenizer here
        def __init__(self, eos):
            self.eos_token_id = eos

        def decode(self, ids, skip_special_tokens=True):
            return ""

        def encode(self, text, add_special_tokens=False):  # "a b" -> [97, 32, 98]; past the vocabulary (256) too
            return [ord(c) for c in text]

    ref = reference[4]
    firsts = list(dict.fromkeys(ref))  # distinct ids in order of first appearance
    tok_eos, config_eos = firsts[2], firsts[4]  # the tokenizer's comes first in the reference
    model = dataclasses.replace(tiny, config=tiny.config.replace(eos_token_id=config_eos), tokenizer=Tok(tok_eos))
    llm = LLM(model, scheduler="fcfs", **ROOMY)
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=NEW))[0]
    assert out.token_ids == ref[: ref.index(tok_eos) + 1] and out.finish_reason == "stop"
    llm.engine._eos_ids -= {tok_eos}  # the config's id alone (test_eos_stops_unless_ignored: a config eos alone)
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=NEW))[0]
    assert out.token_ids == ref[: ref.index(config_eos) + 1] and out.finish_reason == "stop"
    # a further id from the config (config.json's eos list beyond the first, or generation_config.json); a
    # tokenizer without an eos id, so that the earlier tokenizer id does not stop it first
    extra_eos = firsts[3]
    extra = dataclasses.replace(model, config=model.config.replace(extra_eos_token_ids=(extra_eos,)),
                                tokenizer=Tok(None))
    out = LLM(extra, scheduler="fcfs", **ROOMY).generate([prompts[4]], SamplingParams(max_tokens=NEW))[0]
    assert out.token_ids == ref[: ref.index(extra_eos) + 1] and out.finish_reason == "stop"
    # a string prompt whose ids fall outside the model's vocabulary is refused (it was clipped silently)
    ok, bad = llm.generate(["ab", "a\u0101"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert ok.prompt_token_ids == [97, 98] and len(ok.token_ids) == 2
    assert bad.finish_reason == "error" and "token id 257, outside the model's vocabulary [0, 256)" in bad.error


def test_a_device_pool_larger_than_memory_is_refused_before_allocation(tiny):
    from jserve.engine.config import _available_memory_bytes

    if _available_memory_bytes() is None:
        pytest.skip("no /proc/meminfo: the free memory is unknown")
    # 10**9 pages of 8 KiB: 7.5 TiB. Was allocated as asked (a CPU overcommits, then dies when pages are touched)
    with pytest.raises(ValueError, match=r"num_device_blocks=1000000000 needs 7629\.4 GiB of KV cache .* GiB free"):
        LLM(tiny, **dict(ROOMY, num_device_blocks=10**9))


def test_a_stream_whose_event_loop_closed_does_not_kill_the_engine_thread(tiny, prompts, reference):
    """A caller's event loop can close while its stream is still registered (``asyncio.run`` ending): handing
    it an output raised RuntimeError on the engine thread, which stopped serving everyone. Now that request is
    aborted and the thread carries on."""
    import time

    llm = LLM(tiny, scheduler="fastserve", **ROOMY)
    engine = AsyncLLMEngine(llm.engine)
    closed = asyncio.new_event_loop()
    closed.close()
    key = -1  # a stream key generate never hands out
    engine._streams[key] = (closed, asyncio.Queue())
    engine._commands.put(("add", "orphan", prompts[0], SamplingParams(max_tokens=NEW, ignore_eos=True), key))
    for _ in range(200):
        if key not in engine._streams:
            break
        time.sleep(0.01)

    async def collect():
        return [t async for out in engine.generate(prompts[1], SamplingParams(max_tokens=NEW, ignore_eos=True))
                for t in out.new_token_ids]

    try:
        toks = asyncio.run(asyncio.wait_for(collect(), 60))
    finally:
        engine.shutdown()
    assert engine.error is None and toks == reference[1]
    assert not llm.engine.has_unfinished()  # the orphan was aborted, not run to the end for nobody


@pytest.mark.parametrize("options, message", [
    (dict(num_host_blocks=None, swap_space_gib=1e6), r"swap_space_gib=1000000\.0 asks for 1000000\.0 GiB"),
    (dict(num_host_blocks=10**9), r"num_host_blocks=1000000000 asks for 7629\.4 GiB"),
])
def test_a_host_pool_larger_than_the_machine_is_refused(tiny, options, message):
    # was built as asked: the scheduler's host free list alone (one entry a page) got the process OOM-killed
    from jserve.engine.config import _meminfo_bytes

    if _meminfo_bytes("MemTotal") is None:
        pytest.skip("no /proc/meminfo")
    with pytest.raises(ValueError, match=message + r" of host memory; this machine has [\d.]+ GiB"):
        LLM(tiny, **dict(ROOMY, **options))


def check_stream_texts(snaps, final_text, decode, stops=()):
    """Streamed snapshots' texts against the full decoding of their ids (``decode``, the reference): each text
    is the decoding so far less what may not show yet, a trailing incomplete character (U+FFFD) or a tail
    that could start one of ``stops``; each is a prefix of the next; the last is ``final_text`` (``generate``'s).
    Returns how many snapshots held something back."""
    texts = [s.text for s in snaps]
    assert snaps[-1].finished and texts[-1] == final_text
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    held_back = 0
    for s in snaps[:-1]:
        full = decode(s.token_ids)
        assert full.startswith(s.text), (s.text, full)
        held = full[len(s.text):]
        visible = full.rstrip("\ufffd")
        assert "\ufffd" not in s.text[len(visible):]  # no incomplete character shown
        rest = visible[len(s.text):]
        assert not rest or any(x.startswith(rest) for x in stops), (s.text, full, stops)  # nothing else held
        held_back += bool(held)
    return held_back


def test_streamed_snapshots_carry_the_text_so_far_without_partial_characters(tiny, prompts):
    """``LLM.stream`` and ``AsyncLLMEngine.generate`` snapshots had ``text == ""`` until the last one; they
    now carry the text so far. The tiny Llama samples random bytes through a byte tokenizer (token id = byte
    value, reference: ``bytes(ids).decode("utf-8", "replace")``), so many steps end inside a UTF-8 character;
    a stop string from the middle of one answer is held back while it may be one."""
    import dataclasses

    from test_server import as_text, byte_tokenizer

    model = dataclasses.replace(tiny, tokenizer=byte_tokenizer())
    llm = LLM(model, scheduler="fcfs", **ROOMY)
    params = [SamplingParams(max_tokens=NEW, temperature=1.0, seed=s, ignore_eos=True) for s in range(3)]
    finals = llm.generate([prompts[s] for s in range(3)], params)
    text = finals[0].text
    at = next(i for i in range(6, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[at:at + 2]
    stopped = dataclasses.replace(params[0], stop=(stop, "\x00\x00never"))
    cases = [(prompts[s], params[s], finals[s].text) for s in range(3)]
    cases.append((prompts[0], stopped, llm.generate(prompts[0], stopped)[0].text))
    assert cases[-1][2] == text[:at] and "\ufffd" in "".join(f.text for f in finals)
    streamed = []
    for prompt, sp, final in cases:
        snaps = list(llm.stream(prompt, sp))
        held = check_stream_texts(snaps, final, as_text, sp.stop)
        assert held > 0  # some step ended inside a character, or on the stop string's first character
        streamed.append([s.text for s in snaps])
    engine = AsyncLLMEngine(llm.engine)

    async def collect(k, prompt, sp):
        return [out async for out in engine.generate(prompt, sp, request_id=f"t{k}")]

    async def main():
        return await asyncio.gather(*(collect(k, p, sp) for k, (p, sp, _) in enumerate(cases)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for (_, sp, final), snaps in zip(cases, results):
        check_stream_texts(snaps, final, as_text, sp.stop)
    assert [[s.text for s in snaps] for snaps in results] == streamed  # one per token both ways


def test_smollm2_stream_text_so_far_with_emoji_and_a_stop_string(smollm2):
    """On SmolLM2 an emoji takes three tokens, so two greedy steps in three after the prompt below end inside a
    character: no snapshot shows U+FFFD. The README's seeded "Once upon a time" stream, and the same with a
    stop string of two tokens: the snapshot that ends with the first holds it back. The reference is the
    tokenizer's decoding of each snapshot's ids, and ``generate``'s text for the last."""
    import dataclasses

    llm = LLM(smollm2, scheduler="fcfs", max_batch_size=4, max_tokens_per_batch=64, max_model_len=96,
              decode_buckets=(4,), token_buckets=(64,), swap_buckets=(8,), progress=False)
    tok = smollm2.tokenizer

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    emoji = SamplingParams(max_tokens=12)  # four whole emoji
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=1)
    cases = [("Here are some emojis: 😀😃😄", emoji), ("Once upon a time", seeded)]
    ids = llm.generate("Once upon a time", seeded)[0].token_ids
    k = next(k for k in range(4, 10) if all("\ufffd" not in decode(ids[j:j + 1]) for j in (k, k + 1)))
    stop = decode(ids[:k + 2])[len(decode(ids[:k])):]  # the text of tokens k and k + 1
    cases.append(("Once upon a time", dataclasses.replace(seeded, stop=(stop,))))
    for prompt, sp in cases:
        final = llm.generate(prompt, sp)[0]
        snaps = list(llm.stream(prompt, sp))
        assert snaps[-1].token_ids == final.token_ids
        held = check_stream_texts(snaps, final.text, decode, sp.stop)
        assert all("\ufffd" not in s.text for s in snaps)
        if sp is emoji:
            assert held >= 8 and len(final.text) == 4 and all(ord(c) > 0xFFFF for c in final.text[:4])
        if sp.stop:
            assert final.finish_reason == "stop" and final.text == decode(ids[:k])
            assert snaps[-2].token_ids == ids[:k + 1] and snaps[-2].text == final.text  # token k held back
        else:
            assert [s.text for s in snaps[:-1]] == [decode(s.token_ids).rstrip("\ufffd") for s in snaps[:-1]]


def test_incremental_detokenizer_equals_the_whole_decoding_at_every_step():
    """``IncrementalDetokenizer`` decodes a window of the newest ids; its text must be what decoding all the ids
    gives (less a trailing incomplete character) at every step. SmolLM2's byte-level tokenizer on random ids
    (special tokens and broken UTF-8 included), both ``skip_special_tokens``; and a Llama-2-style SentencePiece
    tokenizer (▁ for spaces, byte-fallback tokens, a stripped leading space) on characters in random order,
    broken ones included: ``Tokenizer.decode`` repairs invalid byte runs ("€" then one U+FFFD, where the
    backend alone gives four), so every streamed text is a prefix of the final one."""
    import random

    import tokenizers
    from tokenizers import decoders, models

    from jserve.engine.outputs import IncrementalDetokenizer, RequestOutput
    from jserve.models import smollm2_gguf_path
    from jserve.tokenizer import Tokenizer, load_tokenizer

    def run(tok, ids, skip):
        det = IncrementalDetokenizer(tok, {"skip_special_tokens": skip})
        out = RequestOutput("r", None, [])
        for t in ids:
            out.token_ids.append(t)
            yield det.update(out), out.token_ids

    rng = random.Random(0)
    path = smollm2_gguf_path()
    if path is not None:
        tok = load_tokenizer(path)
        specials = [tok.eos_token_id, tok.bos_token_id, 1, 2]
        for trial in range(60):
            ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_size) for _ in range(30)]
            skip = trial % 2 == 0
            for text, so_far in run(tok, ids, skip):
                assert text == tok.decode(so_far, skip_special_tokens=skip).rstrip("\ufffd"), (ids, so_far)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "!": 8, "▁": 9, "a": 10, "▁▁": 13}
    vocab.update({f"<0x{b:02X}>": 20 + b for b in range(256)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(["<s>", "</s>"])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    sp = Tokenizer(backend, bos_token_id=1, eos_token_id=2)
    euro, e_acute = [20 + 0xE2, 20 + 0x82, 20 + 0xAC], [20 + 0xC3, 20 + 0xA9]
    assert backend.decode(euro + euro[:1]) == "\ufffd" * 4  # the backend alone loses the whole run
    assert sp.decode(euro + euro[:1]) == "€\ufffd" and sp.decode(euro) == "€"
    assert sp.decode(euro[:1] + [2] + euro[1:], skip_special_tokens=True) == "€"  # one run once </s> is skipped
    assert sp.decode(euro[:1] + [2] + euro[1:]) == "\ufffd</s>\ufffd\ufffd"
    units = [[1], [2], [3], [4], [8], [9], [10], [13], euro, e_acute, euro[:1], euro[1:2]]  # two broken ones
    for trial in range(300):
        ids = sum((rng.choice(units) for _ in range(8)), [])
        skip = trial % 2 == 0
        whole = sp.decode(ids, skip_special_tokens=skip)
        for text, so_far in run(sp, ids, skip):
            assert text == sp.decode(so_far, skip_special_tokens=skip).rstrip("\ufffd"), (ids, so_far)
            assert whole.startswith(text), (ids, so_far)
