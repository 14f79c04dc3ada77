"""The OpenAI-compatible server (``jserve.server``) over a real uvicorn on an ephemeral loopback port.

The tiny Llama (dummy weights) gets a byte-level tokenizer whose token id is the byte value, so its text has an
independent reference: ``bytes(ids).decode("utf-8", "replace")``; its greedy ids are checked against
``jserve.models.greedy_generate`` (its own paged loop, no scheduler), under a device pool small enough to make
the fastserve policy swap. SmolLM2 reproduces the golden ids from Hugging Face transformers through
``/v1/completions`` (compared with the ``return_token_ids`` extension) and answers a chat request with its own
template. Bad input gets its status and message while a concurrent good request completes; a request the
scheduler refuses is a 400, streaming or not; a failed engine thread gives 500s and a 503 health, not a hang; a
client that disconnects aborts its request and the engine frees its pages. Several choices (``n``), ``best_of``
and lists of prompts: greedy choices equal the single answer, seeded ones are each the n=1 answer of seed + j,
a batch is prompt-major, ``best_of``'s pick is checked against the Python API's log-probabilities, streamed
choices reassemble into the whole answer, and a refusal or a disconnect leaves nothing running. ``jserve serve``
starts, prints its URL, serves and stops on SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jserve.cli import main
from jserve.engine import LLM, AsyncLLMEngine
from jserve.models import greedy_generate, load
from jserve.server import build_app, serve_in_thread
from jserve.tokenizer import Tokenizer
from virtual_clock import virtual_now

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"
TINY = dict(scheduler="fastserve", max_batch_size=4, max_tokens_per_batch=64, max_model_len=256, decode_buckets=(4,),
            token_buckets=(64,), swap_buckets=(8,), num_device_blocks=24, num_host_blocks=64,
            progress=False)  # 23 usable pages: six 64-token requests with 40 new tokens each must swap
NEW = 40


def byte_tokenizer() -> Tokenizer:
    """256 single-byte tokens (GPT-2's byte <-> printable character table, no merges): token id = byte value."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, eos_token_id=2, chat_template=TEMPLATE)


def as_text(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny():
    """(llm, url, prompts, reference): the tiny Llama served at url; reference = greedy ids of prompts."""
    model = load("tiny-llama")
    model.tokenizer = byte_tokenizer()
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 256, size=int(n)))) for n in rng.integers(20, 64, size=6)]
    reference = greedy_generate(model, prompts, NEW)
    llm = LLM(model, **TINY)
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, "tiny")
    with serve_in_thread(app) as url:
        yield llm, url, prompts, reference
    engine.shutdown()


