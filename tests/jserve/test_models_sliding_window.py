"""Sliding-window attention (Mistral, Qwen2 with ``use_sliding_window``). jserve computes full attention only,
which equals sliding-window attention for sequences no longer than the window. A Mistral with
``sliding_window=8`` used to serve 256-token contexts and gave silently wrong tokens past the eighth; now an
active window caps the model's context: the engine's default ``max_model_len`` is at most the window, and a
larger one is refused naming ``sliding_window``."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jserve.engine.config import resolve_max_model_len
from jserve.models import ModelConfig, SeqChunk, build_step, from_config, get_preset, load

tf = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def _cfg(hf_config) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf_config.to_dict())


def test_an_active_window_caps_the_context():
    mistral = _cfg(tf.MistralConfig(**COMMON, sliding_window=8))
    assert (mistral.sliding_window, mistral.max_position_embeddings) == (8, 8)
    assert _cfg(tf.MistralConfig(**COMMON, sliding_window=None)).max_position_embeddings == 256
    assert _cfg(tf.MistralConfig(**COMMON, sliding_window=1024)).max_position_embeddings == 256  # window >= context
    qwen = _cfg(tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert (qwen.sliding_window, qwen.max_position_embeddings) == (8, 8)
    # transformers applies no window to these: every layer attends fully
    for inactive in (tf.Qwen2Config(**COMMON, sliding_window=8),  # use_sliding_window defaults to false
                     tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2)):
        cfg = _cfg(inactive)
        assert (cfg.sliding_window, cfg.max_position_embeddings) == (None, 256)
    raw = dict(COMMON, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert ModelConfig.from_hf_dict(raw).sliding_window == 8  # layer 1 of 2 slides (no layer_types: 4.x)
    assert ModelConfig.from_hf_dict(raw | dict(layer_types=["full_attention"] * 2)).sliding_window is None


def test_mistral_v01_keeps_its_default_context():
    """Mistral-7B-v0.1: window 4096, max_position_embeddings 32768. The engine's default max_model_len was
    min(32768, 4096) = 4096 and stays so."""
    v01 = ModelConfig.from_hf_dict(dict(COMMON, model_type="mistral", max_position_embeddings=32768,
                                        sliding_window=4096))
    assert v01.max_position_embeddings == 4096 and resolve_max_model_len(None, v01) == 4096
    assert resolve_max_model_len(4096, v01) == 4096
    assert get_preset("mistral-7b").max_position_embeddings == 4096


def test_a_max_model_len_past_the_window_is_refused_naming_sliding_window():
    cfg = _cfg(tf.MistralConfig(**COMMON, sliding_window=8))
    assert resolve_max_model_len(None, cfg) == 8 and resolve_max_model_len(6, cfg) == 6
    with pytest.raises(ValueError, match=re.escape("max_model_len 64 exceeds the model's sliding_window 8")):
        resolve_max_model_len(64, cfg)
    with pytest.raises(ValueError, match=re.escape("max_model_len 300 exceeds the model's context 256")):
        resolve_max_model_len(300, cfg.replace(sliding_window=None, max_position_embeddings=256))


def test_the_engine_refuses_a_max_model_len_past_the_window():
    from jserve.engine import LLM

    model = from_config(_cfg(tf.MistralConfig(**COMMON, sliding_window=8)))
    with pytest.raises(ValueError, match=r"max_model_len 64 exceeds the model's sliding_window 8"):
        LLM(model, max_model_len=64, max_batch_size=1, max_tokens_per_batch=16, num_device_blocks=8,
            num_host_blocks=0, progress=False)


def test_within_the_window_full_attention_gives_transformers_sliding_window_logits(tmp_path):
    torch = pytest.importorskip("torch")
    hf_cfg = tf.MistralConfig(**COMMON, sliding_window=8)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = tf.MistralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.config.max_position_embeddings == 8
    prompt = [5, 17, 99, 3, 64, 21, 8, 120]  # the whole window: its last token attends to all 8
    s = build_step([SeqChunk(prompt, 0, [1, 0])], 4)
    logits, _ = model.step(s.input_ids, s.positions, model.allocate_kv_caches(3, 4), s.metadata)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), use_cache=False).logits[0, -1].numpy()  # transformers' sliding window
    assert np.max(np.abs(np.asarray(logits)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))
