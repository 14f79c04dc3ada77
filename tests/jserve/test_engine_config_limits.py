"""``EngineConfig``'s step limits and shape buckets: a limit left unset follows its explicit buckets
(``max_batch_size`` the largest decode bucket, ``max_tokens_per_batch`` the largest token bucket), an explicit
pair that disagrees is refused naming both fields, and all of it before the model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jserve.engine import LLM, EngineConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_defaults_without_buckets():
    c = EngineConfig()
    assert (c.max_batch_size, c.max_tokens_per_batch) == (32, 2048)
    c = EngineConfig(max_batch_size=4, max_tokens_per_batch=64)
    assert (c.max_batch_size, c.max_tokens_per_batch) == (4, 64)


def test_limits_left_unset_follow_the_explicit_buckets():
    # both raised "token_buckets (256,) do not cover max_tokens_per_batch=2048" after the model had loaded
    c = EngineConfig(decode_buckets=(8,), token_buckets=(256,))
    assert (c.max_batch_size, c.max_tokens_per_batch) == (8, 256)
    c = EngineConfig(decode_buckets=(4, 1, 2), token_buckets=[128, 64])
    assert (c.max_batch_size, c.max_tokens_per_batch) == (4, 128)
    assert c.decode_buckets == (4, 1, 2) and c.token_buckets == (128, 64)
    # one side given: the other keeps its default
    assert EngineConfig(token_buckets=(128,)).max_batch_size == 32
    assert EngineConfig(decode_buckets=(8,)).max_tokens_per_batch == 2048
    # an explicit limit the buckets fit stays as given
    c = EngineConfig(max_batch_size=8, max_tokens_per_batch=100, decode_buckets=(8,), token_buckets=(64, 128))
    assert (c.max_batch_size, c.max_tokens_per_batch) == (8, 100)


@pytest.mark.parametrize("options, message", [
    (dict(max_tokens_per_batch=2048, token_buckets=(128,)),
     "token_buckets (128,) do not cover max_tokens_per_batch=2048"),
    (dict(max_batch_size=8, decode_buckets=(2, 4)), "decode_buckets (2, 4) do not cover max_batch_size=8"),
    # a decode bucket above the batch: was a JAX broadcasting error while compiling, after the model load
    (dict(max_batch_size=4, decode_buckets=(1, 8)), "decode_buckets (1, 8) go above max_batch_size=4"),
    # a budget that follows the token buckets must still hold a full batch of decodes
    (dict(token_buckets=(16,)), "max_tokens_per_batch (16, the largest of token_buckets) must be >= max_batch_size (32)"),
    (dict(max_batch_size=8, max_tokens_per_batch=4), "max_tokens_per_batch (4) must be >= max_batch_size (8)"),
    (dict(max_batch_size=0), "EngineConfig.max_batch_size must be an int >= 1, got 0"),
    (dict(max_tokens_per_batch=True), "EngineConfig.max_tokens_per_batch must be an int >= 1, got True"),
])
def test_limits_and_buckets_that_disagree_are_refused_naming_both(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**options)


def test_config_errors_come_before_the_model_loads(monkeypatch):
    import jserve.engine.llm as llm_module

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(llm_module, "_load_model", no_load)
    with pytest.raises(ValueError, match=re.escape("decode_buckets (1, 8) go above max_batch_size=4")):
        LLM("llama-3-8b", max_batch_size=4, decode_buckets=(1, 8), token_buckets=(64,), max_tokens_per_batch=64)
    with pytest.raises(ValueError, match=re.escape("token_buckets (128,) do not cover max_tokens_per_batch=2048")):
        LLM("llama-3-8b", max_tokens_per_batch=2048, token_buckets=(128,))


def _keyword_args(text: str) -> dict:
    return eval(f"dict({text})", {})  # the docs' own literal keyword arguments


def test_the_docs_bucket_examples_are_valid_configs():
    """docs/server.md's ``LLM(...)`` snippet and docs/engine.md's advice to narrow the buckets raised before
    (the token budget stayed at 2048 above the one token bucket)."""
    server = (DOCS / "server.md").read_text()
    snippet = re.search(r"^llm = LLM\((.*)\)$", server, re.M).group(1)
    c = EngineConfig(**_keyword_args(snippet))
    assert (c.max_batch_size, c.max_tokens_per_batch, c.max_model_len) == (8, 128, 512)
    engine = " ".join((DOCS / "engine.md").read_text().split())
    advice = re.search(r"narrow the buckets \(`(decode_buckets=[^`]*)`, `(token_buckets=[^`]*)`", engine)
    c = EngineConfig(**_keyword_args(", ".join(advice.groups())))
    assert (c.max_batch_size, c.max_tokens_per_batch) == (8, 256)
