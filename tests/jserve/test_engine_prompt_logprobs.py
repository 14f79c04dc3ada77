"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``, ``EngineConfig.enable_prompt_logprobs``).

References independent of the engine: Hugging Face transformers' logits of a tiny random Llama (and OPT) it
wrote, through ``torch.log_softmax``; and, for the random tiny-llama preset, the full causal forward of the
prompt through ``jserve.models`` (``build_step`` + ``Model.step`` with logits at every position). Checked: the
values and the top-k at every prompt position, prompts split over several steps (chunked prefill with a small
token budget), under memory pressure (recompute and swaps, async scheduling, the branch-free step), a
one-token prompt, beside rows that do not ask, and the refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.models import load
from jserve.models.paged import PageAllocator, SeqChunk, build_step, pages_needed

from virtual_clock import virtual_clock

SMALL = dict(max_batch_size=4, max_tokens_per_batch=64, max_model_len=128, decode_buckets=(4,),
             token_buckets=(64,), swap_buckets=(8,), progress=False, enable_prompt_logprobs=True)
ROOMY = dict(SMALL, num_device_blocks=64, num_host_blocks=64)
TIGHT = dict(SMALL, num_device_blocks=12, num_host_blocks=64)  # forces preemption
K = 3


def full_forward_logprobs(model, prompt: list[int]) -> np.ndarray:
    """``[len(prompt), V]``: log_softmax of the logits at every position of one causal forward of ``prompt``."""
    page = 16
    alloc = PageAllocator(16)
    chunk = SeqChunk(prompt, 0, alloc.allocate(pages_needed(len(prompt), page)))
    caches = model.allocate_kv_caches(alloc.num_pages, page)
    step = build_step([chunk], page, num_tokens=128, num_seqs=1, pages_per_seq=8)
    md = dataclasses.replace(step.metadata, logits_indices=jnp.arange(len(prompt), dtype=jnp.int32))
    logits, _ = model.step(step.input_ids, step.positions, caches, md)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def check(prompt: list[int], plp: list, ref: np.ndarray, k: int, ranks: list, atol=1e-5) -> None:
    """``plp`` and ``ranks`` (an output's prompt_logprobs and prompt_logprob_ranks) against ``ref [len(prompt),
    V]`` (row q: after prompt[:q+1]); a rank may differ from ``ref``'s only by ids within ``atol`` of the token."""
    assert len(plp) == len(prompt) == len(ranks) and plp[0] is None and ranks[0] is None
    for q in range(1, len(prompt)):
        row, own = ref[q - 1], ref[q - 1, prompt[q]]
        assert 1 + np.sum(row > own + atol) <= ranks[q] <= 1 + np.sum(row > own - atol), q
        d = plp[q]
        ids = list(d)
        assert ids[0] == prompt[q]  # the prompt's own token first
        np.testing.assert_allclose([d[i] for i in ids], ref[q - 1, ids], atol=atol, rtol=0)
        top = ids if len(ids) == k else ids[1:]
        assert len(top) == k
        assert sorted(top) == sorted(np.argsort(-ref[q - 1], kind="stable")[:k].tolist())


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [list(map(int, rng.integers(3, 256, size=int(n)))) for n in (5, 23, 60, 90, 1, 41)]


def test_matches_hugging_face_transformers(hf_checkpoints):
    import torch

    for kind in ("llama", "opt-350m-like"):
        ckpt = hf_checkpoints(kind)
        model = load(ckpt.path)
        rng = np.random.default_rng(5)
        prompts = [rng.integers(3, 128, n).tolist() for n in (9, 30)]
        outs = LLM(model, scheduler="fcfs", **ROOMY).generate(
            prompts, SamplingParams(max_tokens=2, prompt_logprobs=K, ignore_eos=True))
        for p, out in zip(prompts, outs):
            ref = torch.log_softmax(torch.from_numpy(ckpt.logits(p)).double(), dim=-1).numpy()
            check(p, out.prompt_logprobs, ref, K, out.prompt_logprob_ranks)
            assert out.logprobs is None  # only what was asked


@pytest.mark.slow  # about 35-45 s on 2 cores: every policy under memory pressure
def test_against_the_full_forward_over_chunks_and_preemption(tiny, prompts):
    """Whole prompts, prompts split over steps of 16 tokens (chunked prefill), and runs that preempt (every
    eviction a drop, so prompts are replayed; swaps with async scheduling and the branch-free step): every
    run gives the full forward's values, and rows that do not ask get None beside them."""
    refs = [full_forward_logprobs(tiny, p) for p in prompts]
    params = [SamplingParams(max_tokens=6, prompt_logprobs=K if i % 3 else 0, ignore_eos=True)
              for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=6, ignore_eos=True)  # does not ask
    runs = {  # built one at a time: an engine counts every compilation in the process after its warm-up
        "roomy": lambda: LLM(tiny, scheduler="fcfs", **ROOMY),
        "chunked": lambda: LLM(tiny, scheduler="cp", **dict(ROOMY, max_tokens_per_batch=16, token_buckets=(16,))),
        # FastServe's preemptions on a virtual clock, the same on any machine (conftest.virtual_clock)
        "recompute": lambda: virtual_clock(LLM(tiny, scheduler="fastserve", scheduler_options={"swap_mode": "recompute"},
                                               **TIGHT)),
        "swaps, async, branch-free": lambda: virtual_clock(LLM(tiny, scheduler="fastserve", async_scheduling=True,
                                                               scheduler_options={"swap_mode": "proactive"},
                                                               skip_idle_work=False, **TIGHT)),
    }
    tokens = None
    for name, make in runs.items():
        llm = make()
        outs = llm.generate(prompts, params)
        st = llm.engine.stats
        if name in ("recompute", "swaps, async, branch-free"):
            assert st["drops"] + st["blocks_out"] > 0, (name, st)
        assert st["compiles_after_warmup"] == 0, name
        for p, sp, out, ref in zip(prompts, params, outs, refs):
            if sp.prompt_logprobs is None:
                assert out.prompt_logprobs is None and out.prompt_logprob_ranks is None
            else:
                check(p, out.prompt_logprobs, ref, sp.prompt_logprobs, out.prompt_logprob_ranks)
        if tokens is None:
            tokens = [o.token_ids for o in outs]
        assert [o.token_ids for o in outs] == tokens, name  # the generated tokens are unaffected


def test_refused_without_the_engine_option_and_validated(tiny):
    llm = LLM(tiny, scheduler="fcfs", **dict(ROOMY, enable_prompt_logprobs=False))
    out, ok = llm.generate([[5, 6, 7], [5, 6, 7]], [SamplingParams(max_tokens=2, prompt_logprobs=1),
                                                   SamplingParams(max_tokens=2)])
    assert out.finish_reason == "error" and "enable_prompt_logprobs" in out.error
    assert ok.finish_reason == "length" and ok.prompt_logprobs is None
    for bad in (-1, 21, 1.5, True, "2"):
        with pytest.raises(ValueError, match="SamplingParams.prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="enable_prompt_logprobs"):
        LLM(tiny, enable_prompt_logprobs="yes")
