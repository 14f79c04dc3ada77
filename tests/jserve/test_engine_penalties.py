"""Repetition / frequency / presence penalties (``SamplingParams``) on the tiny random Llama.

References, independent of the engine: a numpy implementation of vLLM's three penalties applied to the
last-token logits of a plain ``jserve.models`` forward (every sequence's whole prefix, one packed step on a
fresh cache, no scheduler, no sampler, no penalty tables) in a greedy loop; and Hugging Face transformers'
``generate(repetition_penalty=...)`` on a tiny random Llama it wrote. Checked: greedy outputs token for
token (r < 1 and r > 1, negative presence / frequency, all three at once) beside plain rows, more penalty
requests than slots, seeded sampling, equality under memory pressure (swaps, recompute) and async
scheduling, slots rebuilt from token ids after another request took them, the on-device table updates
against numpy, validation, and the stop-id vocabulary refusal.
``logit_bias`` (the same sparse adjustments as the ``min_tokens`` mask) is checked against the same
references: forced and removed greedy tokens, raw log-probabilities, with penalties and ``min_tokens``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.engine.penalties import (MAX_ADJUSTMENTS, MAX_BANNED_IDS, PenaltyArrays, PenaltyRow, PenaltySlots,
                                     SlotRebuild, apply_penalties, rebuild_slots, record_tokens,
                                     request_adjustments, sample_processed)
from jserve.models import load
from jserve.models.paged import PageAllocator, SeqChunk, build_step, pages_needed
from virtual_clock import virtual_clock

SLOTS = 4  # = max_batch_size, the fewest allowed
SMALL = dict(max_batch_size=4, max_tokens_per_batch=64, max_model_len=128, decode_buckets=(4,),
             token_buckets=(64,), swap_buckets=(8,), progress=False, max_penalty_requests=SLOTS)
TIGHT = dict(SMALL, num_device_blocks=14, num_host_blocks=64)  # forces preemption (and slot rebuilds)
ROOMY = dict(SMALL, num_device_blocks=64, num_host_blocks=64)
NEW = 12

PENALTIES = [  # (repetition, frequency, presence) per prompt
    (1.0, 0.0, 0.0),
    (1.3, 0.0, 0.0),
    (0.7, 0.0, 0.0),
    (1.0, 0.8, 0.0),
    (1.0, -0.5, 0.0),
    (1.0, 0.0, 1.2),
    (1.0, 0.0, -1.0),
    (1.2, 0.4, -0.3),
]


def params_of(pen, **kw) -> SamplingParams:
    r, f, p = pen
    return SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p, **kw)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [list(map(int, rng.integers(3, 256, size=int(n)))) for n in rng.integers(5, 50, size=len(PENALTIES))]


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, scheduler="fcfs", **ROOMY)


def penalize(logits: np.ndarray, prompt: list[int], out: list[int], pen) -> np.ndarray:
    """vLLM's penalties on one row's ``[V]`` float32 logits (numpy)."""
    r, f, p = (np.float32(v) for v in pen)
    vocab = logits.shape[-1]
    seen = np.zeros(vocab, bool)
    seen[prompt + out] = True
    count = np.bincount(np.asarray(out, np.int64), minlength=vocab).astype(np.float32)
    x = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
    return x - f * count - p * (count > 0).astype(np.float32)


def last_logits(model, seqs: list[list[int]]) -> np.ndarray:
    """``[len(seqs), V]`` float32: the logits after each whole sequence (one packed step, fresh cache)."""
    page, width = 16, 8
    alloc = PageAllocator(width * 8)  # fixed pool and padded shapes: one compilation
    chunks = [SeqChunk(s, 0, alloc.allocate(pages_needed(len(s), page))) for s in seqs]
    step = build_step(chunks, page, num_tokens=1024, num_seqs=8, pages_per_seq=width)
    logits, _ = model.step(step.input_ids, step.positions, model.allocate_kv_caches(alloc.num_pages, page),
                           step.metadata)
    return np.asarray(logits, np.float32)[: len(seqs)]


def reference_greedy(model, prompts, pens, new: int) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(new):
        logits = last_logits(model, [p + o for p, o in zip(prompts, outs)])
        for i, (p, o, pen) in enumerate(zip(prompts, outs, pens)):
            o.append(int(np.argmax(penalize(logits[i], p, o, pen))))
    return outs


def test_sampling_params_penalty_validation():
    sp = SamplingParams(presence_penalty=-2, frequency_penalty=np.float32(2.0), repetition_penalty=3)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (-2.0, 2.0, 3.0)
    assert isinstance(sp.presence_penalty, float) and sp.has_penalties
    assert not SamplingParams().has_penalties
    for name in ("presence_penalty", "frequency_penalty"):
        for bad in (2.01, -2.5, float("nan"), float("inf"), "1", True, None):
            with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
                SamplingParams(**{name: bad})
    for bad in (0, -1.0, float("nan"), float("inf"), "1.1", True, None):
        with pytest.raises(ValueError, match="SamplingParams.repetition_penalty"):
            SamplingParams(repetition_penalty=bad)


def test_table_updates_against_numpy():
    """One step's table work on hand-made inputs: reset, marking packed tokens (out-of-range slots dropped),
    adding the sparse adjustments (bias, -inf bans) to the raw logits, penalizing from the slot, counting the sampled tokens; the sampler sees the processed
    logits, or the raw ones and untouched tables when nothing names a slot or an adjusted id."""
    n, vocab = 3, 10
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, (n, vocab)).astype(np.int32)
    seen = rng.random((n, vocab)) < 0.3
    logits = rng.normal(size=(3, vocab)).astype(np.float32) * 3
    ids = np.array([4, 5, 6, 7, 8, 9], np.int32)
    lens = np.array([2, 3, 1])
    rows = [(PenaltyRow(1, True, True), params_of((1.5, 0.5, 0.25)), ([3, 6], [2.5, -100.0])),
            (None, SamplingParams(), ([2, 7, 4], [-np.inf, -np.inf, 50.0])),
            (PenaltyRow(2, False, False), params_of((0.8, -1.0, 0.0)), ())]
    pen = PenaltyArrays.build(rows, lens, 6, 3, n, vocab)
    assert pen.token_slot.tolist() == [1, 1, n, n, n, 2] and pen.reset.tolist() == [1, n, n]
    tables, out = jax.jit(apply_penalties)((counts, seen), logits, ids, pen)
    want_c, want_s = counts.copy(), seen.copy()
    want_c[1], want_s[1] = 0, False
    want_s[1, [4, 5]] = True
    want_s[2, 9] = True
    np.testing.assert_array_equal(np.asarray(tables[0]), want_c)
    np.testing.assert_array_equal(np.asarray(tables[1]), want_s)
    for i, s, pv in ((0, 1, (1.5, 0.5, 0.25)), (2, 2, (0.8, -1.0, 0.0))):
        r, f, p = (np.float32(v) for v in pv)
        x = logits[i].copy()
        if i == 0:  # the bias is added to the raw logits, before the penalties (vLLM's order)
            x[[3, 6]] += np.float32([2.5, -100.0])
        x = np.where(want_s[s], np.where(x > 0, x / r, x * r), x)
        x = x - f * want_c[s] - p * (want_c[s] > 0)
        np.testing.assert_allclose(np.asarray(out[i]), x, rtol=1e-6)
    masked = logits[1].copy()
    masked[[2, 7]] = np.finfo(np.float32).min  # no slot: untouched but for the banned ids (clamped) and the bias
    masked[4] += np.float32(50.0)
    np.testing.assert_array_equal(np.asarray(out[1]), masked)
    tokens = np.array([3, 3, 3], np.int32)
    after = jax.jit(record_tokens)(tables, tokens, pen)
    want_c[1, 3] += 1  # only the row that samples into a slot (row 2 does not sample)
    np.testing.assert_array_equal(np.asarray(after[0]), want_c)
    argmax = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)
    sample = jax.jit(lambda t, x, i, p: sample_processed(t, x, i, p, argmax))
    _, toks = sample((counts, seen), logits, ids, pen)
    np.testing.assert_array_equal(np.asarray(toks), np.argmax(np.asarray(out), axis=-1))  # processed logits
    off = PenaltyArrays.build([(None, SamplingParams(), ())] * 3, lens, 6, 3, n, vocab)
    tables2, toks2 = sample((counts, seen), logits, ids, off)  # skipped: raw logits, tables untouched
    np.testing.assert_array_equal(np.asarray(toks2), np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(tables2[0]), counts)
    np.testing.assert_array_equal(np.asarray(tables2[1]), seen)


def test_slot_rebuild_against_numpy():
    """``rebuild_slots`` over ``SlotRebuild.build``'s calls (split over several calls of 8 entries): the
    rebuilt slots hold exactly their prompt and generated ids as seen and their generated ids' counts (a
    repeated id counted twice), whatever they held before; other slots are untouched."""
    n, vocab = 4, 12
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, (n, vocab)).astype(np.int32)
    seen = rng.random((n, vocab)) < 0.5
    owners = [(2, [1, 5, 5], [7, 7, 3]), (0, [11, 0], [9, 1, 1, 1, 4, 6, 2, 8, 10])]
    calls = SlotRebuild.build(owners, 3, 8, n)
    assert len(calls) == 3 and calls[0].clear.tolist() == [2, 0, n] and calls[1].clear.tolist() == [n] * 3
    fn = jax.jit(rebuild_slots)
    tables = (counts, seen)
    for call in calls:
        tables = fn(tables, *call)
    want_c, want_s = counts.copy(), seen.copy()
    for slot, prompt, gen in owners:
        want_s[slot] = np.isin(np.arange(vocab), prompt + gen)
        want_c[slot] = np.bincount(gen, minlength=vocab)
    np.testing.assert_array_equal(np.asarray(tables[0]), want_c)
    np.testing.assert_array_equal(np.asarray(tables[1]), want_s)
    with pytest.raises(ValueError, match="4 penalty slots to rebuild"):
        SlotRebuild.build(owners * 2, 3, 8, n)


def test_penalty_slots_lend_the_least_recently_used_slot_outside_the_step():
    slots = PenaltySlots(3)
    assert [slots.acquire(r, {r})[0] for r in "abc"] == [0, 1, 2] and slots.num_free == 0
    assert slots.slot_of("a") == 0  # used again: b is now the least recently used
    assert slots.acquire("d", {"d", "b"}) == (2, "c")  # b is in the step: c is the oldest outside it
    assert slots.slot_of("c") is None and slots.acquire("e", {"e", "a", "d"}) == (1, "b")
    with pytest.raises(RuntimeError, match="all 3 penalty slots"):
        slots.acquire("f", {"f", "a", "d", "e"})
    slots.release("a")
    assert slots.acquire("f", {"f", "d", "e"}) == (0, None) and slots.num_free == 0
    # row(): a holder keeps its slot; a newcomer takes one, zeroed by the step when fresh, else rebuilt
    assert slots.row("d", {"d"}, fresh=False, samples=True, in_flight=True) == (PenaltyRow(2, False, True), False)
    assert slots.row("g", {"g", "e"}, fresh=True, samples=False, in_flight=False) == (PenaltyRow(0, True, False), False)
    assert slots.row("f", {"f", "g", "d"}, fresh=False, samples=True, in_flight=False) == (PenaltyRow(1, False, True),
                                                                                         True)  # e's, rebuilt
    with pytest.raises(RuntimeError, match="no penalty slot while its token is in flight"):
        slots.row("h", {"h"}, fresh=False, samples=True, in_flight=True)


def test_greedy_penalties_match_the_reference_with_more_requests_than_slots(tiny, prompts):
    """Eight penalty requests and four slots under fastserve, whose queues rotate the batch: every request
    is queued to the scheduler at once, requests that rejoin after their slot went to another rebuild it from
    their token ids, and every output equals the reference's. On a virtual clock: MLFQ demotes by time run,
    so on the wall clock a fast machine could finish every request before the batch rotates."""
    llm = virtual_clock(LLM(tiny, scheduler="fastserve", **ROOMY))
    eng = llm.engine
    params = [params_of(pen, max_tokens=NEW, ignore_eos=True) for pen in PENALTIES]
    outs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    assert all(eng.scheduler.get(o.request_id) is not None for o in outs)  # none waits outside the scheduler
    eng.step()
    assert eng._penalty_slots.slot_of(outs[1].request_id) is not None
    free = eng._penalty_slots.num_free
    assert eng.abort(outs[1].request_id)  # a slot's holder leaves: the slot is free again
    assert outs[1].finish_reason == "abort" and eng._penalty_slots.num_free == free + 1
    eng.run_until_done()
    assert eng.stats["penalty_rebuilds"] > 0  # rejoining requests rebuilt their slots
    ref = reference_greedy(tiny, prompts, PENALTIES, NEW)
    plain = reference_greedy(tiny, prompts, [PENALTIES[0]] * len(prompts), NEW)
    for i, (out, r) in enumerate(zip(outs, ref)):
        if i != 1:
            assert out.finish_reason == "length" and out.token_ids == r, (i, PENALTIES[i])
        if i > 1:
            assert r != plain[i], PENALTIES[i]  # the penalty changed the output (the test can fail)
    assert eng._penalty_slots.num_free == SLOTS
    assert eng.stats["compiles_after_warmup"] == 0


def test_seeded_sampling_with_penalties_is_reproducible(llm, prompts):
    # the tiny random model's logits are flat at this temperature: penalties that favour repeats show
    pens = [(1.0, 0.0, -2.0), (1.0, -2.0, 0.0), (2.0, -2.0, 0.0), (1.0, -1.0, -1.0)]
    params = [params_of(pen, max_tokens=NEW, temperature=0.9, seed=7, ignore_eos=True) for pen in pens]
    a = llm.generate(prompts[4:], params)
    b = llm.generate(prompts[4:], params)
    off = llm.generate(prompts[4:], SamplingParams(max_tokens=NEW, temperature=0.9, seed=7, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(x.token_ids != y.token_ids for x, y in zip(a, off))


def test_penalties_and_min_tokens_survive_preemption_and_async_scheduling(tiny, llm, prompts, under_pressure):
    first = np.argmax(last_logits(tiny, prompts), axis=-1)  # each plain greedy run's first token
    # rows 2, 5: min_tokens masks that token for 6 draws, then stops on it
    # rows 0, 4: logit_bias pushes that token down and id 7 up (row 0 has no penalty slot)
    params = [params_of(pen, max_tokens=2 * NEW, ignore_eos=True, temperature=0.8 * (i % 2), seed=i,
                        **(dict(min_tokens=6, stop_token_ids=[int(first[i])]) if i % 3 == 2 else {}),
                        **(dict(logit_bias={int(first[i]): -100, 7: 3.0}) if i % 4 == 0 else {}))
              for i, pen in enumerate(PENALTIES)]
    roomy = [o.token_ids for o in llm.generate(prompts, params)]  # 3 slots: requests wait for one
    assert all(int(first[i]) not in roomy[i][:6] for i in (2, 5))
    assert all(int(first[i]) not in roomy[i] and 7 in roomy[i] for i in (0, 4))
    for case, outs in under_pressure(tiny, prompts, params, **TIGHT):
        assert [o.token_ids for o in outs] == roomy, case


def test_penalties_match_hugging_face_transformers(hf_checkpoints):
    import torch

    ckpt = hf_checkpoints("llama")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 128, n).tolist() for n in (9, 30)]
    outs = LLM(load(ckpt.path), scheduler="fcfs", **ROOMY).generate(
        prompts, SamplingParams(max_tokens=NEW, repetition_penalty=2.0))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            x = torch.tensor([p])
            gen = lambda **kw: ckpt.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                                                   do_sample=False, pad_token_id=0, **kw)[0, len(p):].tolist()
            ref, plain = gen(repetition_penalty=2.0), gen()
        assert out.token_ids == ref and ref != plain


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm, prompts):
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=2, stop_token_ids=[5, 256]))[0]
    assert out.finish_reason == "error" and "stop_token_ids" in out.error and "256" in out.error
    assert llm.generate([prompts[0]], SamplingParams(max_tokens=2, stop_token_ids=[255]))[0].finish_reason != "error"
    bad = llm.generate([prompts[0]], {"presence_penalty": 3})[0]  # a dict is validated per request
    assert bad.finish_reason == "error" and "presence_penalty" in bad.error


def test_an_interrupted_step_frees_every_slot(tiny, llm, prompts):
    eng = llm.engine
    for p in prompts[:5]:
        eng.add_request(p, SamplingParams(max_tokens=4, repetition_penalty=1.2))
    launch, calls = eng.runner.launch, []

    def interrupted(*a, **k):  # two steps run (the slots hold their state), the third is interrupted
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return launch(*a, **k)

    eng.runner.launch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(3):
                eng.step()
    finally:
        del eng.runner.launch  # the instance attribute off: the method shows through
    assert eng._penalty_slots.num_free == SLOTS and not eng.has_unfinished()
    # a reused slot is reset: r < 1 favours seen ids, so stale marks of another prompt would show
    again = llm.generate([prompts[6]], params_of((0.2, 0.0, 0.0), max_tokens=NEW, ignore_eos=True))[0]
    assert again.token_ids == reference_greedy(tiny, [prompts[6]], [(0.2, 0.0, 0.0)], NEW)[0]


def test_min_tokens_masks_stop_and_eos_ids_until_reached(tiny, llm, prompts):
    p = prompts[0]
    plain = reference_greedy(tiny, [p], [PENALTIES[0]], NEW)[0]
    stop = plain[1]  # the plain greedy run would stop at its second token
    assert plain[0] != stop
    short = llm.generate([p], SamplingParams(max_tokens=NEW, stop_token_ids=[stop]))[0]
    assert short.token_ids == plain[:2] and short.stop_reason == stop
    k = 5
    out: list[int] = []  # the reference: stop id and eos (2) masked for the first k tokens, then stops
    for j in range(NEW):
        logits = last_logits(tiny, [p + out])[0].copy()
        if j < k:
            logits[[2, stop]] = -np.inf
        out.append(int(np.argmax(logits)))
        if j >= k and out[-1] in (2, stop):
            break
    got = llm.generate([p], SamplingParams(max_tokens=NEW, stop_token_ids=[stop], min_tokens=k))[0]
    assert got.token_ids == out and len(out) > 2 and stop not in out[:k]
    assert got.finish_reason == ("stop" if out[-1] in (2, stop) else "length")


def test_min_tokens_validation_and_refusal(llm, prompts):
    for bad in (-1, 1.5, True, "2", 17):
        with pytest.raises(ValueError, match="SamplingParams.min_tokens"):
            SamplingParams(max_tokens=16, min_tokens=bad)
    assert SamplingParams(max_tokens=4, min_tokens=np.int32(4)).min_tokens == 4
    many = llm.generate([prompts[0]], SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=list(range(3, 43))))[0]
    assert many.finish_reason == "error" and "min_tokens" in many.error and "41" in many.error  # + eos


def test_the_penalty_tables_come_off_the_accelerator_budget(monkeypatch):
    from jserve.engine import config as config_mod
    from jserve.engine.config import EngineConfig, device_pages
    from jserve.engine.kv_cache import KVCacheSpec
    from jserve.engine.penalties import table_bytes

    spec = KVCacheSpec(2, 2, 32, 16, "float32")  # 16 KiB a page
    monkeypatch.setattr(config_mod, "_accelerator_memory", lambda device: (10 * 2**20, 2**20))  # 10 MiB, 1 used
    cfg = EngineConfig(gpu_memory_utilization=0.5)
    assert device_pages(cfg, spec, 64, None) == (5 * 2**20 - 2**20) // spec.page_bytes  # 256 pages
    reserved = table_bytes(32, 32_768)  # 5 MiB
    assert reserved == 5 * 2**20
    with pytest.raises(ValueError, match="KV cache budget"):  # nothing left for the pool
        device_pages(cfg, spec, 64, None, reserved_bytes=reserved)
    assert device_pages(cfg, spec, 64, None, reserved_bytes=2**20) == 192


def test_extreme_repetition_penalties_keep_the_logits_finite(tiny, llm, prompts):
    """r near float32's limits: ``logit / r`` and ``logit * r`` overflow to +-inf, and a row holding +inf
    made the sampler's ``logits - max`` NaN (it drew id 0 every time, whatever the logits). The processed
    logits are clamped to float32's finite range, and r outside its normal range is refused."""
    big = float(np.finfo(np.float32).max)
    for bad in (1e-39, 1e-300, 1e39, 1e300):
        with pytest.raises(ValueError, match="SamplingParams.repetition_penalty"):
            SamplingParams(repetition_penalty=bad)
    n, vocab = 2, 6
    logits = np.array([[0.5, 60.0, 60.0, -3.0, 0.0, 2.0], [0.5, 60.0, 1.0, -3.0, 0.0, 2.0]], np.float32)
    seen = np.array([[0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0]], bool)
    rows = [(PenaltyRow(0, False, True), params_of((1.2e-38, 0.0, 0.0)), ()),
            (PenaltyRow(1, False, True), params_of((3e38, 0.0, 0.0)), ())]
    pen = PenaltyArrays.build(rows, np.array([1, 1]), 2, 2, n, vocab)
    _, out = jax.jit(apply_penalties)((np.zeros((n, vocab), np.int32), seen), logits, np.array([6, 6], np.int32), pen)
    np.testing.assert_array_equal(np.asarray(out[0]), [0.5, big, big, -3.0 * np.float32(1.2e-38), 0.0, 2.0])
    # 60 / 3e38 is 2e-37, or 0 where XLA multiplies by 1 / r (subnormal, flushed)
    np.testing.assert_allclose(np.asarray(out[1]), [0.5, 2e-37, 1.0, -big, 0.0, 2.0], rtol=1e-6, atol=1e-36)
    from jserve.engine.sampling import sample_tokens

    for seed in range(8):  # temperature 1: row 0 draws one of its two tied ids (1, 2), row 1 anything but 3
        toks = np.asarray(sample_tokens(out, jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2),
                                        jnp.full(2, seed, jnp.uint32), jnp.zeros(2, jnp.int32)))
        assert toks[0] in (1, 2) and toks[1] != 3, toks
    # end to end: each token sampled at r = 1.2e-38 is one of the ids the float32 reference ties at the top
    p = prompts[0]
    got = llm.generate([p], params_of((1.2e-38, 0.0, 0.0), max_tokens=6, temperature=1.0, seed=3,
                                      ignore_eos=True))[0].token_ids
    for j, tok in enumerate(got):
        x = penalize(last_logits(tiny, [p + got[:j]])[0], p, got[:j], (1.2e-38, 0.0, 0.0))
        x = np.clip(x, -big, big)
        assert x[tok] == x.max(), (j, tok, got)


