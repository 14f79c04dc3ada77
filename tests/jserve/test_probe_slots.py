"""Adversarial checks of the penalty-slot cache (``jserve.engine.penalties.PenaltySlots``, the engine's
``_penalty_row`` and ``rebuild[M]``) found while probing it as a demanding user would.

References, independent of the engine: ``test_engine_penalties``' numpy greedy loop (vLLM's penalties on a plain
``jserve.models`` forward of each whole sequence), and the same engine request under a fresh request id.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_penalties import reference_greedy

from jserve.engine import LLM, SamplingParams


PENS = [(1.0, 0.0, 0.0), (1.4, 0.0, -1.0), (1.0, -1.5, 0.0), (0.7, 0.5, 0.0), (1.2, 0.3, -0.4), (1.0, 0.0, 1.5)]
TWO = dict(max_batch_size=2, max_tokens_per_batch=16, max_model_len=128, decode_buckets=(2,), token_buckets=(16,),
           swap_buckets=(8,), progress=False, num_device_blocks=10, num_host_blocks=64)  # chunks straddle steps
MODES = ((False, True), (True, False), (True, True))  # (async scheduling, skip_idle_work)


@pytest.fixture(scope="module")
def async_llm(tiny):
    return LLM(tiny, scheduler="fcfs", async_scheduling=True, max_penalty_requests=2, **TWO)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, 256, size=int(k)))) for k in rng.integers(12, 40, size=n)]


def test_a_reused_request_id_is_not_matched_with_the_old_requests_token_in_flight(tiny, async_llm):
    """Async scheduling: a request aborted (or stopped) while its token is in flight, then added again under the
    same id. The engine matched the step in flight's tokens to the new request by id, so the new one counted a
    draw it never made: with penalties it found "no penalty slot while its token is in flight" and the
    RuntimeError aborted every live request; without, its n-th draw used ``fold_in(seed, n + 1)`` (seeded
    outputs differed from the same request under a fresh id) and ``min_tokens`` counted one token early."""
    eng = async_llm.engine
    p_old, p_new, p_other = _prompts(3)
    pen = (1.5, 0.3, 0.0)
    sp = SamplingParams(max_tokens=8, ignore_eos=True, repetition_penalty=pen[0], frequency_penalty=pen[1])
    other = eng.add_request(p_other, sp, request_id="other")
    eng.add_request(p_old, sp, request_id="A")
    for _ in range(8):  # until A's token is in flight (it prefills in chunks of the 16-token budget)
        eng.step()
        if "A" in eng._in_flight.sampler_index:
            break
    assert "A" in eng._in_flight.sampler_index
    assert eng.abort("A")
    new = eng.add_request(p_new, sp, request_id="A")
    eng.run_until_done()
    ref_new, ref_other = reference_greedy(tiny, [p_new, p_other], [pen, pen], 8)
    assert new.finish_reason == "length" and new.token_ids == ref_new, new.error
    assert other.finish_reason == "length" and other.token_ids == ref_other, other.error

    # the stop path (a finished output whose id the scheduler still holds may be added again at once)
    seeded = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=3, min_tokens=2)
    fresh = async_llm.generate([p_new], seeded)[0].token_ids
    first = reference_greedy(tiny, [p_old], [(1.0, 0.0, 0.0)], 2)[0]
    stopped = eng.add_request(p_old, SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[first[1]]),
                              request_id="C")
    while not stopped.finished:
        eng.step()
    assert stopped.finish_reason == "stop" and "C" in eng._in_flight.sampler_index
    again = eng.add_request(p_new, seeded, request_id="C")
    eng.run_until_done()
    assert again.finish_reason == "length" and again.token_ids == fresh



@pytest.mark.slow  # about 25-40 s on 2 cores: every policy, three cases
def test_every_policy_matches_the_reference_with_two_slots_chunks_and_preemption(tiny):
    """Ten requests on two rows and two slots, a 16-token budget (prompts of 12..40 tokens prefill over several
    steps and may lose their slot between chunks), a 9-page pool; every policy, async scheduling on and off,
    ``skip_idle_work`` off and on. Greedy rows (penalties beside plain rows) equal the numpy reference; seeded
    rows draw the same tokens with 2 slots as with 6 (a slot's number never reaches the sampler). mlfq with a
    tiny quantum rotates the batch, swapping (and, in recompute mode, dropping) paused requests, so slots
    really are taken and rebuilt, also from requests whose prefill was cut between chunks."""
    import schedulers

    prompts = _prompts(10, seed=5)
    pens = [PENS[i % len(PENS)] for i in range(10)]
    greedy = [SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=r, frequency_penalty=f,
                             presence_penalty=p) for r, f, p in pens]
    params = [sp if i % 3 else SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, seed=i,
                                              repetition_penalty=1.5, presence_penalty=-1.0)
              for i, sp in enumerate(greedy)]
    ref = reference_greedy(tiny, prompts[:5], pens[:5], 10) + reference_greedy(tiny, prompts[5:], pens[5:], 10)
    seeded, rebuilds = {}, {}
    rotate = {"q0": 1e-4}
    cases = [(p, rotate if p == "mlfq" else {}) for p in schedulers.POLICY_NAMES]
    for policy, options in cases + [("mlfq", rotate | {"swap_mode": "recompute"})]:
        for async_, skip in MODES:
            for slots in (2, 6) if (async_, skip) == MODES[0] else (2,):
                llm = LLM(tiny, scheduler=policy, scheduler_options=options, async_scheduling=async_,
                          skip_idle_work=skip, max_penalty_requests=slots, **TWO)
                outs = llm.generate(prompts, params)
                case = (policy, options.get("swap_mode"), async_, skip, slots)
                for i, (out, r) in enumerate(zip(outs, ref)):
                    assert out.finish_reason == "length", (case, i, out.error)
                    if i % 3:
                        assert out.token_ids == r, (case, i)
                seeded.setdefault(tuple(tuple(o.token_ids) for i, o in enumerate(outs) if not i % 3), []).append(case)
                st = llm.engine.stats
                rebuilds[case] = (st["penalty_rebuilds"], st["blocks_out"], st["drops"])
                assert st["compiles_after_warmup"] == 0 and llm.engine._penalty_slots.num_free == slots, case
    assert len(seeded) == 1, seeded
    for a, s in MODES:
        built, swapped, _ = rebuilds[("mlfq", None, a, s, 2)]
        assert built > 0 and swapped > 0, rebuilds
        built, _, dropped = rebuilds[("mlfq", "recompute", a, s, 2)]
        assert built > 0 and dropped > 0, rebuilds


def test_rebuilds_larger_than_the_largest_bucket_and_a_prompt_of_max_model_len(tiny, monkeypatch):
    """Rebuild executables of 32 ids (``RunnerConfig.rebuild_buckets`` patched: by default a rebuild runs in
    several calls only past 32,768 ids); prompts of 15..127 tokens (127 = max_model_len - 1: one new token)
    added one step apart to two rows and two slots, mlfq's tiny quantum letting each newcomer preempt: slots are
    rebuilt in up to four calls, also for requests cut between prefill chunks (nothing generated yet), and every
    output equals the numpy reference."""
    from jserve.engine.runner import ModelRunner, RunnerConfig

    monkeypatch.setattr(RunnerConfig, "rebuild_buckets", property(lambda self: (32,)))
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(3, 256, size=n))) for n in (127, 110, 95, 120, 70, 20, 15, 30)]
    pens = [PENS[1 + i % 5] for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=r, frequency_penalty=f,
                             presence_penalty=p) for r, f, p in pens]
    ref = reference_greedy(tiny, prompts[:1], pens[:1], 1) + reference_greedy(tiny, prompts[1:], pens[1:], 6)
    sizes: list[tuple[int, int]] = []  # (ids, generated ids) per rebuilt slot
    rebuild = ModelRunner.rebuild_penalty_slots

    def spy(self, owners):
        sizes.extend((len(p) + len(g), len(g)) for _, p, g in owners)
        return rebuild(self, owners)

    monkeypatch.setattr(ModelRunner, "rebuild_penalty_slots", spy)
    for async_, skip in MODES[:2]:
        eng = LLM(tiny, scheduler="mlfq", scheduler_options={"q0": 1e-4}, async_scheduling=async_,
                  skip_idle_work=skip, max_penalty_requests=2, **TWO).engine
        outs = []
        for p, sp in zip(prompts, params):
            outs.append(eng.add_request(p, sp))
            eng.step()
        eng.run_until_done()
        assert [o.token_ids for o in outs] == ref, async_
        assert eng.stats["compiles_after_warmup"] == 0 and eng._penalty_slots.num_free == 2
    assert max(n for n, _ in sizes) > 3 * 32 and {g == 0 for _, g in sizes} == {True, False}, sizes
