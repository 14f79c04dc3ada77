"""OpenAI's ``usage.prompt_tokens_details.cached_tokens`` on a server whose engine caches prefixes: the tiny
Llama with the byte tokenizer of test_server.py (token id = byte value, 16-token pages), prompts whose common
prefix is counted by hand, answers checked against ``greedy_generate`` (no cache)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from test_server import TINY, byte_tokenizer, events

from jserve.engine import LLM, AsyncLLMEngine
from jserve.models import greedy_generate, load
from jserve.server import build_app, serve_in_thread

NEW = 6


@pytest.fixture(scope="module")
def served():
    model = load("tiny-llama")
    model.tokenizer = byte_tokenizer()
    engine = AsyncLLMEngine(LLM(model, enable_prefix_caching=True, **TINY).engine)
    with serve_in_thread(build_app(engine, "tiny")) as url:
        yield model, url
    engine.shutdown()


def test_usage_counts_the_cached_prompt_tokens(served):
    model, url = served
    rng = np.random.default_rng(7)
    common = list(map(int, rng.integers(3, 256, size=37)))  # two full pages in common, then 5 more tokens
    first, second, third = (common + list(map(int, rng.integers(3, 256, size=k))) for k in (4, 9, 20))
    body = {"max_tokens": NEW, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/completions", json=body | {"prompt": first}).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        r = c.post("/v1/completions", json=body | {"prompt": second}).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
        assert r["choices"][0]["token_ids"] == greedy_generate(model, second, NEW)
        # Two choices of one prompt (57 tokens, three full pages): the prompt is counted once, with the most its
        # choices took. The first takes the two common pages and computes 25 tokens; the policy sizes the
        # second's chunk by its whole 57-token prompt before any lookup, which does not fit the 39 tokens left of
        # the 64-token step, so it starts a step later and also finds the third page the first one cached.
        r = c.post("/v1/completions", json=body | {"prompt": third, "n": 2}).json()
        assert r["usage"]["prompt_tokens"] == len(third)
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
        with c.stream("POST", "/v1/completions", json=body | {"prompt": [first, second], "stream": True,
                                                               "stream_options": {"include_usage": True}}) as s:
            chunks = events(s)
        usage = chunks[-2]["usage"]
        assert usage["prompt_tokens"] == len(first) + len(second)
        assert usage["prompt_tokens_details"] == {"cached_tokens": 32 + 32}  # both prompts' pages are cached now