def test_penalty_tables_larger_than_the_free_memory_are_refused_naming_the_option(tiny, monkeypatch):
    """On a CPU the tables' size was not checked (only subtracted from an explicit pool's check, whose error
    then blamed ``num_device_blocks``): a large ``max_penalty_requests`` allocated them until the process was
    killed. 1000 slots of the 256-id vocabulary are 1.28 MB; with 1 MiB free it is refused, naming it."""
    from jserve.engine import config as config_mod

    monkeypatch.setattr(config_mod, "_accelerator_memory", lambda device: None)
    monkeypatch.setattr(config_mod, "_available_memory_bytes", lambda: 2**20)
    for blocks in (None, 4):
        with pytest.raises(ValueError, match=r"max_penalty_requests=1000 \(penalty tables of 1000 x vocab 256"):
            LLM(tiny, **dict(SMALL, max_penalty_requests=1000, num_device_blocks=blocks))


def test_logit_bias_forces_or_removes_a_greedy_token_and_leaves_logprobs_raw(tiny, llm, prompts):
    """OpenAI's ``logit_bias``: +100 on one id makes greedy pick it every step; -100 on the plain greedy run's
    first token makes the first token the raw logits' second best (an independent ``jserve.models`` forward).
    The returned log-probabilities stay the raw model's."""
    p = prompts[1]
    raw = last_logits(tiny, [p])[0]
    order = np.argsort(-raw)
    assert raw[order[1]] > raw[order[2]] and raw[order[0]] - raw[order[1]] < 100  # the test can tell
    forced = 17 if order[0] != 17 else 18
    llm.generate([p], SamplingParams(max_tokens=1))  # the count catches up with the forward's compilations
    compiled = llm.engine.stats["compiles_after_warmup"]
    out = llm.generate([p], SamplingParams(max_tokens=6, ignore_eos=True, logit_bias={forced: 100}, logprobs=0))[0]
    assert out.token_ids == [forced] * 6
    want = raw[forced] - np.log(np.sum(np.exp(raw - raw.max()))) - raw.max()  # log-softmax of the raw logits
    assert abs(out.logprobs[0][forced] - want) < 1e-4
    out = llm.generate([p], SamplingParams(max_tokens=3, ignore_eos=True, logit_bias={int(order[0]): -100}))[0]
    assert out.token_ids[0] == int(order[1])
    assert llm.engine.stats["compiles_after_warmup"] == compiled  # the bias compiled nothing new


