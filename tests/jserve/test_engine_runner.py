"""The runner's compiled step: a row's last token taken on the device from an earlier step's tokens (what
async scheduling dispatches with) gives what the same token given by the host gives; the step compiled
without run-time branches (``skip_idle_work=False``, the GPU default) has no conditional in its HLO and
gives the same tokens, log-probabilities and penalty tables as the step with them."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from jserve.engine import SamplingParams
from jserve.engine.kv_cache import KVCache, KVCacheSpec
from jserve.engine.penalties import PenaltyRow
from jserve.engine.runner import BatchRow, ModelRunner, RunnerConfig


def _runner(model, skip_idle_work=None):
    c = model.config
    kv = KVCache(KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, c.dtype), 12, 0)
    cfg = RunnerConfig(page_size=16, max_batch_size=4, max_tokens_per_batch=32, max_model_len=64,
                       decode_buckets=(2, 4), token_buckets=(32,), penalty_slots=3, skip_idle_work=skip_idle_work)
    r = ModelRunner(model, kv, cfg)
    r.warmup(progress=False)
    return r


def _greedy(n=0):
    return (SamplingParams(), 0, n)


def test_last_token_fed_from_an_earlier_steps_tokens(tiny):
    r = _runner(tiny)
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, tiny.config.vocab_size, size=n))) for n in (9, 5, 12)]
    pages = [[0], [1], [2]]
    first = r.launch(r.prepare([BatchRow(p, 0, pg, _greedy()) for p, pg in zip(prompts, pages)]))
    t = np.asarray(first.tokens)
    assert t.shape == (4,)  # max_batch_size: one shape for every bucket
    # Next step, two ways: the host gives each row its token, or the rows name where first.tokens hold it
    # (row i takes index order[i]; the prompts' pages follow the same order).
    order = [2, 0, 1]
    by_host = r.run([BatchRow([int(t[j])], len(prompts[j]), pages[j], _greedy(1)) for j in order])
    step = r.prepare([BatchRow([0], len(prompts[j]), pages[j], _greedy(1)) for j in order])
    for row, j in enumerate(order):
        step.feed_last_token(row, j)
    fed = np.asarray(r.launch(step, prev_tokens=first.tokens).tokens)[:3]
    assert fed.tolist() == by_host.tolist()
    # Without the feed, the placeholder 0 is what the model reads: the check above can tell them apart.
    plain = r.run([BatchRow([0], len(prompts[j]), pages[j], _greedy(1)) for j in order])
    assert plain.tolist() != by_host.tolist()


def _hlo(r, size):
    ids, pos, md, samp, pen = r._pack([], size, size, True)
    low = r.fns.step.lower(r._state_leaves, ids, pos, r.kv.device, r.penalty_tables, md, *samp, pen,
                           r._no_tokens, r._no_feed(size))
    return low.compile().as_text()


def test_branch_free_step_has_no_conditional(tiny):
    assert re.search(r"\bconditional\(", _hlo(_runner(tiny, skip_idle_work=True), 2))  # the check can see one
    assert not re.search(r"\bconditional\(", _hlo(_runner(tiny, skip_idle_work=False), 2))


@pytest.mark.parametrize("rows_kind", ["greedy", "mixed"])
def test_branch_free_step_computes_what_the_branching_step_does(tiny, rows_kind):
    rng = np.random.default_rng(7)
    v = tiny.config.vocab_size
    prompts = [list(map(int, rng.integers(3, v, size=n))) for n in (7, 11)]
    if rows_kind == "greedy":  # every branch skips in the branching step
        params = [SamplingParams(), SamplingParams()]
        pens = [None, None]
    else:  # sampling with top-k/top-p, logprobs, penalties and a bias: every branch runs
        params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.8, logprobs=5, repetition_penalty=1.3,
                                 logit_bias={7: 3.0}),
                  SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.4)]
        pens = [PenaltyRow(0, True, True), PenaltyRow(2, True, True)]
    got = []
    for skip in (True, False):
        r = _runner(tiny, skip_idle_work=skip)
        assert r.skip_idle_work is skip
        outs = []
        for step in range(3):  # prefill, then two decodes through the penalty tables
            if step == 0:
                rows = [BatchRow(p, 0, [i], (sp, 11 + i, 0), pen,
                                 (np.array([7], np.int32), np.array([3.0], np.float32)) if sp.logit_bias else ())
                        for i, (p, sp, pen) in enumerate(zip(prompts, params, pens))]
            else:
                prev = outs[-1][0]
                rows = [BatchRow([int(prev[i])], len(prompts[i]) + step - 1, [i], (sp, 11 + i, step),
                                 None if pen is None else PenaltyRow(pen.slot, False, True),
                                 (np.array([7], np.int32), np.array([3.0], np.float32)) if sp.logit_bias else ())
                        for i, (sp, pen) in enumerate(zip(params, pens))]
            o = r.launch(r.prepare(rows))
            outs.append((np.asarray(o.tokens)[:2], np.asarray(o.logprob)[:2], np.asarray(o.top_ids)[:2]))
        got.append((outs, [np.asarray(t) for t in jax.device_get(r.penalty_tables)]))
    (a, tables_a), (b, tables_b) = got
    for (ta, la, ia), (tb, lb, ib) in zip(a, b):
        assert ta.tolist() == tb.tolist()
        if rows_kind == "mixed":  # row 0 asked for log-probabilities
            np.testing.assert_allclose(la[0], lb[0], rtol=1e-5, atol=1e-6)
            assert ia[0].tolist() == ib[0].tolist()
    for x, y in zip(tables_a, tables_b):
        assert np.array_equal(x, y)
    if rows_kind == "mixed":
        assert tables_a[0].sum() == 6  # two sampling rows x three steps counted, in both variants


@pytest.mark.parametrize("decode, message", [
    ((1, 8), "decode_buckets (1, 8) go above max_batch_size=4"),  # was a JAX broadcasting error while compiling
    ((1, 2), "decode_buckets (1, 2) do not cover max_batch_size=4"),
])
def test_decode_buckets_must_end_at_the_batch_size(decode, message):
    cfg = RunnerConfig(page_size=16, max_batch_size=4, max_tokens_per_batch=64, max_model_len=128,
                       decode_buckets=decode, token_buckets=(64,))
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.resolved()
    assert dataclasses.replace(cfg, decode_buckets=(1, 4)).resolved().decode_buckets == (1, 4)
