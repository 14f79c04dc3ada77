"""Prefix caching in the engine (``EngineConfig.enable_prefix_caching``) on the tiny random Llama.

Prompts share a 40-token prefix (two full 16-token pages); the reference is ``jserve.models.greedy_generate``
(its own paged loop, no cache). A request that takes cached pages computes only the rest of its prompt, so
its outputs equal the reference only if those pages really hold the prefix's keys and values. The number of
cached tokens per request is computed by hand; a follow-up prompt that repeats an earlier reply takes the
reply's pages too; every policy stays transparent under memory pressure with the cache on; penalties (whose
tables must still see the cached prompt tokens) and async scheduling equal the engine without the cache;
requests asking for prompt log-probabilities bypass it.
"""

from __future__ import annotations

import numpy as np
import pytest

from jserve.engine import LLM, EngineConfig, SamplingParams
from jserve.engine.prefix import prefix_page_keys
from jserve.models import greedy_generate

from test_engine import POLICIES, ROOMY, SMALL, TIGHT

NEW = 24
TIGHTER = dict(TIGHT, num_device_blocks=9)  # 8 usable pages: shared prefixes save pages, so still preempt
PARAMS = SamplingParams(max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def family():
    """Prompt 0..5 share a 40-token prefix, 6 repeats prompt 0, 7 and 8 are unrelated."""
    rng = np.random.default_rng(3)
    common = list(map(int, rng.integers(3, 256, size=40)))
    prompts = [common + list(map(int, rng.integers(3, 256, size=int(n)))) for n in (5, 9, 20, 30, 2, 14)]
    prompts.append(list(prompts[0]))
    prompts += [list(map(int, rng.integers(3, 256, size=int(n)))) for n in (37, 50)]
    return prompts


@pytest.fixture(scope="module")
def reference(tiny, family):
    return greedy_generate(tiny, family, NEW)


def test_page_keys_name_exactly_the_common_full_pages():
    a = list(range(40))
    b = list(range(35)) + [99] * 10
    ka, kb = prefix_page_keys(a, 16), prefix_page_keys(b, 16)
    assert len(ka) == 2 and len(kb) == 2  # 40 and 45 tokens: two full pages each
    assert ka[0] == kb[0] and ka[1] == kb[1]  # tokens 0..31 agree
    assert prefix_page_keys(list(range(31)) + [7, 5], 16)[1] != ka[1]  # token 31 differs
    assert prefix_page_keys([1] * 16 + [2] * 16, 16)[1] != prefix_page_keys([2] * 16 + [2] * 16, 16)[1]  # chained
    assert prefix_page_keys(a[:15], 16) == ()


def test_cached_prefix_pages_are_reused_and_counted(tiny, family, reference):
    llm = LLM(tiny, scheduler="fcfs", enable_prefix_caching=True, **ROOMY)
    [first] = llm.generate([family[0]], PARAMS)  # computes the whole prompt and caches its two full pages
    assert first.num_cached_tokens == 0 and first.token_ids == reference[0]
    outs = llm.generate(family[1:], PARAMS)
    assert [o.token_ids for o in outs] == reference[1:]
    # Family members take the two common pages (32 tokens); the repeat of prompt 0 (45 tokens) also two, as
    # the last token is always computed; the unrelated prompts none.
    assert [o.num_cached_tokens for o in outs] == [32, 32, 32, 32, 32, 32, 0, 0]
    st = llm.engine.stats
    assert st["prefix_cache_hits"] == 6 * 32
    assert st["prefix_cache_queries"] == sum(len(p) for p in family)
    assert st["compiles_after_warmup"] == 0
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks and blocks.num_cached_blocks > 0
    text = llm.engine.metrics.render(llm.engine.stats)
    assert "jserve:prefix_cache_hits_total 192" in text


@pytest.mark.parametrize("policy, options", POLICIES, ids=[p + "-" + "-".join(o.values()) for p, o in POLICIES])
def test_every_policy_is_transparent_with_the_cache_under_pressure(tiny, family, reference, policy, options):
    llm = LLM(tiny, scheduler=policy, scheduler_options=options, enable_prefix_caching=True, **TIGHTER)
    outs = llm.generate(family, PARAMS)
    assert [o.token_ids for o in outs] == reference
    # An output counts what its first start found: at most the two pages of the common prefix, even when a
    # recompute took more (its own generated pages).
    assert all(o.num_cached_tokens in (0, 16, 32) for o in outs), [o.num_cached_tokens for o in outs]
    st = llm.engine.stats
    if policy != "static":
        assert st["blocks_out"] + st["drops"] > 0, st  # preempted
    assert st["prefix_cache_hits"] > 0, st
    assert st["compiles_after_warmup"] == 0
    llm.engine.scheduler.check_invariants()
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_device_blocks == blocks.num_usable_device_blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_follow_up_prompt_takes_the_pages_of_the_generated_reply(tiny, family, async_scheduling):
    """A second turn repeats the first prompt and its reply: 45 + 24 tokens, of which 68 were computed (the
    last sampled token never is), so four full pages are cached, two of them (mostly) generated tokens. The
    follow-up takes all four (64 tokens; keying prompt pages alone gave 32) and still equals the reference,
    which holds only if the generated pages hold the reply's keys and values."""
    llm = LLM(tiny, scheduler="fcfs", enable_prefix_caching=True, async_scheduling=async_scheduling, **ROOMY)
    [first] = llm.generate([family[0]], PARAMS)
    follow = family[0] + first.token_ids + [7, 8, 9, 10, 11]
    [second] = llm.generate([follow], PARAMS)
    assert second.num_cached_tokens == 64
    assert second.token_ids == greedy_generate(tiny, [follow], NEW)[0]
    assert llm.engine.stats["compiles_after_warmup"] == 0
    # Departing from the reply at position 46 (page 2) leaves the two pages before it; at 50 (page 3), three.
    for at, pages in ((1, 2), (5, 3)):
        departs = family[0] + first.token_ids[:at] + [(first.token_ids[at] + 1) % 256] + first.token_ids[at + 1:]
        [out] = llm.generate([departs], PARAMS)
        assert out.num_cached_tokens == 16 * pages
        assert out.token_ids == greedy_generate(tiny, [departs], NEW)[0]


def test_penalties_and_async_scheduling_see_the_cached_prompt(tiny, family):
    params = SamplingParams(max_tokens=NEW, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5,
                            presence_penalty=0.3)
    outs = {}
    for cache in (False, True):
        llm = LLM(tiny, scheduler="fastserve", scheduler_options={"swap_mode": "proactive"}, async_scheduling=True,
                  skip_idle_work=False, enable_prefix_caching=cache, max_penalty_requests=4, **TIGHTER)
        llm.generate([family[0]], params)
        outs[cache] = llm.generate(family[1:], params)
        if cache:
            assert sum(o.num_cached_tokens for o in outs[cache]) >= 32 * 5
            assert llm.engine.stats["penalty_rebuilds"] > 0  # a request starting from cached pages rebuilds its slot
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]


def test_prompt_logprobs_requests_bypass_the_cache(tiny, family):
    base = dict(SMALL, num_device_blocks=64, num_host_blocks=8, enable_prompt_logprobs=True)
    with_cache = LLM(tiny, scheduler="fcfs", enable_prefix_caching=True, **base)
    without = LLM(tiny, scheduler="fcfs", **base)
    with_cache.generate([family[0]], PARAMS)
    asks = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    [a] = with_cache.generate([family[1]], asks)
    [b] = without.generate([family[1]], asks)
    assert a.num_cached_tokens == 0
    assert a.prompt_logprobs == b.prompt_logprobs and a.token_ids == b.token_ids
    [plain] = with_cache.generate([family[2]], PARAMS)  # a request that does not ask still uses the cache
    assert plain.num_cached_tokens == 32


def test_config_checks_the_flag():
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool"):
        EngineConfig(enable_prefix_caching=1)