def test_logit_bias_with_min_tokens_and_penalties_matches_the_reference(tiny, llm, prompts):
    """All three at once, greedy: the bias (every step) and -inf on the eos (2) and stop id for the first ``k``
    tokens, then the penalties (vLLM's order); the request then stops on either. The reference is a numpy
    loop."""
    p, pen, k = prompts[2], (1.2, 0.4, -0.3), 4
    plain = reference_greedy(tiny, [p], [pen], NEW)[0]
    stop = plain[1]
    bias = {int(plain[0]): -3.0, int(plain[2]): 2.5, 2: 4.0, 40: 1.5}
    out: list[int] = []
    for j in range(NEW):
        x = last_logits(tiny, [p + out])[0].copy()
        for t, b in bias.items():
            x[t] += np.float32(b)
        if j < k:
            x[[2, stop]] = -np.inf
        out.append(int(np.argmax(penalize(x, p, out, pen))))
        if j >= k and out[-1] in (2, stop):
            break
    got = llm.generate([p], params_of(pen, max_tokens=NEW, stop_token_ids=[stop], min_tokens=k, logit_bias=bias))[0]
    assert got.token_ids == out and out != plain[: len(out)]
    assert got.finish_reason == ("stop" if out[-1] in (2, stop) else "length")


def test_logit_bias_validation_and_refusal(llm, prompts):
    from jserve.engine.sampling import MAX_LOGIT_BIAS

    sp = SamplingParams(logit_bias={np.int64(9): np.float32(1.5), 3: -100})
    assert sp.logit_bias == ((3, -100.0), (9, 1.5)) and hash(sp) == hash(SamplingParams(logit_bias={9: 1.5, 3: -100}))
    assert SamplingParams(logit_bias={}).logit_bias is None and not SamplingParams(logit_bias={1: 1}).has_penalties
    for bad, what in (({"5": 1.0}, "keys"), ({-1: 1.0}, "keys"), ({True: 1.0}, "keys"), ({5: 100.5}, "values"),
                      ({5: float("nan")}, "values"), ({5: float("inf")}, "values"), ({5: "1"}, "values"),
                      ([5, 6], "map"), ("x", "dict"),
                      ({i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS}")):
        with pytest.raises(ValueError, match=f"SamplingParams.logit_bias.*{what}"):
            SamplingParams(logit_bias=bad)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=2, logit_bias={5: 1.0, 256: 1.0}))[0]
    assert out.finish_reason == "error" and "logit_bias" in out.error and "256" in out.error
    # a bias on every id of the tiny vocabulary (256 <= MAX_LOGIT_BIAS) and the most min_tokens ids, which
    # overlap it, fit one row
    vocab = 256
    assert MAX_LOGIT_BIAS >= vocab
    full = {i: 0.5 for i in range(vocab)}
    ok = llm.generate([prompts[0]], SamplingParams(max_tokens=3, min_tokens=2, logit_bias=full,
                                                   stop_token_ids=list(range(3, 34))))[0]
    assert ok.finish_reason != "error" and len(ok.token_ids) >= 2