def events(response: httpx.Response) -> list:
    """The SSE ``data:`` payloads of a streamed response, parsed (``"[DONE]"`` kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def all_pages_free(llm) -> bool:
    blocks = llm.engine.scheduler.blocks
    return (not llm.engine.has_unfinished() and blocks.num_free_device_blocks == blocks.num_usable_device_blocks
            and blocks.num_used_host_blocks == 0)


def test_health_and_models(tiny):
    _, url, _, _ = tiny
    with httpx.Client(base_url=url) as c:
        assert c.get("/health").json() == {"status": "ok"}
        data = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["object"], m["max_model_len"]) for m in data] == [("tiny", "model", 256)]
        assert c.get("/v1/models/tiny").json()["id"] == "tiny"
        r = c.get("/v1/models/gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_metrics_count_what_the_server_served(tiny):
    """GET /metrics: Prometheus text (parsed line by line by test_engine_metrics.parse) whose counters grow by
    exactly one request's tokens per completion, labelled with the served model's name."""
    from test_engine_metrics import parse

    llm, url, prompts, _ = tiny
    with httpx.Client(base_url=url, timeout=60) as c:
        before = parse(c.get("/metrics").text)
        body = c.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 5, "temperature": 0,
                                               "ignore_eos": True}).json()
        assert body["usage"]["completion_tokens"] == 5
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(r.text)

    def value(s, name, **labels):
        return next(v for lab, v in s[name] if all(lab.get(k) == x for k, x in labels.items()))

    assert all(lab.get("model_name") == "tiny" for v in after.values() for lab, _ in v)
    assert value(after, "jserve:generation_tokens_total") - value(before, "jserve:generation_tokens_total") == 5
    assert value(after, "jserve:prompt_tokens_total") - value(before, "jserve:prompt_tokens_total") == len(prompts[0])
    grew = (value(after, "jserve:request_success_total", finished_reason="length")
            - value(before, "jserve:request_success_total", finished_reason="length"))
    assert grew == 1 and value(after, "jserve:e2e_request_latency_seconds_count") >= 1
    assert value(after, "jserve:compiles_after_warmup") == 0


def test_completion_matches_the_reference_decode(tiny):
    _, url, prompts, reference = tiny
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompts[0], "max_tokens": NEW,
                                            "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert choice["token_ids"] == reference[0] and choice["finish_reason"] == "length"
        assert choice["text"] == as_text(reference[0])
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["prompt_token_ids"] == prompts[0]
        assert body["usage"] == {"prompt_tokens": len(prompts[0]), "completion_tokens": NEW,
                                 "total_tokens": len(prompts[0]) + NEW}
        # a text prompt is tokenized by the model's tokenizer (here: its bytes)
        r = c.post("/v1/completions", json={"prompt": "héllo", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                            "return_token_ids": True}).json()
        assert r["prompt_token_ids"] == list("héllo".encode()) and r["usage"]["completion_tokens"] == 3
        # OpenAI fields jserve does not implement are fine at their neutral values (what clients send by default)
        neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "echo": False, "best_of": 1,
                   "logit_bias": {}, "suffix": None, "user": "someone", "n": 1, "top_k": -1, "seed": 7}
        r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2} | neutral)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        # a batch of one prompt (what LangChain's OpenAI wrapper and others send) is that prompt; it was a 400
        text_ids = c.post("/v1/completions", json={"prompt": "héllo", "max_tokens": 3, "temperature": 0,
                                                   "ignore_eos": True, "return_token_ids": True}).json()
        for one, expected in (([prompts[0]], reference[0][:3]), (["héllo"], text_ids["choices"][0]["token_ids"])):
            r = c.post("/v1/completions", json={"prompt": one, "max_tokens": 3, "temperature": 0,
                                                "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["prompt_token_ids"] == (one[0] if isinstance(one[0], list) else list(b"h\xc3\xa9llo"))
            assert r.json()["choices"][0]["token_ids"] == expected


def test_concurrent_requests_all_complete(tiny, monkeypatch):
    llm, url, prompts, reference = tiny
    # FastServe demotes by time run: on a virtual clock it preempts (and so swaps) however fast the steps are
    monkeypatch.setattr(llm.engine, "now", virtual_now())
    before = dict(llm.engine.stats)

    async def one(client, i):
        body = {"prompt": prompts[i], "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        if i % 2:  # half of them stream
            ids = []
            async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        ids += json.loads(line[6:])["choices"][0]["token_ids"]
            return ids
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

    assert asyncio.run(run()) == reference
    st = llm.engine.stats
    assert st["blocks_out"] > before["blocks_out"]  # the pool was too small: requests were swapped and back
    assert st["compiles_after_warmup"] == 0
    assert all_pages_free(llm)


def test_streamed_chunks_concatenate_to_the_text(tiny):
    _, url, prompts, reference = tiny
    text = as_text(reference[1])
    # a stop string from the middle of the (deterministic) greedy text: both answers must cut there
    at = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[at:at + 2]
    base = {"prompt": prompts[1], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        for extra in ({}, {"stop": [stop, "\x00\x00never"]}):
            whole = c.post("/v1/completions", json=base | extra).json()["choices"][0]
            with c.stream("POST", "/v1/completions", json=base | extra | {"stream": True,
                                                                          "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                evs = events(r)
            assert evs[-1] == "[DONE]"
            usage, chunks = evs[-2], evs[:-2]
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(whole["token_ids"])
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["text"]
            assert sum((ch["choices"][0]["token_ids"] for ch in chunks), []) == whole["token_ids"]
            assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == whole["finish_reason"]
            assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
            if extra:
                assert whole["text"] == text[:text.find(stop)] and whole["finish_reason"] == "stop"
            else:
                assert whole["text"] == text


def test_chat_completion_uses_the_chat_template(tiny):
    _, url, _, _ = tiny
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
        assert r["prompt_token_ids"] == list(b"<system>be brief\n<user>hi there\n<assistant>")
        msg = r["choices"][0]["message"]
        assert msg["role"] == "assistant" and msg["content"] == as_text(r["choices"][0]["token_ids"])
        assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            evs = events(s)
        assert evs[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in evs[:-1])
        assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in evs[1:-1]) == msg["content"]
        assert evs[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_template_kwargs_reach_the_template(tiny):
    """vLLM's ``chat_template_kwargs`` field: it was refused as a field the API does not have."""
    llm, url, _, _ = tiny
    tok = llm.tokenizer
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "return_token_ids": True}
    template, tok.chat_template = tok.chat_template, "{% if terse %}[t]{% endif %}" + TEMPLATE
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            plain = c.post("/v1/chat/completions", json=body).json()["prompt_token_ids"]
            terse = c.post("/v1/chat/completions", json=body | {"chat_template_kwargs": {"terse": True}}).json()
            bad = c.post("/v1/chat/completions", json=body | {"chat_template_kwargs": {"messages": []}})
            tokens = c.post("/tokenize", json={"messages": body["messages"], "chat_template_kwargs": {"terse": 1}})
    finally:
        tok.chat_template = template
    assert plain == list(b"<user>hi\n<assistant>")
    assert terse["prompt_token_ids"] == list(b"[t]<user>hi\n<assistant>")
    assert tokens.json()["tokens"] == terse["prompt_token_ids"]  # vLLM's /tokenize takes them too
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"
    assert "may not set 'messages'" in bad.json()["error"]["message"]


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """``[len(generated), V]``: log_softmax (float32) of the model's logits after each ``prompt + generated[:j]``,
    every prefix a sequence of one packed step of ``jserve.models`` on a fresh cache (no engine, no sampler)."""
    import jax
    import jax.numpy as jnp

    from jserve.models.paged import PageAllocator, SeqChunk, build_step, pages_needed

    seqs = [prompt + generated[:j] for j in range(len(generated))]
    need = [pages_needed(len(q), 16) for q in seqs]
    alloc = PageAllocator(8 * 16)
    chunks = [SeqChunk(q, 0, alloc.allocate(n)) for q, n in zip(seqs, need)]
    assert len(seqs) <= 8 and sum(map(len, seqs)) <= 1024 and max(need) <= 16  # fixed shapes: one compilation
    step = build_step(chunks, 16, num_tokens=1024, num_seqs=8, pages_per_seq=16)
    logits, _ = model.step(step.input_ids, step.positions, model.allocate_kv_caches(alloc.num_pages, 16),
                           step.metadata)
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[: len(seqs)], axis=-1))


