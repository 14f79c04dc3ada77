"""The GGUF path end to end on a tiny model: a transformers Llama checkpoint is written as a GGUF file the
way llama.cpp's converter does (llama.cpp tensor names, Q/K rows permuted for interleaved RoPE, F32 data),
then loaded by jserve; logits must match transformers' to float32 precision."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jserve.models import ConfigError, ModelConfig, RopeScaling, SeqChunk, build_step, load
from jserve.weights.gguf_file import unpermute_rope_rows

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of Q/K weight rows (written independently here)."""
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        block = w[h * head_dim : (h + 1) * head_dim]
        half = head_dim // 2
        inter = np.empty_like(block)
        inter[0::2] = block[:half]  # rotate-half pair (i, i+half) -> adjacent rows (2i, 2i+1)
        inter[1::2] = block[half:]
        out[h * head_dim : (h + 1) * head_dim] = inter
    return out


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def _write_gguf(ckpt, path, tied: bool, extra=lambda w: None) -> None:
    """``extra(writer)`` adds metadata fields."""
    cfg = ckpt.model.config
    sd = {k: v.float().numpy() for k, v in ckpt.model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    extra(w)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["llama", "llama-tied"])
def test_gguf_model_matches_transformers(hf_checkpoints, tmp_path, kind):
    ckpt = hf_checkpoints(kind)
    tied = kind == "llama-tied"
    path = tmp_path / "tiny.gguf"
    _write_gguf(ckpt, path, tied=tied)
    model = load(path, cache=False)
    assert model.tokenizer is None and model.config.tie_word_embeddings == tied
    prompt = [5, 17, 99, 3, 64, 21, 8, 120, 33]
    caches = model.allocate_kv_caches(4, 4)
    s = build_step([SeqChunk(prompt, 0, [2, 0, 3])], 4)
    logits, _ = model.step(s.input_ids, s.positions, caches, s.metadata)
    ref = ckpt.logits(prompt)[-1]
    assert np.max(np.abs(np.asarray(logits)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_gguf_weights_cache_hit_miss_and_partial_entry(hf_checkpoints, tmp_path):
    ckpt = hf_checkpoints("llama")
    path = tmp_path / "tiny.gguf"
    _write_gguf(ckpt, path, tied=False)
    cache = tmp_path / "cache"
    first = load(path, cache=cache)
    second = load(path, cache=cache)
    assert (first.load_info["cache"], second.load_info["cache"]) == ("miss", "hit")
    import jax

    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(second.state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    entries = list(cache.iterdir())
    assert len(entries) == 1
    (entries[0] / "params.json").unlink()  # an interrupted write leaves no index: never read
    assert load(path, cache=cache).load_info["cache"] == "miss"
    assert load(path, cache=cache, dtype="bfloat16").load_info["cache"] == "miss"  # dtype is part of the key
    assert len(list(cache.iterdir())) == 2


META = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.vocab_size": 128, "llama.context_length": 256}


@pytest.mark.parametrize("fields, scaling", [
    ({}, None),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, RopeScaling("linear", factor=4.0)),
    ({"llama.rope.scaling.factor": 2.0}, RopeScaling("linear", factor=2.0)),  # llama.cpp's default type: linear
    ({"llama.rope.scale_linear": 2.0}, RopeScaling("linear", factor=2.0)),  # the older key
    ({"llama.rope.scaling.factor": 1.0}, None),
])
def test_gguf_rope_scaling_is_read_as_llama_cpp_does(fields, scaling):
    assert ModelConfig.from_gguf_metadata(META | fields).rope_scaling == scaling


@pytest.mark.parametrize("fields, message", [
    # each was ignored: the model loaded with unscaled / fully rotary positions and gave wrong logits
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
     "unsupported GGUF llama.rope.scaling.type 'yarn' (supported: none, linear)"),
    ({"llama.rope.scaling.type": "longrope"}, "unsupported GGUF llama.rope.scaling.type 'longrope'"),
    ({"llama.rope.dimension_count": 8},
     "GGUF field 'llama.rope.dimension_count' is 8, not the head dimension 16: partial rotary embeddings"),
    # was KeyError: 'llama.rope.scaling.factor'
    ({"llama.rope.scaling.type": "linear"},
     "GGUF field 'llama.rope.scaling.type' is 'linear' but 'llama.rope.scaling.factor' is missing"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -2.0},
     "field 'llama.rope.scaling.factor' must be a finite number > 0, got -2.0"),
    ({"llama.attention.head_count_kv": 3}, "num_heads (4) must be a multiple of num_kv_heads (3)"),  # no file named
])
def test_unsupported_or_malformed_gguf_metadata_is_refused_naming_the_file_and_field(fields, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"m.gguf: {message}")):
        ModelConfig.from_gguf_metadata(META | fields, source="m.gguf")