def test_a_biased_id_that_min_tokens_masks_keeps_only_its_mask():
    """``request_adjustments``: the bias on id 5 (a stop id while ``min_tokens`` holds) is dropped for the
    mask, so each id appears once in a row; after ``min_tokens`` the bias is back."""
    sp = SamplingParams(logit_bias={5: 3.0, 9: 1.0}, min_tokens=2, stop_token_ids=[5])
    early, late = request_adjustments(sp, frozenset({2}), 10)
    assert early[0].tolist() == [9, 2, 5] and early[1].tolist() == [1.0, -np.inf, -np.inf]
    assert late[0].tolist() == [5, 9] and late[1].tolist() == [3.0, 1.0]


def test_adjustments_before_the_penalty():
    """Hand-computed: a masked id ends at the lowest finite value; a biased id in ``seen`` is penalized with
    its bias (vLLM's order: (6 + 1) / 2); a row without a slot gets its bias alone (-2 + 6)."""
    n, vocab = 2, 10
    logits = np.tile(np.arange(vocab, dtype=np.float32) - 3, (2, 1))
    rows = [(PenaltyRow(0, True, True), SamplingParams(repetition_penalty=2.0),
             (np.array([5, 9], np.int32), np.array([-np.inf, 1.0], np.float32))),
            (None, SamplingParams(), (np.array([1], np.int32), np.array([6.0], np.float32)))]
    pen = PenaltyArrays.build(rows, np.array([1, 1]), 2, 2, n, vocab)
    tables = (np.zeros((n, vocab), np.int32), np.zeros((n, vocab), bool))
    _, out = jax.jit(apply_penalties)(tables, logits, np.array([9, 0], np.int32), pen)  # row 0's input: id 9
    want = logits.copy()
    want[0, 5], want[0, 9] = np.finfo(np.float32).min, 3.5
    want[1, 1] = 4.0
    np.testing.assert_array_equal(np.asarray(out), want)


