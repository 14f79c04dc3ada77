"""The Llama family as one Flax NNX model: Llama-2 (multi-head), Llama-3 (grouped-query, llama3 RoPE
scaling), Mistral, Qwen2 (QKV bias) and SmolLM2 (tied embeddings).

One call serves one fixed-shape iteration step: packed token ids and positions of every scheduled sequence,
the per-layer paged KV cache and the ``AttentionMetadata`` describing the packing. It returns float32 logits
only at ``metadata.logits_indices`` plus the updated cache.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from kernels_pallas import AttentionMetadata

from .config import ModelConfig
from .layers import (
    CausalLM, Embedding, Linear, RMSNorm, activation, apply_rope, jnp_dtype, paged_attention, rope_inv_freq, rope_tables,
)

KVCache = tuple[jax.Array, jax.Array]  # 2 x [num_kv_heads, num_pages, page_size, head_dim]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None):
        dt = jnp_dtype(cfg.dtype)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, dtype=dt)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dt)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dt)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dt)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.backend = backend

    def __call__(
        self,
        x: jax.Array,  # [T, hidden]
        rope: tuple[jax.Array, jax.Array],  # rope_tables(positions, inv_freq), shared by every layer
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, KVCache]:
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        out, kv_cache = paged_attention(
            q, k, v, kv_cache, metadata, scale=self.head_dim**-0.5, backend=self.backend
        )
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), kv_cache


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        dt = jnp_dtype(cfg.dtype)
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, f, bias=cfg.mlp_bias, dtype=dt)
        self.up_proj = Linear(h, f, bias=cfg.mlp_bias, dtype=dt)
        self.down_proj = Linear(f, h, bias=cfg.mlp_bias, dtype=dt)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, hidden] -> [T, hidden]
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None):
        dt = jnp_dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt)
        self.self_attn = LlamaAttention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt)
        self.mlp = LlamaMLP(cfg)

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], kv_cache: KVCache, metadata: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:  # x: [T, hidden]
        attn, kv_cache = self.self_attn(self.input_layernorm(x), rope, kv_cache, metadata)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM over a paged KV cache (see the module docstring for the step contract)."""

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        dt = jnp_dtype(cfg.dtype)
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dt)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, backend) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt)
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                   dtype=dt)

    def hidden_states(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        kv_caches: list[KVCache],  # per layer, 2 x [num_kv_heads, num_pages, page_size, head_dim]
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, list[KVCache]]:  # the last layer's output [T, hidden] (before the final norm), caches
        x = self.embed_tokens(input_ids)
        rope = rope_tables(positions, np.asarray(self.inv_freq, np.float32))
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, rope, cache, metadata)
            new_caches.append(cache)
        return x, new_caches

    def logits(self, h: jax.Array) -> jax.Array:  # h: [R, hidden] from hidden_states -> [R, vocab] float32
        return self.vocab_logits(self.norm(h))
