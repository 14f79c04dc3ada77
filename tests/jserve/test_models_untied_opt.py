"""OPT with ``tie_word_embeddings: false``: a separate ``lm_head.weight``. ``from_hf_dict`` used to hard-code
tied embeddings for OPT, so the head was dropped as an ignorable tensor and the logits came from the input
embedding: wrong, silently. The config now reads the field, the name map loads the head and the OPT model has
a separate ``lm_head`` when the config is untied."""

from __future__ import annotations

import numpy as np
import pytest

from jserve.models import ModelConfig, SeqChunk, build_step, load
from jserve.weights.namemap import hf_name_map

OPT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
           ffn_dim=96, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def test_the_field_is_read_and_the_head_is_mapped_and_counted():
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for tied in (True, False):
        hf_cfg = tf.OPTConfig(**OPT, tie_word_embeddings=tied)
        cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
        assert cfg.tie_word_embeddings is tied
        assert any(s.source == "lm_head.weight" for s in hf_name_map(cfg)) is not tied
        with torch.device("meta"):
            hf_count = sum(p.numel() for p in tf.OPTForCausalLM(hf_cfg).parameters())
        assert cfg.param_count() == hf_count
    assert ModelConfig.from_hf_dict({k: v for k, v in tf.OPTConfig(**OPT).to_dict().items()
                                     if k != "tie_word_embeddings"}).tie_word_embeddings  # OPTConfig's default


@pytest.fixture(scope="module")
def untied_opt(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = tf.OPTConfig(**OPT, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(7)
    model = tf.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "layer_norm.weight" in name else 0.08 * torch.randn_like(p))
    assert not torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    path = tmp_path_factory.mktemp("opt") / "opt-untied"
    model.save_pretrained(path)
    return model, path


def test_an_untied_checkpoint_matches_transformers(untied_opt):
    import torch

    hf, path = untied_opt
    model = load(path)
    prompt = [5, 17, 99, 3, 64, 21, 8, 120, 33]
    s = build_step([SeqChunk(prompt, 0, [1, 0, 2])], 4)
    logits, _ = model.step(s.input_ids, s.positions, model.allocate_kv_caches(4, 4), s.metadata)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), use_cache=False).logits[0, -1].numpy()
    assert np.max(np.abs(np.asarray(logits)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))
