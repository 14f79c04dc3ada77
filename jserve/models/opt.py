"""OPT as a Flax NNX model: learned positions (table offset 2), LayerNorm before each block
(``do_layer_norm_before``; after it for OPT-350m), ReLU MLP, biases everywhere, the output embedding tied to the input one unless
``tie_word_embeddings`` is false (a separate ``lm_head``), and
``project_in``/``project_out`` when ``word_embed_proj_dim`` differs from ``hidden_size``.

The call contract is the same as ``jserve.models.llama.LlamaForCausalLM``: one fixed-shape iteration step
over the paged KV cache, returning float32 logits at ``metadata.logits_indices`` and the updated cache.
"""

from __future__ import annotations

import jax
from flax import nnx

from kernels_pallas import AttentionMetadata

from .config import ModelConfig
from .layers import CausalLM, Embedding, LayerNorm, Linear, activation, jnp_dtype, paged_attention

KVCache = tuple[jax.Array, jax.Array]  # 2 x [num_heads, num_pages, page_size, head_dim]


class OPTAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None):
        dt = jnp_dtype(cfg.dtype)
        h = cfg.hidden_size
        self.q_proj = Linear(h, h, bias=cfg.enable_bias, dtype=dt)
        self.k_proj = Linear(h, h, bias=cfg.enable_bias, dtype=dt)
        self.v_proj = Linear(h, h, bias=cfg.enable_bias, dtype=dt)
        self.out_proj = Linear(h, h, bias=cfg.enable_bias, dtype=dt)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.backend = backend

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:  # x: [T, hidden]
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(t, self.num_heads, self.head_dim)
        v = self.v_proj(x).reshape(t, self.num_heads, self.head_dim)
        out, kv_cache = paged_attention(
            q, k, v, kv_cache, metadata, scale=self.head_dim**-0.5, backend=self.backend
        )
        return self.out_proj(out.reshape(t, self.num_heads * self.head_dim)), kv_cache


class OPTDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None):
        dt = jnp_dtype(cfg.dtype)
        h = cfg.hidden_size
        self.self_attn = OPTAttention(cfg, backend)
        self.self_attn_layer_norm = LayerNorm(h, eps=cfg.norm_eps, dtype=dt)
        self.fc1 = Linear(h, cfg.intermediate_size, bias=cfg.enable_bias, dtype=dt)
        self.fc2 = Linear(cfg.intermediate_size, h, bias=cfg.enable_bias, dtype=dt)
        self.final_layer_norm = LayerNorm(h, eps=cfg.norm_eps, dtype=dt)
        self.pre_ln = cfg.do_layer_norm_before
        self.act = cfg.hidden_act

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:  # x: [T, hidden]
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        attn, kv_cache = self.self_attn(h, kv_cache, metadata)
        x = x + attn
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(activation(self.act, self.fc1(h)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, kv_cache


class OPTForCausalLM(CausalLM):
    """OPT causal LM over a paged KV cache."""

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        dt = jnp_dtype(cfg.dtype)
        h = cfg.hidden_size
        e = cfg.word_embed_proj_dim or h
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, e, dtype=dt)
        self.embed_positions = Embedding(cfg.max_position_embeddings + cfg.position_offset, h, dtype=dt)
        self.project_in = Linear(e, h, bias=False, dtype=dt) if e != h else None
        self.project_out = Linear(h, e, bias=False, dtype=dt) if e != h else None
        self.layers = nnx.List([OPTDecoderLayer(cfg, backend) for _ in range(cfg.num_layers)])
        use_final_ln = cfg.do_layer_norm_before and not cfg.remove_final_layer_norm
        self.final_layer_norm = LayerNorm(h, eps=cfg.norm_eps, dtype=dt) if use_final_ln else None
        self.lm_head = None if cfg.tie_word_embeddings else Linear(e, cfg.vocab_size, bias=False, dtype=dt)
        self.position_offset = cfg.position_offset

    def hidden_states(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        kv_caches: list[KVCache],  # per layer, 2 x [num_heads, num_pages, page_size, head_dim]
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, list[KVCache]]:  # the last layer's output [T, hidden] (before the final norm), caches
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + self.position_offset)
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, cache, metadata)
            new_caches.append(cache)
        return x, new_caches

    def logits(self, h: jax.Array) -> jax.Array:  # h: [R, hidden] from hidden_states -> [R, vocab] float32
        x = h
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.vocab_logits(x)
