"""config.json and GGUF metadata errors name the file and the field; values of the wrong type are refused, not
coerced (``int(64.9)`` used to give a hidden size of 64, ``bool("false")`` tied embeddings)."""

from __future__ import annotations

import json
import re

import pytest

from jserve.models import ConfigError, ModelConfig

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
            eos_token_id=2)


def _from_dir(tmp_path, **changes) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(BASE | changes))
    return ModelConfig.from_hf_dir(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(vocab_size="abc"), "field 'vocab_size' must be an integer, got 'abc'"),  # named no field
    (dict(vocab_size=[128]), "field 'vocab_size' must be an integer, got [128]"),
    (dict(hidden_size=64.9), "field 'hidden_size' must be an integer, got 64.9"),  # was truncated to 64
    (dict(num_hidden_layers=True), "field 'num_hidden_layers' must be an integer, got True"),  # was 1 layer
    (dict(num_attention_heads=0), "field 'num_attention_heads' must be >= 1, got 0"),  # named no file
    (dict(num_key_value_heads=0), "field 'num_key_value_heads' must be >= 1, got 0"),  # was taken as absent
    (dict(intermediate_size="96"), "field 'intermediate_size' must be an integer, got '96'"),
    (dict(max_position_embeddings=1), "field 'max_position_embeddings' must be >= 2, got 1"),
    (dict(eos_token_id=-1), "field 'eos_token_id' must be a token id >= 0 or a list of them, got -1"),  # accepted
    (dict(eos_token_id=[2, -1]), "field 'eos_token_id' must be a token id >= 0 or a list of them, got [2, -1]"),
    (dict(bos_token_id="1"), "field 'bos_token_id' must be a token id >= 0 or a list of them, got '1'"),
    (dict(tie_word_embeddings="false"), "field 'tie_word_embeddings' must be true or false, got 'false'"),
    (dict(rope_theta=float("inf")), "field 'rope_theta' must be a finite number > 0, got inf"),
    (dict(rope_parameters="linear"), "field 'rope_parameters' must be an object, got 'linear'"),
    (dict(num_key_value_heads=3), "num_heads (4) must be a multiple of num_kv_heads (3)"),  # named no file
    (dict(hidden_act="gelu_pytorch_tanh"), "unsupported hidden_act 'gelu_pytorch_tanh'"),
    # partial rotary embeddings: loaded as fully rotary, wrong logits
    (dict(partial_rotary_factor=0.5), "field 'partial_rotary_factor' is 0.5: partial rotary embeddings"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "field 'rope_parameters.partial_rotary_factor' is 0.5: partial rotary embeddings"),
])
def test_a_bad_config_field_is_refused_naming_the_file_and_the_field(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        _from_dir(tmp_path, **changes)


def test_opt_fields_are_checked_too(tmp_path):
    opt = dict(model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
               num_attention_heads=4, word_embed_proj_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(opt | dict(do_layer_norm_before="yes")))
    with pytest.raises(ConfigError, match="field 'do_layer_norm_before' must be true or false, got 'yes'"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(opt | dict(num_attention_heads=5)))
    with pytest.raises(ConfigError, match=r"'hidden_size' \(64\) must be a multiple of 'num_attention_heads' \(5\)"):
        ModelConfig.from_hf_dir(tmp_path)


def test_integral_floats_and_nulls_that_transformers_writes_are_accepted(tmp_path):
    cfg = _from_dir(tmp_path, hidden_size=64.0, num_key_value_heads=None, head_dim=None, eos_token_id=[2, 5],
                    bos_token_id=None, attention_bias=None)
    assert cfg.hidden_size == 64 and type(cfg.hidden_size) is int
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16  # null: the defaults transformers derives
    assert cfg.eos_token_id == 2 and cfg.extra_eos_token_ids == (5,) and cfg.bos_token_id is None
