"""The paged step builder against hand-computed metadata, and dummy-weight models: deterministic init on
the device, one compile per shape bucket, batched generation equal to one-by-one generation."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from jserve.models import PageAllocator, SeqChunk, build_step, from_config, get_preset, greedy_generate, load


def test_build_step_hand_computed():
    # seq A: 3 cached tokens + 2 new on pages [5, 2] (page size 4); seq B: 1 new token (decode) on page [7].
    s = build_step([SeqChunk([10, 11], 3, [5, 2]), SeqChunk([12], 0, [7])], 4, num_tokens=4, num_seqs=3,
                   pages_per_seq=3)
    md = s.metadata
    assert s.input_ids.tolist() == [10, 11, 12, 0]
    assert s.positions.tolist() == [3, 4, 0, 0]
    assert md.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 7 * 4 + 0, -1]
    assert md.block_tables.tolist() == [[5, 2, 0], [7, 0, 0], [0, 0, 0]]
    assert md.seq_lens.tolist() == [5, 1, 0]
    assert md.query_start_loc.tolist() == [0, 2, 3, 3]
    assert md.logits_indices.tolist() == [1, 2, 0]
    assert md.decode_only is False
    d = build_step([SeqChunk([1], 4, [0, 1]), SeqChunk([2], 0, [3])], 4)
    assert d.metadata.decode_only is True


def test_build_step_rejects_bad_input():
    with pytest.raises(ValueError, match="pages cannot hold"):
        build_step([SeqChunk([1, 2], 3, [0])], 4)
    with pytest.raises(ValueError, match="bucket too small"):
        build_step([SeqChunk([1, 2], 0, [0])], 4, num_tokens=1)
    with pytest.raises(MemoryError, match="out of pages"):
        PageAllocator(2).allocate(3)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])
def test_dummy_weights_are_made_on_device_and_deterministic(preset):
    a = load(preset, dtype="bfloat16")
    b = from_config(get_preset(preset, "bfloat16"), seed=0)
    la, lb = jax.tree.leaves(a.state), jax.tree.leaves(b.state)
    assert all(x.dtype == jax.numpy.bfloat16 for x in la)
    assert all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)) for x, y in zip(la, lb))
    assert a.num_params == get_preset(preset).param_count() and a.tokenizer is None
    flat = {".".join(map(str, p)): np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(a.state)}
    norms = [v for k, v in flat.items() if k.endswith("norm.weight")]
    biases = [v for k, v in flat.items() if k.endswith(".bias") and "norm" not in k]
    mats = [v for k, v in flat.items() if k.endswith(".kernel") or k.endswith(".embedding")]
    assert len(norms) >= 2 * get_preset(preset).num_layers and all(np.all(n == 1.0) for n in norms)
    assert all(np.all(b == 0.0) for b in biases)
    assert all(0.015 < v.std() < 0.025 for v in mats)


def test_one_compile_per_shape_and_batched_generation_matches_single():
    m = load("tiny-llama")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    singles = [greedy_generate(m, p, 8) for p in prompts]
    traces_single = m.trace_count
    assert greedy_generate(m, prompts, 8) == singles
    # single prompts: one prefill bucket (16 tokens) + one decode shape; the batch adds prefill and decode
    assert traces_single == 2 and m.trace_count == 4
    greedy_generate(m, prompts, 8)
    assert m.trace_count == 4  # no retrace for repeated shapes


def test_step_rejects_mismatched_caches_and_inputs():
    m = load("tiny-llama")
    s = build_step([SeqChunk([1, 2], 0, [0])], 4)
    with pytest.raises(ValueError, match="kv_caches has 1 layers, the model has 2"):
        m.step(s.input_ids, s.positions, m.allocate_kv_caches(2, 4)[:1], s.metadata)
    bad = [(jax.numpy.zeros((3, 2, 4, 16)),) * 2] * 2
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        m.step(s.input_ids, s.positions, bad, s.metadata)
    with pytest.raises(ValueError, match="must all be"):
        m.step(s.input_ids[:1], s.positions, m.allocate_kv_caches(2, 4), s.metadata)


def test_rope_sines_and_cosines_are_evaluated_once_per_step():
    # layers.rope_tables materializes one step's tables; were they fused into each layer's rotation, every
    # layer's q and k fusions would evaluate their own sin and cos (4 of each in this 2-layer model)
    m = load("tiny-llama")
    s = build_step([SeqChunk([1, 2, 3], 0, [0]), SeqChunk([4], 5, [1, 2])], 4)
    caches = m.allocate_kv_caches(4, 4)
    hlo = m._step.lower(m.state, s.input_ids, s.positions, caches, s.metadata).compile().as_text()
    assert len(re.findall(r"\bsine\(", hlo)) == 1
    assert len(re.findall(r"\bcosine\(", hlo)) == 1