def test_completion_echo(tiny):
    """``echo``: the prompt's text before the choice's (a string prompt as sent, token ids decoded); with
    ``logprobs`` (a server started with prompt log-probabilities), the prompt's tokens first, the first one
    null, each later one's log-probability given the tokens before it, against a plain forward of every
    prefix. This is what lm-eval-harness's loglikelihood requests ask (max_tokens 1, echo, logprobs 1)."""
    llm, url, prompts, reference = tiny
    prompt = prompts[0][:7]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        plain = c.post("/v1/completions", json=body).json()["choices"][0]
        echoed = c.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]
        text = c.post("/v1/completions", json=body | {"echo": True, "prompt": "hi there"}).json()["choices"][0]
    assert echoed["text"] == as_text(prompt) + plain["text"] and echoed["logprobs"] is None
    assert text["text"].startswith("hi there") and len(text["text"]) > len("hi there")

    model = llm.model
    server_llm = LLM(model, **dict(TINY, enable_prompt_logprobs=True))
    engine = AsyncLLMEngine(server_llm.engine)
    try:
        with serve_in_thread(build_app(engine, "tiny")) as url2, httpx.Client(base_url=url2, timeout=60) as c:
            r = c.post("/v1/completions", json=body | {"echo": True, "logprobs": 2, "return_token_ids": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            # max_tokens 0 (older harnesses' scoring requests): the prompt alone, scored
            zero = c.post("/v1/completions", json=body | {"echo": True, "logprobs": 2, "max_tokens": 0}).json()
            # streamed: the chunks reassemble into the same text and logprobs, with and without max_tokens 0
            streams = {}
            for mt in (1, 0):
                with c.stream("POST", "/v1/completions", json=body | {"echo": True, "logprobs": 2, "max_tokens": mt,
                                                                      "stream": True}) as r:
                    events = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                streams[mt] = [e["choices"][0] for e in events]
    finally:
        engine.shutdown()
    gen = choice["token_ids"]  # checked below: the greedy token after the whole prompt
    ref = reference_logprobs(model, prompt[:1], prompt[1:] + gen)  # row j: after (prompt + gen)[:j + 1]
    ids = prompt + gen
    lp = choice["logprobs"]
    assert choice["text"] == as_text(ids)
    assert lp["tokens"] == [byte_token(b) for b in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-5, rtol=0)
    assert gen[0] == int(np.argmax(ref[-1]))  # the generated token is the greedy one after the whole prompt
    for j, top in enumerate(lp["top_logprobs"][1:]):
        best = [byte_token(int(b)) for b in np.argsort(-ref[j])[:2]]
        assert set(best) <= set(top) and list(top)[0] == byte_token(ids[j + 1])
    assert lp["text_offset"] == [len(as_text(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    z = zero["choices"][0]
    assert z["text"] == as_text(prompt) and zero["usage"]["completion_tokens"] == 0
    assert z["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(prompt)]
    for mt, whole in ((1, choice), (0, z)):
        chunks = streams[mt]
        assert "".join(ch["text"] for ch in chunks) == whole["text"], mt
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((ch["logprobs"][key] for ch in chunks), []) == whole["logprobs"][key], (mt, key)
        assert chunks[-1]["finish_reason"] == "length"


def byte_token(b: int) -> str:
    """OpenAI's name of a byte token: its character, or ``bytes:\\xNN`` when it is not a whole UTF-8 character."""
    return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"


def test_completion_logprobs_match_the_reference(tiny):
    llm, url, prompts, reference = tiny
    n, k = 6, 3
    ref = reference_logprobs(llm.model, prompts[0], reference[0][:n])
    body = {"prompt": prompts[0], "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": k}
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = reference[0][:n]
    lp = choice["logprobs"]
    assert choice["text"] == as_text(ids)
    assert lp["tokens"] == [byte_token(b) for b in ids]
    np.testing.assert_allclose(lp["token_logprobs"], ref[np.arange(n), ids], atol=1e-5, rtol=0)
    assert lp["text_offset"] == [len(as_text(ids[:i]).rstrip("\ufffd")) for i in range(n)]
    for j, top in enumerate(lp["top_logprobs"]):
        best = np.argsort(-ref[j])[:k]  # greedy: the sampled token is the most likely, so k entries
        assert list(top) == [byte_token(int(b)) for b in best]
        np.testing.assert_allclose(list(top.values()), ref[j, best], atol=1e-5, rtol=0)


def test_text_offsets_are_the_lengths_of_the_text_before_each_token():
    """The renderer's incremental offsets against decoding every prefix (trailing incomplete character
    dropped), over ASCII, multi-byte characters split across tokens, and invalid bytes; a stream's renderer
    asked chunk by chunk gives the same."""
    from jserve.engine import SamplingParams
    from jserve.openai_protocol import LogprobRenderer

    rng = np.random.default_rng(0)
    ids = list("a€b é\n".encode()) + rng.integers(3, 256, 300).tolist() + list("日本x".encode())
    lps = [{t: -1.0} for t in ids]
    want = [len(as_text(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    whole = LogprobRenderer(byte_tokenizer(), SamplingParams(logprobs=0)).completion(ids, lps)
    assert whole["text_offset"] == want
    render, streamed = LogprobRenderer(byte_tokenizer(), SamplingParams(logprobs=0)), []
    for end in range(3, len(ids) + 3, 7):
        streamed += render.completion(ids[:end], lps, start=len(streamed))["text_offset"]
    assert streamed == want


def test_chat_logprobs_streamed_equal_the_whole_answer(tiny):
    llm, url, _, _ = tiny
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": True, "top_logprobs": 2}
    with httpx.Client(base_url=url, timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            evs = events(s)
        plain = c.post("/v1/chat/completions", json=body | {"logprobs": False, "top_logprobs": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    choice = whole["choices"][0]
    ids = choice["token_ids"]
    content = choice["logprobs"]["content"]
    ref = reference_logprobs(llm.model, whole["prompt_token_ids"], ids)
    assert [e["token"] for e in content] == [byte_token(b) for b in ids]
    assert [e["bytes"] for e in content] == [[b] for b in ids]  # the raw byte, even when not a whole character
    np.testing.assert_allclose([e["logprob"] for e in content], ref[np.arange(len(ids)), ids], atol=1e-5, rtol=0)
    for j, e in enumerate(content):
        best = np.argsort(-ref[j])[:2]
        assert [t["bytes"] for t in e["top_logprobs"]] == [[int(b)] for b in best]
        np.testing.assert_allclose([t["logprob"] for t in e["top_logprobs"]], ref[j, best], atol=1e-5, rtol=0)
    assert evs[0]["choices"][0]["logprobs"] is None  # the role chunk
    streamed = sum((e["choices"][0]["logprobs"]["content"] for e in evs[1:-1]), [])
    assert streamed == content


BAD = [  # (path, raw body or JSON, status, words of the message, param)
    ("/v1/completions", b'{"prompt": [1, 2', 400, "not valid JSON", None),
    ("/v1/completions", [1, 2], 400, "must be a JSON object", None),
    ("/v1/completions", {"prompt": [5], "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"prompt": [5], "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {"prompt": [5], "stop": 7}, 400, "a string or a list of strings", "stop"),
    ("/v1/completions", {"prompt": [5.5]}, 400, "list of token ids", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "'prompt' is an empty list", "prompt"),
    ("/v1/completions", {"prompt": [[5], [6, 300]]}, 400, "prompt[1] token id 300 is outside", "prompt[1]"),
    ("/v1/completions", {"prompt": ["ab", ""]}, 400, "prompt[1] is empty", "prompt[1]"),
    ("/v1/completions", {"prompt": [[5], [5] * 256]}, 400, "prompt[1] has 256 tokens", "prompt[1]"),
    ("/v1/completions", {"prompt": [[5] * 10, [5] * 200], "max_tokens": 100}, 400,
     "prompt[1] asks for 300 (200 in the prompt", "max_tokens"),
    ("/v1/completions", {"prompt": [[5]] * 9, "best_of": 128}, 400, "asks for 1152 sequences", "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "missing required field 'prompt'", "prompt"),
    ("/v1/completions", {"prompt": [5], "temprature": 0.5}, 400, "unknown field 'temprature'", "temprature"),
    ("/v1/completions", {"prompt": [5], "temperature": -1}, 400, "SamplingParams.temperature", "temperature"),
    ("/v1/completions", {"prompt": [5], "top_p": 0}, 400, "SamplingParams.top_p", "top_p"),
    ("/v1/completions", {"prompt": [5], "top_k": -3}, 400, "SamplingParams.top_k", "top_k"),
    ("/v1/completions", {"prompt": [5], "seed": -1}, 400, "SamplingParams.seed", "seed"),
    ("/v1/completions", {"prompt": [5], "max_tokens": 0}, 400, "SamplingParams.max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": [5], "stop": [""]}, 400, "SamplingParams.stop", "stop"),
    ("/v1/completions", {"prompt": [5], "n": 0}, 400, "'n' must be an integer in 1..128", "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 129}, 400,
     "'n' must be an integer in 1..128, got 129", "n"),
    ("/v1/completions", {"prompt": [5], "n": 3, "best_of": 2}, 400, "'best_of' must be an integer in n..128",
     "best_of"),
    ("/v1/completions", {"prompt": [5], "best_of": 2, "stream": True}, 400, "cannot be streamed", "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400,
     "unknown field 'best_of'", "best_of"),
    ("/v1/completions", {"prompt": [5], "presence_penalty": 2.5}, 400, "SamplingParams.presence_penalty must be",
     "presence_penalty"),
    ("/v1/completions", {"prompt": [5], "frequency_penalty": "x"}, 400, "valid number", "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, 400,
     "SamplingParams.repetition_penalty must be", "repetition_penalty"),
    ("/v1/completions", {"prompt": [5], "logprobs": 6}, 400, "'logprobs' must be an integer in 0..5", "logprobs"),
    ("/v1/completions", {"prompt": [5], "logprobs": -1}, 400, "'logprobs' must be an integer in 0..5", "logprobs"),
    ("/v1/completions", {"prompt": [5], "logprobs": True}, 400, "valid integer", "logprobs"),
    ("/v1/completions", {"prompt": [5], "logprobs": 1, "echo": True}, 400, "started without them", "echo"),
    # vLLM's prompt_logprobs: 0..20 (checked first), then the server's flag (this one was started without it)
    ("/v1/completions", {"prompt": [5], "prompt_logprobs": 1}, 400, "--enable-prompt-logprobs", "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0}, 400,
     "--enable-prompt-logprobs", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [5], "prompt_logprobs": 21}, 400, "'prompt_logprobs' must be an integer in 0..20",
     "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": -1}, 400,
     "'prompt_logprobs' must be an integer in 0..20", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [5], "prompt_logprobs": True}, 400, "valid integer", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [5], "prompt_logprobs": 1.5}, 400, "valid integer", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [5], "prompt_logprobs": "2"}, 400, "valid integer", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [5], "logit_bias": {"x7": 1}}, 400, "'logit_bias' keys must be token ids",
     "logit_bias"),
    ("/v1/completions", {"prompt": [5], "logit_bias": {"-3": 1}}, 400, "'logit_bias' keys must be token ids",
     "logit_bias"),
    # was Python's "Exceeds the limit (4300 digits) for integer string conversion", naming no field
    ("/v1/completions", {"prompt": [5], "logit_bias": {"9" * 5000: 1}}, 400,
     "'logit_bias' names token id 99999999999999999999... (5000 digits), outside the vocabulary", "logit_bias"),
    ("/v1/completions", {"prompt": [5], "logit_bias": {"7": 101}}, 400, "SamplingParams.logit_bias values must be",
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"300": -1}}, 400,
     "'logit_bias' names token id 300, outside the vocabulary", "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {str(i): 1 for i in range(301)}}, 400, "at most 300", "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "'top_logprobs' must be an integer in 0..20", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "'top_logprobs' needs 'logprobs': true", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, 400,
     "valid boolean", "logprobs"),
    ("/v1/completions", {"prompt": [5] * 256}, 400, "the prompt has 256 tokens", "prompt"),
    ("/v1/completions", {"prompt": [5] * 200, "max_tokens": 100}, 400, "maximum context length is 256", "max_tokens"),
    ("/v1/completions", {"prompt": [5, 300]}, 400, "token id 300 is outside the vocabulary", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "the prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": [5], "stream_options": {"include_usage": True}}, 400, "only allowed with",
     "stream_options"),
    ("/v1/completions", {"prompt": [5], "model": "gpt-4"}, 404, "'gpt-4' does not exist", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "a string, a list of text parts",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "mood": 1}]}, 400,
     "unknown field 'mood' in messages[0]", "messages[0].mood"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' is empty", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "'tools' is not supported", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "maximum context length",
     "messages"),
    ("/v1/embeddings", {"input": "x"}, 404, "no route '/v1/embeddings'", None),
    # these were 500s (an unhandled RecursionError / ValueError / TypeError), each logged as a crash:
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON", None),
    ("/v1/completions", b'{"prompt": [5], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON", None),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "lone surrogate", "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "lone surrogate",
     "messages"),
    ("/v1/completions", b"", 400, "not valid JSON", None),
    # bodies past the limit (1 MiB for this context of 256) are refused before they are read, parsed or tokenized
    ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "request body of 2097", None),
]


