"""Declared name maps: which checkpoint tensor fills each model parameter, and how it is transformed.

Each architecture and checkpoint format (Hugging Face safetensors, GGUF) gets one function that lists a
:class:`TensorSpec` per parameter of the jserve model (paths like ``layers.3.self_attn.q_proj.w``).
The loader checks the list both ways: every parameter has a tensor in the checkpoint, and every tensor in the
checkpoint is used or explicitly ignorable (``ignorable``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # jserve.models imports this package; keep the runtime dependency one way
    from jserve.models.config import ModelConfig

__all__ = ["TensorSpec", "hf_name_map", "gguf_name_map", "hf_ignorable", "gguf_ignorable", "normalize_hf_name"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    param: str  # jserve parameter path, "layers.0.self_attn.q_proj.w"
    source: str  # checkpoint tensor name
    transpose: bool = False  # swap the two axes of a 2-D tensor (no jserve parameter needs it today)
    unpermute_heads: int = 0  # GGUF: undo llama.cpp's RoPE row permutation with this many heads


def _linear(specs: list[TensorSpec], ours: str, theirs: str, bias: bool, heads: int = 0) -> None:
    # jserve's Linear.w is [out, in], the layout of torch's Linear.weight and of GGUF matrices: no transpose.
    specs.append(TensorSpec(f"{ours}.w", f"{theirs}.weight", unpermute_heads=heads))
    if bias:
        specs.append(TensorSpec(f"{ours}.bias", f"{theirs}.bias", unpermute_heads=heads))


def hf_name_map(cfg: ModelConfig) -> list[TensorSpec]:
    """Hugging Face transformers tensor names for ``cfg``'s architecture."""
    s: list[TensorSpec] = []
    if cfg.architecture == "llama":
        s.append(TensorSpec("embed_tokens.embedding", "model.embed_tokens.weight"))
        for i in range(cfg.num_layers):
            o, t = f"layers.{i}", f"model.layers.{i}"
            for p in ("q_proj", "k_proj", "v_proj"):
                _linear(s, f"{o}.self_attn.{p}", f"{t}.self_attn.{p}", cfg.qkv_bias)
            _linear(s, f"{o}.self_attn.o_proj", f"{t}.self_attn.o_proj", cfg.o_bias)
            for p in ("gate_proj", "up_proj", "down_proj"):
                _linear(s, f"{o}.mlp.{p}", f"{t}.mlp.{p}", cfg.mlp_bias)
            s.append(TensorSpec(f"{o}.input_layernorm.weight", f"{t}.input_layernorm.weight"))
            s.append(TensorSpec(f"{o}.post_attention_layernorm.weight", f"{t}.post_attention_layernorm.weight"))
        s.append(TensorSpec("norm.weight", "model.norm.weight"))
        if not cfg.tie_word_embeddings:
            _linear(s, "lm_head", "lm_head", False)
        return s
    if cfg.architecture == "opt":
        d = "model.decoder"
        e = cfg.word_embed_proj_dim or cfg.hidden_size
        s.append(TensorSpec("embed_tokens.embedding", f"{d}.embed_tokens.weight"))
        s.append(TensorSpec("embed_positions.embedding", f"{d}.embed_positions.weight"))
        if e != cfg.hidden_size:
            _linear(s, "project_in", f"{d}.project_in", False)
            _linear(s, "project_out", f"{d}.project_out", False)
        for i in range(cfg.num_layers):
            o, t = f"layers.{i}", f"{d}.layers.{i}"
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _linear(s, f"{o}.self_attn.{p}", f"{t}.self_attn.{p}", cfg.enable_bias)
            _linear(s, f"{o}.fc1", f"{t}.fc1", cfg.enable_bias)
            _linear(s, f"{o}.fc2", f"{t}.fc2", cfg.enable_bias)
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                s.append(TensorSpec(f"{o}.{ln}.weight", f"{t}.{ln}.weight"))
                s.append(TensorSpec(f"{o}.{ln}.bias", f"{t}.{ln}.bias"))
        if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm:
            s.append(TensorSpec("final_layer_norm.weight", f"{d}.final_layer_norm.weight"))
            s.append(TensorSpec("final_layer_norm.bias", f"{d}.final_layer_norm.bias"))
        if not cfg.tie_word_embeddings:  # [vocab, word_embed_proj_dim], after project_out
            _linear(s, "lm_head", "lm_head", False)
        return s
    raise ValueError(f"no Hugging Face name map for architecture {cfg.architecture!r}")


def normalize_hf_name(cfg: ModelConfig, name: str) -> str:
    """Older OPT checkpoints (saved from ``OPTModel``) omit the ``model.`` prefix."""
    if cfg.architecture == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


_HF_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


def hf_ignorable(cfg: ModelConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that jserve does not need (tied heads, cached RoPE tables)."""
    if _HF_IGNORABLE.match(name):
        return True
    return name == "lm_head.weight" and cfg.tie_word_embeddings


def gguf_name_map(cfg: ModelConfig) -> list[TensorSpec]:
    """llama.cpp GGUF tensor names for a Llama-family ``cfg`` (Q/K rows un-permuted)."""
    if cfg.architecture != "llama":
        raise ValueError(f"no GGUF name map for architecture {cfg.architecture!r}")
    s = [TensorSpec("embed_tokens.embedding", "token_embd.weight")]
    for i in range(cfg.num_layers):
        o, b = f"layers.{i}", f"blk.{i}"
        _linear(s, f"{o}.self_attn.q_proj", f"{b}.attn_q", cfg.qkv_bias, heads=cfg.num_heads)
        _linear(s, f"{o}.self_attn.k_proj", f"{b}.attn_k", cfg.qkv_bias, heads=cfg.num_kv_heads)
        _linear(s, f"{o}.self_attn.v_proj", f"{b}.attn_v", cfg.qkv_bias)
        _linear(s, f"{o}.self_attn.o_proj", f"{b}.attn_output", cfg.o_bias)
        _linear(s, f"{o}.mlp.gate_proj", f"{b}.ffn_gate", cfg.mlp_bias)
        _linear(s, f"{o}.mlp.up_proj", f"{b}.ffn_up", cfg.mlp_bias)
        _linear(s, f"{o}.mlp.down_proj", f"{b}.ffn_down", cfg.mlp_bias)
        s.append(TensorSpec(f"{o}.input_layernorm.weight", f"{b}.attn_norm.weight"))
        s.append(TensorSpec(f"{o}.post_attention_layernorm.weight", f"{b}.ffn_norm.weight"))
    s.append(TensorSpec("norm.weight", "output_norm.weight"))
    if not cfg.tie_word_embeddings:
        _linear(s, "lm_head", "output", False)
    return s


def gguf_ignorable(cfg: ModelConfig, name: str) -> bool:
    return False
