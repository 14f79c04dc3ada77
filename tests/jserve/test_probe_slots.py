"""Adversarial checks of the penalty-slot cache (``jserve.engine.penalties.PenaltySlots``, the engine's
``_penalty_row`` and ``rebuild[M]``) found while probing it as a demanding user would.

References, independent of the engine: ``test_engine_penalties``' numpy greedy loop (vLLM's penalties on a plain
``jserve.models`` forward of each whole sequence), and the same engine request under a fresh request id.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_penalties import ROOMY, reference_greedy

from jserve.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def async_llm(tiny):
    return LLM(tiny, scheduler="fcfs", async_scheduling=True, **ROOMY)


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
    for _ in range(3):
        eng.step()
    assert eng._in_flight is not None and "A" in eng._in_flight.sampler_index  # A's token is in flight
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