def test_bad_input_gets_its_status_while_a_good_request_completes(tiny):
    llm, url, prompts, reference = tiny

    async def bad(client, path, body, status, words, param):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = await client.post(path, **kw)
        err = r.json()["error"]
        assert (r.status_code, param) == (status, err["param"]), (body, r.text)
        assert words in err["message"], (body, err)
        assert err["type"] == "invalid_request_error"

    async def good(client):
        ids = []
        body = {"prompt": prompts[2], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
                    if len(ids) == 2:  # the good request is running: now send every bad one
                        await asyncio.gather(*(bad(client, *case) for case in BAD))
        return ids

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await good(client)

    assert asyncio.run(run()) == reference[2]
    with httpx.Client(base_url=url) as c:
        assert c.get("/health").json() == {"status": "ok"}


def test_chat_without_a_template_is_refused(tiny):
    llm, url, _, _ = tiny
    model = llm.model
    template, model.tokenizer.chat_template = model.tokenizer.chat_template, None
    try:
        with httpx.Client(base_url=url) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    finally:
        model.tokenizer.chat_template = template
    assert r.status_code == 400 and "has no chat template" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"


def test_a_failed_engine_thread_is_reported_not_hung(tiny):
    llm, _, prompts, _ = tiny
    broken = LLM(llm.model, **TINY)  # same model and shapes: no new compilation
    calls = []

    def step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return real_step()

    real_step, broken.engine.step = broken.engine.step, step
    engine = AsyncLLMEngine(broken.engine)
    try:
        with serve_in_thread(build_app(engine, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as c:
            body = {"prompt": prompts[0], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                evs = events(r)
            assert evs[-1] == "[DONE]" and "device lost" in evs[-2]["error"]["message"]
            r = c.post("/v1/completions", json=body | {"stream": False})
            assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
            health = c.get("/health")
            assert health.status_code == 503 and "device lost" in health.json()["error"]
    finally:
        engine.shutdown()


def test_a_request_the_scheduler_refuses_gets_a_400(tiny):
    llm, _, prompts, _ = tiny
    picky = LLM(llm.model, **TINY)  # same model and shapes: no new compilation
    assert len(prompts[0]) >= 16
    picky.engine.scheduler._reject_reason = \
        lambda req: "it needs 999 pages; the device pool holds 23" if req.prompt_len >= 16 else None
    engine = AsyncLLMEngine(picky.engine)
    try:
        with serve_in_thread(build_app(engine, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as c:
            for stream in (False, True):  # refused before any stream starts
                r = c.post("/v1/completions", json={"prompt": prompts[0], "stream": stream})
                assert r.status_code == 400 and r.headers["content-type"] == "application/json"
                assert "the scheduler refused the request: it needs 999 pages" in r.json()["error"]["message"]
                # one refused prompt of a batch (n samples each) fails the request, naming it; the others are aborted
                tokens0 = picky.engine.stats["tokens"]
                r = c.post("/v1/completions", json={"prompt": [[5] * 4, prompts[0]], "n": 2, "max_tokens": 200,
                                                    "ignore_eos": True, "stream": stream})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
                assert r.json()["error"]["message"].startswith("prompt[1]: the scheduler refused the request")
                assert _wait_idle(picky) and picky.engine.stats["tokens"] - tokens0 < 400
    finally:
        engine.shutdown()


def _wait_idle(llm, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if all_pages_free(llm):
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_aborts_the_request(tiny, monkeypatch):
    llm, url, _, _ = tiny
    aborted = []  # (request id, was it live) for every abort the engine thread carries out
    real_abort = llm.engine.abort
    monkeypatch.setattr(llm.engine, "abort", lambda rid: aborted.append((rid, real_abort(rid))) or aborted[-1][1])
    long = {"prompt": [5] * 10, "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    # streaming: read the first chunk, hang up
    tokens0 = llm.engine.stats["tokens"]
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long | {"stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: {")
    assert _wait_idle(llm)  # every page is free again
    assert llm.engine.stats["tokens"] - tokens0 < 240  # fewer than max_tokens: it did not run to the end
    assert [live for rid, live in aborted if rid.startswith("cmpl-")][:1] == [True]  # stopped while running
    # non-streaming: the client gives up waiting
    aborted.clear()
    tokens0 = llm.engine.stats["tokens"]
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=0.05)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=long)
    assert _wait_idle(llm)
    assert llm.engine.stats["tokens"] - tokens0 < 240
    assert [live for rid, live in aborted][:1] == [True]


# ------------------------------------------------------------------------------------------ n, best_of, batches


def _post(c, body: dict, path: str = "/v1/completions") -> dict:
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_n_samples_greedy_identical_and_seeded_reproducible(tiny):
    _, url, prompts, reference = tiny
    base = {"prompt": prompts[0], "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        body = _post(c, base | {"n": 3, "temperature": 0})
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
        assert [ch["token_ids"] for ch in body["choices"]] == [reference[0][:8]] * 3  # greedy: all the n=1 answer
        assert body["usage"] == {"prompt_tokens": len(prompts[0]), "completion_tokens": 24,
                                 "total_tokens": len(prompts[0]) + 24}  # the prompt is counted once
        seeded = base | {"n": 3, "temperature": 1.0, "seed": 123}
        first, again = _post(c, seeded), _post(c, seeded)
        ids = [ch["token_ids"] for ch in first["choices"]]
        assert ids == [ch["token_ids"] for ch in again["choices"]]  # reproducible
        assert len({tuple(x) for x in ids}) == 3  # the samples differ
        # sample j is the n=1 request seeded seed + j (vLLM's rule), so sample 0 is the plain seeded answer
        singles = [_post(c, seeded | {"n": 1, "seed": 123 + j})["choices"][0]["token_ids"] for j in range(3)]
        assert ids == singles
        top = _post(c, seeded | {"n": 2, "seed": 2**32 - 1})["choices"]  # seeds wrap around (the engine's range)
        assert top[1]["token_ids"] == _post(c, seeded | {"n": 1, "seed": 0})["choices"][0]["token_ids"]
        chat = _post(c, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                         "ignore_eos": True, "n": 2}, "/v1/chat/completions")
        assert [ch["index"] for ch in chat["choices"]] == [0, 1]
        assert chat["choices"][0]["message"] == chat["choices"][1]["message"]
        assert chat["usage"]["completion_tokens"] == 10


def test_a_list_of_prompts_times_n_is_prompt_major(tiny):
    _, url, prompts, reference = tiny
    with httpx.Client(base_url=url, timeout=60) as c:
        body = _post(c, {"prompt": prompts[:2], "n": 2, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
        choices = body["choices"]
        assert [ch["index"] for ch in choices] == [0, 1, 2, 3]
        assert [ch["token_ids"] for ch in choices] == [reference[k // 2][:8] for k in range(4)]
        assert [ch["prompt_token_ids"] for ch in choices] == [prompts[k // 2] for k in range(4)]
        assert "prompt_token_ids" not in body  # several prompts: each choice carries its own
        assert body["usage"] == {"prompt_tokens": len(prompts[0]) + len(prompts[1]), "completion_tokens": 32,
                                 "total_tokens": len(prompts[0]) + len(prompts[1]) + 32}
        # text prompts, as lm-eval-harness' local-completions sends them: each its single-prompt answer
        texts = ["héllo", "ab", "héllo"]
        single = {t: _post(c, {"prompt": t, "max_tokens": 4, "temperature": 0, "ignore_eos": True})["choices"][0]
                  for t in set(texts)}
        batch = _post(c, {"prompt": texts, "max_tokens": 4, "temperature": 0, "ignore_eos": True})["choices"]
        assert [(ch["text"], ch["finish_reason"]) for ch in batch] == \
               [(single[t]["text"], single[t]["finish_reason"]) for t in texts]


@pytest.fixture(scope="module")
def python_api(tiny):
    """The Python API (``LLM``) on the served model, same shapes (no new compilation): the reference."""
    return LLM(tiny[0].model, **TINY)


def test_best_of_returns_the_candidates_of_highest_cumulative_logprob(tiny, python_api):
    _, url, prompts, _ = tiny
    from jserve.engine import SamplingParams

    prompt, k = prompts[3], 3

    def candidates(seed: int) -> list[tuple[float, list[int]]]:
        params = [SamplingParams(max_tokens=6, temperature=1.0, seed=seed + j, ignore_eos=True, logprobs=0)
                  for j in range(k)]
        outs = python_api.generate([prompt] * k, params)
        return [(sum(d[t] for t, d in zip(o.token_ids, o.logprobs)), o.token_ids) for o in outs]

    # a seed whose best candidate is not the first sample, so returning sample 0 would fail
    seed = next(s for s in range(100, 120) if max(range(k), key=lambda j: candidates(s)[j][0]) != 0)
    cands = candidates(seed)
    ranked = sorted(range(k), key=lambda j: -cands[j][0])
    assert len({c for c, _ in cands}) == k
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed, "ignore_eos": True,
            "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        one = _post(c, body | {"best_of": k})
        two = _post(c, body | {"best_of": k, "n": 2, "logprobs": 1})
    assert [ch["token_ids"] for ch in one["choices"]] == [cands[ranked[0]][1]]
    assert one["choices"][0]["logprobs"] is None  # asked internally only
    assert one["usage"]["completion_tokens"] == 6  # the returned choice's tokens
    assert [ch["index"] for ch in two["choices"]] == [0, 1]
    assert [ch["token_ids"] for ch in two["choices"]] == [cands[j][1] for j in ranked[:2]]
    np.testing.assert_allclose([sum(ch["logprobs"]["token_logprobs"]) for ch in two["choices"]],
                               [cands[j][0] for j in ranked[:2]], atol=1e-4, rtol=0)


def test_penalties_reach_the_engine(tiny, python_api):
    """OpenAI's presence / frequency penalties and vLLM's repetition penalty are the engine's fields: each
    request's greedy ids are those of the Python API with that one field set, and differ from the plain ones
    (values where presence and frequency give different ids too, so a swap of the two would show)."""
    _, url, prompts, reference = tiny
    from jserve.engine import SamplingParams

    cases = {"presence_penalty": 0.05, "frequency_penalty": -0.3, "repetition_penalty": 1.3}
    body = {"prompt": prompts[5], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        got = {f: _post(c, body | {f: v})["choices"][0]["token_ids"] for f, v in cases.items()}
        chat = _post(c, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True, "repetition_penalty": 1.3},
                     "/v1/chat/completions")
    swapped = {"presence_penalty": "frequency_penalty", "frequency_penalty": "presence_penalty"}
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True, **{f: v}) for f, v in cases.items()]
    params += [SamplingParams(max_tokens=NEW, ignore_eos=True, **{swapped[f]: cases[f]}) for f in swapped]
    params += [SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=1.3)]
    want = [o.token_ids for o in python_api.generate([prompts[5]] * 5 + [chat["prompt_token_ids"]], params)]
    assert got == dict(zip(cases, want[:3]))
    assert all(ids != reference[5] for ids in got.values())
    assert want[3] != got["presence_penalty"] and want[4] != got["frequency_penalty"]
    assert chat["choices"][0]["token_ids"] == want[5]


def test_streamed_choices_reassemble_into_the_whole_answer(tiny):
    _, url, prompts, _ = tiny
    body = {"prompt": prompts[:2], "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 5, "ignore_eos": True,
            "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        whole = _post(c, body)
        with c.stream("POST", "/v1/completions",
                      json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            evs = events(r)
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                            "max_tokens": 4, "stream": True}) as r:
            chat = events(r)
    assert evs.count("[DONE]") == 1 and evs[-1] == "[DONE]"
    usage, chunks = evs[-2], evs[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == choice["index"]]
        assert "".join(m["text"] for m in mine) == choice["text"]
        assert sum((m["token_ids"] for m in mine), []) == choice["token_ids"]
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["length"]  # finishes once, last
    assert {ch["choices"][0]["index"] for ch in chunks} == {0, 1, 2, 3}
    assert [e["choices"][0]["delta"] for e in chat[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [e["choices"][0]["index"] for e in chat[:2]] == [0, 1] and chat.count("[DONE]") == 1
    assert sorted(e["choices"][0]["index"] for e in chat[2:-1] if e["choices"][0]["finish_reason"]) == [0, 1]


def test_a_cancelled_stream_of_n_choices_leaves_nothing_running(tiny, monkeypatch):
    llm, url, _, _ = tiny
    aborted = {}  # request id -> was it live, for every abort the engine thread carries out
    real_abort = llm.engine.abort
    monkeypatch.setattr(llm.engine, "abort", lambda rid: aborted.setdefault(rid, real_abort(rid)))
    long = {"prompt": [5] * 10, "max_tokens": 240, "temperature": 0, "ignore_eos": True, "n": 3}
    for stream in (True, False):
        aborted.clear()
        tokens0 = llm.engine.stats["tokens"]
        if stream:  # read the first chunk, hang up
            with httpx.Client(base_url=url, timeout=60) as c:
                with c.stream("POST", "/v1/completions", json=long | {"stream": True}) as r:
                    assert next(r.iter_lines()).startswith("data: {")
        else:  # the client gives up waiting
            with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=0.05)) as c:
                with pytest.raises(httpx.ReadTimeout):
                    c.post("/v1/completions", json=long)
        assert _wait_idle(llm)  # no request left in the engine, every page free
        # all three choices were stopped while running (how many tokens they made first depends on the machine)
        assert sorted(aborted.values()).count(True) == 3, aborted
        assert llm.engine.stats["tokens"] - tokens0 < 3 * 240


# ------------------------------------------------------------------------------------------ SmolLM2

GOLDEN_PROMPT = [504, 3575, 282, 4649, 314]
GOLDEN = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216]
# test_engine_smollm2.py's shapes and pools, so a full run compiles these executables once
SMOL = dict(max_batch_size=4, max_tokens_per_batch=64, max_model_len=96, decode_buckets=(4,), token_buckets=(64,),
            swap_buckets=(8,), progress=False, num_device_blocks=8, num_host_blocks=48)


@pytest.mark.slow  # about 30 s on 2 cores: SmolLM2 compiles behind the server
def test_smollm2_golden_ids_and_chat(smollm2):
    llm = LLM(smollm2, scheduler="fastserve", **SMOL)
    engine = AsyncLLMEngine(llm.engine)
    try:
        with serve_in_thread(build_app(engine, "SmolLM2-135M-Instruct")) as url, \
                httpx.Client(base_url=url, timeout=120) as c:
            body = c.post("/v1/completions", json={"prompt": GOLDEN_PROMPT, "max_tokens": 20, "temperature": 0,
                                                   "return_token_ids": True}).json()
            choice = body["choices"][0]
            assert choice["token_ids"] == GOLDEN
            assert choice["text"] == smollm2.tokenizer.decode(GOLDEN, skip_special_tokens=True)
            assert choice["text"].startswith(" Paris.") and choice["finish_reason"] == "length"
            by_text = c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                      "temperature": 0}).json()["choices"][0]["text"]
            assert by_text == smollm2.tokenizer.decode(GOLDEN[:4], skip_special_tokens=True)
            chat = c.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                                                        "temperature": 0, "return_token_ids": True,
                                                        "messages": [{"role": "user", "content": "Say hi."}]}).json()
            rendered = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
            assert chat["prompt_token_ids"] == smollm2.tokenizer.encode(rendered)
            ids = chat["choices"][0]["token_ids"]
            assert chat["choices"][0]["message"]["content"] == smollm2.tokenizer.decode(ids, skip_special_tokens=True)
            assert chat["choices"][0]["finish_reason"] in ("stop", "length") and chat["usage"]["completion_tokens"] == len(ids)
            if chat["choices"][0]["finish_reason"] == "stop":
                assert ids[-1] == smollm2.tokenizer.eos_token_id  # <|im_end|> ends the assistant's turn
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------------ jserve serve


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port must be in [0, 65535]"),
    (["serve", "--model", "/no/such/model"], "'/no/such/model'"),
    (["serve", "--model", "tiny-llama", "--max-batch-size", "0"], "--max-batch-size"),
    (["serve", "--model", "tiny-llama", "--decode-buckets", "4,x"], "--decode-buckets"),
])
def test_serve_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_serve_refuses_a_busy_port_before_loading(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--model", "/no/such/model", "--port", str(port)])  # the port is checked first
    assert exc.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_jserve_serve_starts_prints_its_url_and_stops_on_sigint():
    cmd = [sys.executable, "-m", "jserve.cli", "serve", "--model", "tiny-llama", "--port", "0", "--log-level",
           "warning", "--max-batch-size", "2", "--max-tokens-per-batch", "32", "--max-model-len", "64",
           "--decode-buckets", "2", "--token-buckets", "32", "--num-device-blocks", "10", "--num-host-blocks", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        line = proc.stdout.readline()  # blocks until the server is ready (or the process died)
        assert " ready at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" ready at ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
            r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
                                                "ignore_eos": True, "return_token_ids": True}).json()
            assert len(r["choices"][0]["token_ids"]) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_min_tokens_holds_back_a_stop_id(tiny, python_api):
    """vLLM's ``min_tokens``: a stop id the greedy answer reaches early cannot end it before ``min_tokens`` new
    tokens; the ids are the Python API's with the same parameters."""
    _, url, prompts, reference = tiny
    from jserve.engine import SamplingParams

    stop_id = reference[3][2]
    first = reference[3].index(stop_id)  # where the plain answer stops on it
    body = {"prompt": prompts[3], "max_tokens": NEW, "temperature": 0, "stop_token_ids": [stop_id],
            "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        plain = _post(c, body)["choices"][0]
        held = _post(c, body | {"min_tokens": first + 3})["choices"][0]
        bad = c.post("/v1/completions", json=body | {"min_tokens": NEW + 1})
    want = python_api.generate([prompts[3]], SamplingParams(max_tokens=NEW, stop_token_ids=[stop_id],
                                                            min_tokens=first + 3))[0]
    assert plain["token_ids"] == reference[3][: first + 1] and plain["finish_reason"] == "stop"
    assert held["token_ids"] == want.token_ids
    assert stop_id not in held["token_ids"][: first + 3] and len(held["token_ids"]) > first + 3
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"


def test_min_tokens_ignores_stop_strings_completed_before_it(tiny, python_api):
    """vLLM's ``min_tokens`` with stop strings: a stop string counts only when it ends in the text of the
    ``min_tokens``-th token or a later one (an occurrence completed before is kept in the text, not cut
    later), and the ``min_tokens``-th token itself may end the request. Prompt 3's greedy answer is hand-read:
    ``e`` is token 5 and 14 (0-based), ``f`` only token 7. A stream's chunks concatenate to the same text (the
    engine used to cut the text at an early occurrence that the stream had already sent)."""
    _, url, prompts, reference = tiny
    from jserve.engine import SamplingParams

    ids = reference[3]
    assert [i for i, t in enumerate(ids) if t == ord("e")] == [5, 14] and ids.count(ord("f")) == 1
    cases = [  # (stop, min_tokens, tokens returned, text, finish_reason)
        ("e", 0, 6, as_text(ids[:5]), "stop"),
        ("e", 6, 6, as_text(ids[:5]), "stop"),  # the 6th token completes it: it counts
        ("e", 7, 15, as_text(ids[:14]), "stop"),  # completed by the 6th token, before min_tokens: kept
        ("f", 9, NEW, as_text(ids), "length"),
    ]
    outs = python_api.generate([prompts[3]] * len(cases), [
        SamplingParams(max_tokens=NEW, ignore_eos=True, stop=[s], min_tokens=m) for s, m, _, _, _ in cases])
    for (s, m, n, text, finish), out in zip(cases, outs):
        assert (out.token_ids, out.text, out.finish_reason) == (ids[:n], text, finish), (s, m)
    body = {"prompt": prompts[3], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stop": "e",
            "min_tokens": 7}
    with httpx.Client(base_url=url, timeout=60) as c:
        whole = _post(c, body)["choices"][0]
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            streamed = "".join(e["choices"][0]["text"] for e in events(r) if e != "[DONE]")
    assert whole["text"] == streamed == as_text(ids[:14])


def test_logit_bias_on_both_endpoints(tiny, python_api):
    """OpenAI's ``logit_bias`` (keys: token ids as strings): +100 on "B" (id 66) makes a greedy chat answer
    "BBB"; a seeded sampled completion with a bias equals the Python API's with the same ``SamplingParams``."""
    _, url, prompts, reference = tiny
    from jserve.engine import SamplingParams

    bias = {str(reference[0][0]): -100, "65": 4.5, "97": 3.0}
    body = {"prompt": prompts[0], "max_tokens": 8, "temperature": 0.7, "seed": 5, "ignore_eos": True,
            "logit_bias": bias, "return_token_ids": True}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logit_bias": {"66": 100}}
    with httpx.Client(base_url=url, timeout=60) as c:
        got = _post(c, body)["choices"][0]["token_ids"]
        plain = _post(c, body | {"logit_bias": None})["choices"][0]["token_ids"]
        answer = _post(c, chat, "/v1/chat/completions")["choices"][0]["message"]["content"]
    want = python_api.generate([prompts[0]], SamplingParams(
        max_tokens=8, temperature=0.7, seed=5, ignore_eos=True, logit_bias={int(k): v for k, v in bias.items()}))[0]
    assert got == want.token_ids and got != plain and reference[0][0] not in got
    assert answer == "BBB"


def test_stop_id_and_eos_finishes_carry_their_text_with_async_scheduling(tiny):
    """With async scheduling an output finished by a stop id or the end-of-sequence id had ``text == ""``
    when ``step`` returned it (the text was filled one iteration later, or never when the next plan left the
    request out), so the server answered such requests with empty text. The text is now final with the
    output: at once from ``step``, and in every server answer (concurrent requests, and a stream's chunks). The
    stop id stays in the ids and out of the text (vLLM's rule)."""
    from jserve.engine import SamplingParams

    llm0, _, prompts, reference = tiny
    llm = LLM(llm0.model, async_scheduling=True, **TINY)  # the served shapes: nothing new to compile
    eng = llm.engine
    stops = [ref[25 + i] for i, ref in enumerate(reference)]
    expected = [ref[: ref.index(s) + 1] for ref, s in zip(reference, stops)]
    outs = [eng.add_request(p, SamplingParams(max_tokens=NEW, stop_token_ids=[s]))
            for p, s in zip(prompts, stops)]
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                assert out.text == as_text(out.token_ids[:-1]), out.request_id
    assert [o.token_ids for o in outs] == expected and all(o.finish_reason == "stop" for o in outs)
    engine = AsyncLLMEngine(eng)
    try:
        with serve_in_thread(build_app(engine, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as c:
            async def ask(client, i):
                body = {"prompt": prompts[i], "max_tokens": NEW, "temperature": 0, "stop_token_ids": [stops[i]]}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]

            async def all_at_once():
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    return await asyncio.gather(*(ask(client, i) for i in range(len(prompts))))

            for i, choice in enumerate(asyncio.run(all_at_once())):
                assert (choice["text"], choice["finish_reason"]) == (as_text(expected[i][:-1]), "stop"), i
            body = {"prompt": prompts[0], "max_tokens": NEW, "temperature": 0, "stop_token_ids": [stops[0]],
                    "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                chunks = [e for e in events(r) if e != "[DONE]"]
            assert "".join(e["choices"][0]["text"] for e in chunks) == as_text(expected[0][:-1])
    finally:
        engine.shutdown()
    assert all_pages_free(llm)


@pytest.fixture(scope="module")
def bare_url():
    """The tiny Llama served without a tokenizer (as ``jserve serve --model tiny-llama``): token ids only."""
    model = load("tiny-llama")
    assert model.tokenizer is None
    engine = AsyncLLMEngine(LLM(model, **TINY).engine)
    with serve_in_thread(build_app(engine, "tiny-llama")) as u:
        yield u
    engine.shutdown()


def test_a_model_without_a_tokenizer_streams_one_chunk_per_token(tiny, bare_url):
    """Without a tokenizer tokens have no text, and the stream sent a single empty chunk at the end (unless
    ``return_token_ids``); it now sends one chunk per token as docs/server.md says: empty text, and the
    token's logprobs (named ``token_id:<id>``) or ids when asked. The ids are the greedy reference's (the same
    dummy weights as the ``tiny`` fixture's model)."""
    _, _, prompts, reference = tiny
    n = 6
    want = reference[0][:n]
    body = {"prompt": prompts[0], "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=bare_url, timeout=60) as c:
        whole = _post(c, body | {"stream": False, "return_token_ids": True})["choices"][0]
        assert whole["text"] == "" and whole["token_ids"] == want
        for extra in ({}, {"logprobs": 1}, {"return_token_ids": True}):
            with c.stream("POST", "/v1/completions", json=body | extra) as r:
                assert r.status_code == 200
                evs = events(r)
            assert evs[-1] == "[DONE]"
            choices = [e["choices"][0] for e in evs[:-1]]
            assert len(choices) == n, (extra, choices)
            assert all(ch["text"] == "" and ch["index"] == 0 for ch in choices)
            assert [ch["finish_reason"] for ch in choices] == [None] * (n - 1) + ["length"]
            if "logprobs" in extra:
                assert [ch["logprobs"]["tokens"] for ch in choices] == [[f"token_id:{t}"] for t in want]
            else:
                assert all(ch["logprobs"] is None for ch in choices)
            if "return_token_ids" in extra:
                assert [ch["token_ids"] for ch in choices] == [[t] for t in want]


def test_stop_strings_on_a_model_without_a_tokenizer_are_a_400_naming_stop(bare_url):
    """The engine refuses stop strings without a tokenizer; the server passed that on as a 400 naming
    ``prompt``. The preparer now refuses them first, naming ``stop``; stop ids still work."""
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    with httpx.Client(base_url=bare_url, timeout=60) as c:
        for stop in (["x"], "x", ["x", "y"]):
            for stream in (False, True):
                r = c.post("/v1/completions", json=body | {"stop": stop, "stream": stream})
                err = r.json()["error"]
                assert r.status_code == 400 and err["param"] == "stop" and "'stop' needs a tokenizer" in \
                    err["message"], (stop, stream, err)
        assert len(_post(c, body | {"stop": [], "return_token_ids": True})["choices"][0]["token_ids"]) == 3
        ok = _post(c, body | {"stop_token_ids": [7], "return_token_ids": True})["choices"][0]
        assert ok["finish_reason"] in ("length", "stop") and ok["text"] == ""