def test_gguf_rope_dimension_count_equal_to_the_head_dimension_is_fine():
    assert ModelConfig.from_gguf_metadata(META | {"llama.rope.dimension_count": 16}).head_dim == 16


def test_a_gguf_sliding_window_caps_the_context_as_for_hugging_face(hf_checkpoints, tmp_path):
    """llama.attention.sliding_window was ignored (256-token contexts, wrong past the window). Within the
    window full attention is exact: the logits still match transformers' (full attention) there."""
    assert ModelConfig.from_gguf_metadata(META | {"llama.attention.sliding_window": 0}).sliding_window is None
    ckpt = hf_checkpoints("llama")
    path = tmp_path / "sw.gguf"
    _write_gguf(ckpt, path, tied=False, extra=lambda w: w.add_uint32("llama.attention.sliding_window", 8))
    model = load(path, cache=False)
    assert (model.config.sliding_window, model.config.max_position_embeddings) == (8, 8)
    prompt = [5, 17, 99, 3, 64, 21, 8, 120]
    s = build_step([SeqChunk(prompt, 0, [1, 0])], 4)
    logits, _ = model.step(s.input_ids, s.positions, model.allocate_kv_caches(3, 4), s.metadata)
    ref = ckpt.logits(prompt)[-1]
    assert np.max(np.abs(np.asarray(logits)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_load_refuses_a_yarn_gguf_naming_the_file(hf_checkpoints, tmp_path):
    path = tmp_path / "yarn.gguf"
    _write_gguf(hf_checkpoints("llama"), path, tied=False, extra=lambda w: (
        w.add_string("llama.rope.scaling.type", "yarn"), w.add_float32("llama.rope.scaling.factor", 4.0)))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unsupported GGUF llama.rope.scaling.type 'yarn'")):
        load(path, cache=False)


def _spm(w) -> None:  # a SentencePiece (llama.cpp "llama") vocabulary: jserve rebuilds BPE only
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(128)])
    w.add_token_scores([0.0] * 128)
    w.add_token_types([1] * 128)


def _unknown_pre(w) -> None:  # a BPE vocabulary with a pre-tokenizer jserve does not know
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("no-such-pre-tokenizer")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, 128)])
    w.add_token_merges(["a b"])
    w.add_token_types([1] * 128)


@pytest.mark.parametrize("tokenizer", [_spm, _unknown_pre], ids=["sentencepiece", "unknown pre-tokenizer"])
def test_a_gguf_whose_tokenizer_cannot_be_rebuilt_loads_without_one(hf_checkpoints, tmp_path, tokenizer):
    """Was a TokenizerError: the model could not be loaded at all, though its weights are fine."""
    ckpt = hf_checkpoints("llama")
    path = tmp_path / "tok.gguf"
    _write_gguf(ckpt, path, tied=False, extra=tokenizer)
    with pytest.warns(UserWarning, match=r"tok\.gguf: loading the model without a tokenizer \(unsupported GGUF"):
        model = load(path, cache=False)
    assert model.tokenizer is None
    prompt = [5, 17, 99, 3, 64, 21, 8, 120, 33]
    s = build_step([SeqChunk(prompt, 0, [2, 0, 3])], 4)
    logits, _ = model.step(s.input_ids, s.positions, model.allocate_kv_caches(4, 4), s.metadata)
    ref = ckpt.logits(prompt)[-1]
    assert np.max(np.abs(np.asarray(logits)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_a_gguf_loaded_without_a_tokenizer_serves_token_ids_and_refuses_text(hf_checkpoints, tmp_path):
    from jserve.engine import LLM, SamplingParams

    path = tmp_path / "spm.gguf"
    _write_gguf(hf_checkpoints("llama"), path, tied=False, extra=_spm)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        model = load(path, cache=False)
    llm = LLM(model, scheduler="fcfs", max_batch_size=1, max_tokens_per_batch=16, max_model_len=32,
              decode_buckets=(1,), token_buckets=(16,), num_device_blocks=4, num_host_blocks=0, progress=False)
    out = llm.generate([[5, 17, 99, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and not out.error
    text = llm.generate(["hello"], SamplingParams(max_tokens=3))[0]
    assert text.error == "this model has no tokenizer; pass the prompt as a list of token ids"
