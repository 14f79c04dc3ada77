"""vLLM's ``prompt_logprobs`` request field on the OpenAI-compatible server (``jserve.server``).

The tiny Llama (dummy weights, the byte-level tokenizer of test_server.py: token id = byte value) is served with
prompt log-probabilities on. Every entry is checked against an independent reference: one causal forward of the
whole prompt through ``jserve.models`` (logits at every position, log-softmax), with no engine, scheduler or
sampler: the values, the top k, the ranks (1..k by position; the prompt token's among the whole vocabulary) and
the token names. Completions (a batch of prompts times ``n``, ``best_of``, beside ``echo`` with a smaller
``logprobs``), chat (the rendered template's ids), the streamed first chunks, and the renderer itself on
hand-made outputs (ties of position and rank, -inf). The refusals (a bool, a negative, > 20, a non-integer, a
server without the flag) are rows of test_server.py's BAD table.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from test_server import TINY, byte_token, byte_tokenizer, events

from jserve.engine import LLM, AsyncLLMEngine
from jserve.engine.outputs import RequestOutput
from jserve.models import load
from jserve.models.paged import PageAllocator, SeqChunk, build_step, pages_needed
from jserve.server import build_app, serve_in_thread
from jserve.server_responses import LOGPROB_FLOOR, trim_prompt_logprobs, vllm_prompt_logprobs


@pytest.fixture(scope="module")
def served():
    """(model, url): the tiny Llama served with prompt log-probabilities."""
    model = load("tiny-llama")
    model.tokenizer = byte_tokenizer()
    llm = LLM(model, **dict(TINY, enable_prompt_logprobs=True))
    engine = AsyncLLMEngine(llm.engine)
    with serve_in_thread(build_app(engine, "tiny")) as url:
        yield model, url
    engine.shutdown()


def full_forward(model, prompt: list[int]) -> np.ndarray:
    """``[len(prompt), V]``: log_softmax (float32) of the logits at every position of one causal forward of
    ``prompt`` (row q predicts token q + 1)."""
    import jax

    page = 16
    alloc = PageAllocator(16)
    chunk = SeqChunk(prompt, 0, alloc.allocate(pages_needed(len(prompt), page)))
    step = build_step([chunk], page, num_tokens=128, num_seqs=1, pages_per_seq=8)
    md = dataclasses.replace(step.metadata, logits_indices=jnp.arange(len(prompt), dtype=jnp.int32))
    logits, _ = model.step(step.input_ids, step.positions, model.allocate_kv_caches(alloc.num_pages, page), md)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def check(plp: list, prompt: list[int], ref: np.ndarray, k: int, atol: float = 1e-5) -> None:
    """One ``prompt_logprobs`` list against ``ref = full_forward(model, prompt)``."""
    assert len(plp) == len(prompt) and plp[0] is None
    for q in range(1, len(prompt)):
        row, tok = ref[q - 1], prompt[q]
        entries = plp[q]
        ids = [int(t) for t in entries]
        assert ids[0] == tok, q  # the prompt's own token first, as vLLM
        for t, e in zip(ids, entries.values()):
            assert set(e) == {"logprob", "rank", "decoded_token"} and e["decoded_token"] == byte_token(t)
            np.testing.assert_allclose(e["logprob"], row[t], atol=atol, rtol=0)
        own = row[tok]
        assert 1 + np.sum(row > own + atol) <= entries[str(tok)]["rank"] <= 1 + np.sum(row > own - atol), q
        top = ids if len(ids) == k else ids[1:]  # the prompt token, then the top k unless it is among them
        assert len(top) == k and sorted(top) == sorted(np.argsort(-row, kind="stable")[:k].tolist()), q
        top_ranks = [entries[str(t)]["rank"] for t in ids[1:]]
        assert top_ranks == sorted(top_ranks) and set(top_ranks) <= set(range(1, k + 1)), q


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [list(map(int, rng.integers(3, 256, size=n))) for n in (29, 13)]


def test_completion_choices_carry_their_prompts_logprobs(served):
    """A batch of two prompts x n=2: each choice holds its prompt's list (greedy, k=3), equal to the full forward;
    ``best_of`` and k=0 (the prompt token alone) too; a request without the field has no ``prompt_logprobs``."""
    model, url = served
    prompts = _prompts()
    refs = [full_forward(model, p) for p in prompts]
    base = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json=base | {"prompt": prompts, "n": 2, "prompt_logprobs": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        best = c.post("/v1/completions", json=base | {"prompt": prompts[1], "best_of": 3, "prompt_logprobs": 1,
                                                      "temperature": 1.0, "seed": 3}).json()
        zero = c.post("/v1/completions", json=base | {"prompt": prompts[1], "prompt_logprobs": 0}).json()
        plain = c.post("/v1/completions", json=base | {"prompt": prompts[1]}).json()
    choices = body["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2, 3]
    for ch in choices:
        i = ch["index"] // 2
        check(ch["prompt_logprobs"], prompts[i], refs[i], 3)
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert len(best["choices"]) == 1
    check(best["choices"][0]["prompt_logprobs"], prompts[1], refs[1], 1)
    check(zero["choices"][0]["prompt_logprobs"], prompts[1], refs[1], 0)
    assert all(len(e) == 1 for e in zero["choices"][0]["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in plain["choices"][0] and "prompt_logprobs" not in plain
    assert zero["choices"][0]["text"] == plain["choices"][0]["text"]  # greedy: the field changes nothing else


def test_prompt_logprobs_beside_echo_with_fewer_logprobs(served):
    """``echo`` + ``logprobs: 1`` + ``prompt_logprobs: 4``: the engine computes the top 4 once; echo's legacy
    ``top_logprobs`` still show the top 1 (and the prompt token), the field the top 4, with the same values."""
    model, url = served
    prompt = _prompts()[1]
    ref = full_forward(model, prompt)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True,
                                            "logprobs": 1, "prompt_logprobs": 4})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    check(choice["prompt_logprobs"], prompt, ref, 4)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for q in range(1, len(prompt)):
        assert lp["token_logprobs"][q] == choice["prompt_logprobs"][q][str(prompt[q])]["logprob"]
        best = byte_token(int(np.argmax(ref[q - 1])))
        assert best in lp["top_logprobs"][q] and set(lp["top_logprobs"][q]) <= {best, byte_token(prompt[q])}


def test_chat_prompt_logprobs_are_the_rendered_templates(served):
    """Chat: one list beside the choices (vLLM's place), for the rendered template's ids; streamed, each choice's
    first chunk (its role chunk) carries it and no later chunk does."""
    model, url = served
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "prompt_logprobs": 2}
    with httpx.Client(base_url=url, timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=body | {"n": 2})
        assert whole.status_code == 200, whole.text
        whole = whole.json()
        with c.stream("POST", "/v1/chat/completions", json=body | {"n": 2, "stream": True}) as s:
            evs = events(s)
    ids = whole["prompt_token_ids"]
    assert ids == list(b"<user>hi there\n<assistant>")
    check(whole["prompt_logprobs"], ids, full_forward(model, ids), 2)
    assert all("prompt_logprobs" not in ch for ch in whole["choices"])
    chunks = evs[:-1]
    carrying = [e for e in chunks if "prompt_logprobs" in e]
    assert [e["choices"][0]["index"] for e in carrying] == [0, 1]
    assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} for e in carrying)
    assert all(e["prompt_logprobs"] == whole["prompt_logprobs"] for e in carrying)
    for j in range(2):
        mine = [e for e in chunks if e["choices"][0]["index"] == j]
        assert mine[0] is carrying[j]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in mine)
        assert text == whole["choices"][j]["message"]["content"]


def test_streamed_completion_sends_them_in_each_choices_first_chunk(served):
    """Streamed completions of n=2: the first chunk of each choice carries the whole answer's list; later ones
    do not."""
    _, url = served
    prompt = _prompts()[0]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "n": 2, "prompt_logprobs": 2}
    with httpx.Client(base_url=url, timeout=60) as c:
        whole = c.post("/v1/completions", json=body).json()
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
            evs = events(s)
    assert evs[-1] == "[DONE]"
    for j in range(2):
        mine = [e["choices"][0] for e in evs[:-1] if e["choices"][0]["index"] == j]
        assert mine[0]["prompt_logprobs"] == whole["choices"][j]["prompt_logprobs"]
        assert all("prompt_logprobs" not in ch for ch in mine[1:]) and len(mine) > 1
        assert "".join(ch["text"] for ch in mine) == whole["choices"][j]["text"]


def _output(ids: list[int], lps: list, ranks: list | None) -> RequestOutput:
    out = RequestOutput("r", None, ids)
    out.prompt_logprobs = lps
    out.prompt_logprob_ranks = ranks
    return out


def test_the_renderer_on_hand_made_outputs():
    """Independent of the engine: position 1's token is inside the engine's top 2 (the engine put it first),
    position 2's is not and its log-probability is -inf; shown with k 1 of k_engine 2."""
    lps = [None, {7: -0.5, 3: -0.2}, {9: float("-inf"), 3: -0.1, 4: -0.3}]
    name = "t{}".format
    got = vllm_prompt_logprobs(_output([5, 7, 9], lps, [None, 2, 200]), 2, 1, name)
    assert got == [None,
                   {"7": {"logprob": -0.5, "rank": 2, "decoded_token": "t7"},
                    "3": {"logprob": -0.2, "rank": 1, "decoded_token": "t3"}},
                   {"9": {"logprob": LOGPROB_FLOOR, "rank": 200, "decoded_token": "t9"},
                    "3": {"logprob": -0.1, "rank": 1, "decoded_token": "t3"}}]
    json.dumps(got, allow_nan=False)  # valid JSON: no infinity
    # without the engine's ranks: a token inside the top k_engine gets its position, one outside none
    bare = vllm_prompt_logprobs(_output([5, 7, 9], lps, None), 2, 2, name)
    assert bare[1]["7"]["rank"] == 2 and bare[2]["9"]["rank"] is None
    assert list(bare[2]) == ["9", "3", "4"] and [e["rank"] for e in bare[2].values()] == [None, 1, 2]
    # echo's dicts cut to k = 1 keep the engine's layout: the prompt token, then the top 1 unless it is that
    assert trim_prompt_logprobs(lps, [5, 7, 9], 2, 1) == [None, {7: -0.5, 3: -0.2}, {9: float("-inf"), 3: -0.1}]
    assert trim_prompt_logprobs(lps, [5, 7, 9], 2, 2) is lps
    inside = [None, {7: -0.1, 3: -0.2}]  # the token is the most likely: k = 1 shows it alone
    assert trim_prompt_logprobs(inside, [5, 7], 2, 1) == [None, {7: -0.1}]


def test_a_one_token_prompt_and_echo_asking_more_than_the_field(served):
    """A prompt of one token has nothing to score: ``[null]`` (whole, streamed with n=2, beside ``echo`` with
    ``logprobs``). ``echo`` with ``logprobs: 5`` beside ``prompt_logprobs: 2`` (n=2, whole and streamed): the
    engine computes the top 5 once; the field shows the top 2 of them, echo's legacy lists the top 5, every value
    the full forward's."""
    model, url = served
    prompt = _prompts()[1]
    ref = full_forward(model, prompt)
    base = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        one = c.post("/v1/completions", json=base | {"prompt": [65], "prompt_logprobs": 3, "echo": True,
                                                     "logprobs": 1})
        assert one.status_code == 200, one.text
        with c.stream("POST", "/v1/completions",
                      json=base | {"prompt": [65], "prompt_logprobs": 3, "n": 2, "stream": True}) as s:
            one_evs = events(s)
        body = base | {"prompt": prompt, "echo": True, "logprobs": 5, "prompt_logprobs": 2, "n": 2}
        whole = c.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
            evs = events(s)
    choice = one.json()["choices"][0]
    assert choice["prompt_logprobs"] == [None] and choice["logprobs"]["token_logprobs"][0] is None
    firsts = [e["choices"][0] for e in one_evs[:-1] if "prompt_logprobs" in e["choices"][0]]
    assert sorted(ch["index"] for ch in firsts) == [0, 1] and all(ch["prompt_logprobs"] == [None] for ch in firsts)
    for ch in whole.json()["choices"]:
        check(ch["prompt_logprobs"], prompt, ref, 2)
        lp = ch["logprobs"]
        for q in range(1, len(prompt)):
            top5 = {byte_token(int(t)) for t in np.argsort(-ref[q - 1], kind="stable")[:5]}
            assert set(lp["top_logprobs"][q]) == top5 | {byte_token(prompt[q])}, q
            np.testing.assert_allclose(lp["token_logprobs"][q], ref[q - 1][prompt[q]], atol=1e-5, rtol=0)
    for j in range(2):
        mine = [e["choices"][0] for e in evs[:-1] if e["choices"][0]["index"] == j]
        assert mine[0]["prompt_logprobs"] == whole.json()["choices"][j]["prompt_logprobs"]
        assert all("prompt_logprobs" not in ch for ch in mine[1:])
        assert "".join(ch["text"] for ch in mine) == whole.json()["choices"][j]["text"]
