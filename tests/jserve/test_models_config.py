"""ModelConfig presets and Hugging Face config parsing against published parameter counts and against
transformers' own models (built on torch's meta device, so no memory is used)."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from jserve.models import PRESETS, ConfigError, ModelConfig, get_preset
from jserve.models.model import abstract_module

# Parameter counts as published on the models' Hugging Face cards / papers.
PUBLISHED = {
    "opt-125m": 125_239_296,
    "opt-1.3b": 1_315_758_080,
    "opt-13b": 12_853_473_280,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name):
    cfg = get_preset(name)
    model_count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_module(cfg))))
    assert cfg.param_count() == model_count == PUBLISHED[name]


def test_preset_kv_bytes_per_token_match_the_design_facts():
    assert get_preset("opt-13b", "float16").kv_bytes_per_token() == 800 * 1024  # 2 x 40 x 5120 x 2 B
    assert get_preset("llama-3-8b", "bfloat16").kv_bytes_per_token() == 128 * 1024


def _hf(kind: str, **kw):
    tf = pytest.importorskip("transformers")
    return {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "opt": tf.OPTConfig}[kind](**kw)


@pytest.mark.parametrize(
    "preset,kind,kw",
    [
        ("llama-3-8b", "llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)),
        ("qwen2-0.5b", "qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                     rope_theta=1e6, tie_word_embeddings=True)),
        ("opt-1.3b", "opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                                 word_embed_proj_dim=2048)),
    ],
)
def test_from_hf_config_matches_preset_and_transformers_count(preset, kind, kw):
    torch = pytest.importorskip("torch")
    import transformers as tf

    hf_cfg = _hf(kind, **kw)
    ours = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    p = get_preset(preset)
    for f in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "tie_word_embeddings", "qkv_bias"):
        assert getattr(ours, f) == getattr(p, f), f
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(hf_cfg)
    hf_count = sum(t.numel() for t in model.parameters())  # tied weights are one parameter
    assert ours.param_count() == hf_count


def test_llama3_rope_scaling_parsed_from_both_field_styles():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    v4 = ModelConfig.from_hf_dict(base | dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **scaling)))
    v5 = ModelConfig.from_hf_dict(base | dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **scaling)))
    assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling.factor == 8.0


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="num_heads .* multiple of num_kv_heads"):
        get_preset("tiny-llama").replace(num_kv_heads=3)
    with pytest.raises(ConfigError, match="ModelConfig.hidden_size"):
        get_preset("tiny-llama").replace(hidden_size=0)
    with pytest.raises(ConfigError, match="unsupported architecture 'rwkv'"):
        get_preset("tiny-llama").replace(architecture="rwkv")
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("gpt-5")
    assert set(PUBLISHED) <= set(PRESETS)
    with pytest.raises(ConfigError, match="max_position_embeddings must be an int >= 2"):
        get_preset("tiny-llama").replace(max_position_embeddings=0)
    with pytest.raises(ConfigError, match="rope_theta must be a finite number > 0"):
        get_preset("tiny-llama").replace(rope_theta=-10000.0)


def test_every_end_of_sequence_id_is_kept(tmp_path):
    """Llama-3 Instruct's config.json lists three eos ids and its generation_config.json names them too: all
    of them end a sequence (the first stays ``eos_token_id``)."""
    import json

    base = dict(model_type="llama", vocab_size=200, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(base | dict(eos_token_id=[128, 129, 130])))
    cfg = ModelConfig.from_hf_dir(tmp_path)
    assert cfg.eos_token_id == 128 and cfg.extra_eos_token_ids == (129, 130)
    assert cfg.eos_token_ids == {128, 129, 130}
    (tmp_path / "config.json").write_text(json.dumps(base | dict(eos_token_id=128)))
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[128, 131])))
    cfg = ModelConfig.from_hf_dir(tmp_path)
    assert cfg.eos_token_id == 128 and cfg.extra_eos_token_ids == (131,)
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(eos_token_id="eot")))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id must be"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse .*generation_config.json"):
        ModelConfig.from_hf_dir(tmp_path)
    assert get_preset("tiny-llama").eos_token_ids == {2}
