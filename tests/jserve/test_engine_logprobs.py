"""Log-probabilities of generated tokens (``SamplingParams.logprobs``) on the tiny random Llama.

The reference is independent of the engine: one packed forward of every prefix ``prompt + generated[:j]``
through ``jserve.models`` (``build_step`` + ``Model.step`` on a fresh cache, no scheduler, no sampler), its
last-token logits through ``jax.nn.log_softmax`` in float32; and, fully independent, Hugging Face
transformers' logits of a tiny random Llama it wrote (through ``torch.log_softmax``). Checked: greedy logprobs and their top-k against
it, a seeded sampled run (the logprobs are the unfiltered model's at the tokens it drew), equality under
memory pressure (swaps, recompute) and async scheduling, streaming snapshots, and the on-device
``token_logprobs`` against numpy (including the skipped branch when no row asked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.engine.sampling import MAX_LOGPROBS, token_logprobs
from jserve.models import load
from jserve.models.paged import PageAllocator, SeqChunk, build_step, pages_needed

SMALL = dict(max_batch_size=4, max_tokens_per_batch=64, max_model_len=128, decode_buckets=(4,),
             token_buckets=(64,), swap_buckets=(8,), progress=False)  # the buckets of test_engine.py
TIGHT = dict(SMALL, num_device_blocks=14, num_host_blocks=64)  # forces preemption
ROOMY = dict(SMALL, num_device_blocks=64, num_host_blocks=64)
NEW = 12
K = 5


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [list(map(int, rng.integers(3, 256, size=int(n)))) for n in rng.integers(5, 50, size=8)]


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """``[len(generated), V]`` float32: log_softmax of the model's logits after ``prompt + generated[:j]``,
    every prefix a separate sequence of one packed step on a fresh cache."""
    page = 16
    seqs = [prompt + generated[:j] for j in range(len(generated))]
    need = [pages_needed(len(s), page) for s in seqs]
    alloc = PageAllocator(2 * NEW * 8)  # a fixed pool (and fixed padded shapes below): one compilation
    chunks = [SeqChunk(s, 0, alloc.allocate(n)) for s, n in zip(seqs, need)]
    caches = model.allocate_kv_caches(alloc.num_pages, page)
    assert len(seqs) <= 2 * NEW and max(need) <= 8
    step = build_step(chunks, page, num_tokens=2048, num_seqs=2 * NEW, pages_per_seq=8)
    logits, _ = model.step(step.input_ids, step.positions, caches, step.metadata)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[: len(seqs)], axis=-1))


def check_against_reference(model, prompt, out, k):
    ref = reference_logprobs(model, prompt, out.token_ids)
    assert len(out.logprobs) == len(out.token_ids)
    for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        ids = list(d)
        assert ids[0] == tok  # the sampled id first
        np.testing.assert_allclose(d[tok], ref[j, tok], atol=1e-5, rtol=0)
        top = ids if len(ids) == k else ids[1:]  # k entries when the sampled id is among the top k
        assert len(top) == k
        order = np.argsort(-ref[j], kind="stable")[:k]
        assert sorted(top) == sorted(order.tolist()), (j, top, order)
        rest = [d[i] for i in ids[1:]]
        assert rest == sorted(rest, reverse=True)  # after the sampled id: most likely first
        np.testing.assert_allclose([d[i] for i in ids], ref[j, ids], atol=1e-5, rtol=0)


def test_sampling_params_logprobs_validation():
    assert SamplingParams().logprobs is None
    assert SamplingParams(logprobs=np.int64(20)).logprobs == 20
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(ValueError, match="SamplingParams.logprobs"):
            SamplingParams(logprobs=bad)


def test_token_logprobs_against_numpy_and_skipped_when_not_asked():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(4, 300)) * 4).astype(np.float32)
    tokens = np.array([7, 250, 0, 299], np.int32)
    f = jax.jit(token_logprobs)
    chosen, top_ids, top_lps = map(np.asarray, f(logits, tokens, np.array([True, False, False, False])))
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, ref[np.arange(4), tokens], atol=1e-5)
    assert top_ids.shape == top_lps.shape == (4, MAX_LOGPROBS)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(top_lps, np.take_along_axis(ref, top_ids, -1), atol=1e-5)
    off = [np.asarray(a) for a in f(logits, tokens, np.zeros(4, bool))]
    assert all(not a.any() for a in off)  # nothing computed: zeros
    few = [np.asarray(a) for a in jax.jit(token_logprobs)(logits[:, :6], tokens % 6, np.ones(4, bool))]
    assert few[1].shape == (4, 6)  # a vocabulary below 20: all of it


def test_greedy_logprobs_match_the_reference(tiny, prompts):
    llm = LLM(tiny, scheduler="fcfs", **ROOMY)
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True, logprobs=K if i % 3 else None)
              for i in range(len(prompts))]
    params[2] = SamplingParams(max_tokens=NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    for i, (p, sp, out) in enumerate(zip(prompts, params, outs)):
        if sp.logprobs is None:
            assert out.logprobs is None
            continue
        check_against_reference(tiny, p, out, sp.logprobs)
        if sp.logprobs == 0:
            assert all(len(d) == 1 for d in out.logprobs)
        else:  # greedy: the sampled id is the most likely, so k entries
            assert all(len(d) == K for d in out.logprobs)
    assert llm.engine.stats["compiles_after_warmup"] == 0


def test_seeded_sampling_logprobs_are_the_drawn_tokens_unfiltered(tiny, prompts):
    llm = LLM(tiny, scheduler="fcfs", **ROOMY)
    params = [SamplingParams(max_tokens=NEW, temperature=0.8, top_k=40, top_p=0.9, seed=i, ignore_eos=True,
                             logprobs=3) for i in range(3)]
    outs = llm.generate(prompts[:3], params)
    drew_non_argmax = False
    for p, out in zip(prompts[:3], outs):
        check_against_reference(tiny, p, out, 3)
        drew_non_argmax |= any(len(d) == 4 or list(d)[0] != list(d)[1] for d in out.logprobs)
    assert drew_non_argmax  # it really sampled (some drawn token was not the most likely)


def test_logprobs_survive_preemption_and_async_scheduling(tiny, prompts, under_pressure):
    params = [SamplingParams(max_tokens=NEW * 2, ignore_eos=True, logprobs=K, temperature=0.7 * (i % 2), seed=i)
              for i in range(len(prompts))]
    roomy = LLM(tiny, scheduler="fcfs", **ROOMY).generate(prompts, params)
    for _, tight in under_pressure(tiny, prompts, params, **TIGHT):
        for a, b in zip(tight, roomy):
            assert a.token_ids == b.token_ids
            assert len(a.logprobs) == len(a.token_ids)  # recomputed tokens are not appended twice
            for da, db in zip(a.logprobs, b.logprobs):
                assert list(da) == list(db)
                np.testing.assert_allclose(list(da.values()), list(db.values()), atol=1e-5, rtol=0)


def test_stream_snapshots_carry_logprobs(tiny, prompts):
    llm = LLM(tiny, scheduler="fcfs", **ROOMY)
    sp = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    final = llm.generate([prompts[0]], sp)[0]
    snaps = list(llm.stream(prompts[0], sp))
    for s in snaps:
        assert len(s.logprobs) == len(s.token_ids)
    assert snaps[-1].logprobs == final.logprobs


def test_logprobs_match_hugging_face_transformers(hf_checkpoints):
    """A second, fully independent reference: a tiny random Llama written by transformers, loaded by jserve;
    the engine's logprobs of a seeded sampled run against torch's log_softmax of the transformers logits."""
    import torch

    ckpt = hf_checkpoints("llama")
    model = load(ckpt.path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, n).tolist() for n in (9, 30)]
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, seed=s, ignore_eos=True, logprobs=4) for s in (1, 2)]
    outs = LLM(model, scheduler="fcfs", **ROOMY).generate(prompts, params)
    for p, out in zip(prompts, outs):
        logits = ckpt.logits(p + out.token_ids)[len(p) - 1 : -1]  # [NEW, vocab]: the position before each token
        ref = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
        for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
            assert list(d)[0] == tok
            best = np.argsort(-ref[j])[:4]
            assert set(best.tolist()) <= set(d) and len(d) <= 5
            np.testing.assert_allclose([d[i] for i in d], ref[j, list(d)], atol=1e-5, rtol=0)  # seen: 1.4e-6