def test_a_full_row_of_adjustments_lands_on_its_ids():
    """The largest row: ``MAX_LOGIT_BIAS`` biases and ``MAX_BANNED_IDS`` masked ids (one stop id also biased,
    so it is masked), against numpy: biased ids move by their bias, masked ids end at the lowest finite value,
    every other logit is untouched; the second row has no adjustments."""
    from jserve.engine.sampling import MAX_LOGIT_BIAS

    vocab = 1000
    rng = np.random.default_rng(0)
    bias = {int(i): float(v) for i, v in zip(rng.permutation(vocab)[:MAX_LOGIT_BIAS],
                                             rng.uniform(-100, 100, MAX_LOGIT_BIAS).round(2))}
    stops = [i for i in range(vocab) if i not in bias][: MAX_BANNED_IDS - 2] + [next(iter(bias))]
    sp = SamplingParams(logit_bias=bias, min_tokens=1, stop_token_ids=stops)
    adj, _ = request_adjustments(sp, frozenset({0}), vocab)
    assert len(adj[0]) == len(set(adj[0].tolist())) <= MAX_ADJUSTMENTS
    logits = rng.standard_normal((2, vocab)).astype(np.float32)
    pen = PenaltyArrays.build([(None, sp, adj), (None, SamplingParams(), ())], np.array([1, 1]), 2, 2, 1, vocab)
    tables = (np.zeros((1, vocab), np.int32), np.zeros((1, vocab), bool))
    _, out = jax.jit(apply_penalties)(tables, logits, np.array([1, 1], np.int32), pen)
    want = logits.copy()
    for i, v in bias.items():
        want[0, i] += np.float32(v)
    want[0, [0, *stops]] = np.finfo(np.float32).min
    np.testing.assert_array_equal(np.asarray(out), want)
