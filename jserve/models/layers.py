"""Shared Flax NNX layers for jserve's models: linear, embedding, RMSNorm/LayerNorm, rotary embeddings and
the paged-attention block that writes this step's K/V into the cache and attends over it.

Parameters are created as zeros of the config dtype; models are always built under ``nnx.eval_shape`` and
then filled by a weight loader (``jserve.weights``), so building never allocates real memory.
Parameter names follow Hugging Face's (``q_proj``, ``input_layernorm``...) so the name maps stay readable;
linear weights ``w`` are stored ``[out_features, in_features]`` like a torch ``weight``: XLA:CPU's matmul is
markedly faster when the contraction runs over the minor axis of both operands (decode at batch 32: the
SmolLM2 layer matmuls take 25% less time than with ``[in, out]`` kernels; no difference at batch 1).
Every product with such a weight goes through ``kernels_cpu.matmul_nt``, which runs decode-sized float32
products on the CPU in jserve's native kernel and everything else in XLA's dot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels_cpu
import kernels_pallas
from kernels_pallas import AttentionMetadata

from .config import RopeScaling

__all__ = [
    "Linear",
    "Embedding",
    "RMSNorm",
    "LayerNorm",
    "activation",
    "rope_inv_freq",
    "apply_rope",
    "rope_tables",
    "paged_attention",
    "CausalLM",
]


def _precision(dtype: jnp.dtype) -> jax.lax.Precision | None:
    """float32 models ask for full-precision matmuls (GPUs would otherwise use TF32); others keep the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _zeros(shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


class Linear(nnx.Module):
    """``y = x @ w.T + bias``, with ``w`` ``[out_features, in_features]`` (torch's layout)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: jnp.dtype):
        self.w = _zeros((out_features, in_features), dtype)
        self.bias = _zeros((out_features,), dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., in] -> [..., out]
        y = kernels_cpu.matmul_nt(x, self.w[...], precision=_precision(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token (or position) table ``[num_embeddings, features]``; ``attend`` is the tied output projection."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: jnp.dtype):
        self.embedding = _zeros((num_embeddings, features), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:  # ids: [T] -> [T, features]
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # x: [S, features] -> [S, num_embeddings] float32
        return kernels_cpu.matmul_nt(
            x, self.embedding[...], preferred_element_type=jnp.float32, precision=_precision(x.dtype)
        )


class RMSNorm(nnx.Module):
    """Llama RMSNorm, computed in float32 and cast back before the weight multiply (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [T, dim]
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = _zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [T, dim]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


# -------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:  # [head_dim // 2]
    """Inverse frequencies (float32, as transformers computes them), with linear or llama3 scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        old = float(scaling.original_max_position_embeddings)
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")


def rope_tables(
    positions: jax.Array,  # [T] int32
    inv_freq: np.ndarray,  # [head_dim // 2] float32
) -> tuple[jax.Array, jax.Array]:  # cos, sin: [T, 1, head_dim // 2] float32
    """The cosines and sines of one step's positions, computed once per step and shared by every layer.

    XLA fuses an elementwise producer into each of its consumers, so plain ``cos``/``sin`` here would be
    evaluated again inside every layer's rotation, once per element of its q and k (9 query heads: 18
    evaluations per value). On the CPU that was 3.5 ms of a 72 ms batch-32 SmolLM2 decode step. A sum over a
    stacked zero makes the tables a reduction's output, which XLA materializes once instead of fusing into
    the consumers (``optimization_barrier`` does not: it is removed before fusion). The values are exact
    (x + 0 = x); tests/jserve/test_models_paged.py checks that a step's optimized HLO evaluates each
    transcendental once.
    """
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [T, D/2]
    tables = jnp.stack([jnp.cos(freqs), jnp.sin(freqs)])  # [2, T, D/2]
    tables = jnp.stack([tables, jnp.zeros_like(tables)]).sum(axis=0)
    return tables[0][:, None, :], tables[1][:, None, :]


def apply_rope(
    x: jax.Array,  # [T, num_heads, head_dim]
    tables: tuple[jax.Array, jax.Array],  # rope_tables(positions, inv_freq)
) -> jax.Array:  # [T, num_heads, head_dim]
    """Rotate-half RoPE (the Hugging Face layout: pairs (i, i + head_dim/2)), computed in float32."""
    cos, sin = tables
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------- paged attention


def paged_attention(
    q: jax.Array,  # [T, num_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    kv_cache: tuple[jax.Array, jax.Array],  # 2 x [num_kv_heads, num_pages, page_size, head_dim]
    metadata: AttentionMetadata,
    *,
    scale: float,
    backend: str | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # [T, num_heads, head_dim], updated cache
    """Write this step's K/V into the pages (slot_mapping), then attend: the decode kernel when every
    sequence has one query token, else ragged prefill attention over the paged context.

    ``backend=None`` runs the platform's fastest kernels (``kernels_pallas.checks.serving_backend``: Pallas
    on a GPU, the ``cpu`` backend elsewhere: native decode attention, XLA loops for the rest)."""
    kw = {"backend": kernels_pallas.checks.serving_backend(backend)}
    k_pages, v_pages = kv_cache
    k_pages, v_pages = kernels_pallas.write_kv(k_pages, v_pages, k, v, metadata.slot_mapping, **kw)
    if metadata.decode_only:
        out = kernels_pallas.paged_decode_attention(
            q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, scale=scale, **kw
        )
    else:
        out = kernels_pallas.ragged_paged_attention(
            q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
            scale=scale, **kw,
        )
    return out, (k_pages, v_pages)


def jnp_dtype(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class CausalLM(nnx.Module):
    """What every model family shares: a step is ``hidden_states`` (the layers over the packed tokens, with the
    paged KV cache) then ``logits`` (final norm and LM head) at the rows that sample. A family defines those two;
    prompt log-probabilities call ``logits`` on other rows of the same hidden states."""

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        kv_caches: list,  # per layer, 2 x [num_kv_heads, num_pages, page_size, head_dim]
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, list]:  # logits [S, vocab] float32, updated caches
        h, new_caches = self.hidden_states(input_ids, positions, kv_caches, metadata)
        return self.logits(h[metadata.logits_indices]), new_caches

    def vocab_logits(self, x: jax.Array) -> jax.Array:  # x: [R, features] after the final norm -> [R, vocab]
        """The LM head: the separate ``lm_head`` when the model has one (``tie_word_embeddings`` false), else
        the tied input embedding ``embed_tokens``; float32 logits."""
        if self.lm_head is None:
            return self.embed_tokens.attend(x)
        return kernels_cpu.matmul_nt(x, self.lm_head.w[...], preferred_element_type=jnp.float32,
                                     precision=_precision(x.dtype))
