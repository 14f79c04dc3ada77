"""The Pallas kernels lower for a CUDA GPU, checked on a CPU-only machine.

``jax.export`` with ``platforms=["cuda"]`` runs Pallas's Triton lowering (block shapes, loop forms, dtype
rules) without a GPU and embeds the Triton IR in the exported module. A kernel that only works in interpret
mode fails here. What this cannot catch is the Triton compiler's own later passes, which run only on a GPU
(`kernels_pallas/bench_gpu.py` covers those).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.decode import paged_decode_attention_pallas
from kernels_pallas.kv_write import write_kv_pallas
from kernels_pallas.ragged import ragged_paged_attention_pallas

SDS = jax.ShapeDtypeStruct
_TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

# (num_q_heads, num_kv_heads, head_dim, page_size, dtype): Llama-3-8B, SmolLM2 (group of 3), MHA, GQA 8.
SHAPES = [
    (32, 8, 128, 16, jnp.bfloat16),
    (9, 3, 64, 16, jnp.float32),
    (32, 32, 128, 16, jnp.float16),
    (16, 2, 64, 8, jnp.bfloat16),
]


# The GPU the lowering targets. From jax 0.12 the Triton lowering reads the target's architecture and, with no
# GPU attached, takes it from the abstract mesh's device (earlier versions do not ask).
_H100 = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                               platform="gpu"))


def _triton_calls(fn, *args) -> int:
    with jax.sharding.use_abstract_mesh(_H100):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_TRITON)(*args)
    return exported.mlir_module().count("xla.gpu.triton")


@pytest.mark.parametrize("hq,hkv,d,page,dtype", SHAPES)
def test_kernels_lower_for_cuda(hq, hkv, d, page, dtype):
    num_pages, batch, pages_per_seq, num_tokens, num_seqs = 32, 4, 8, 64, 3
    pages = SDS((hkv, num_pages, page, d), dtype)
    i32 = jnp.int32

    def decode(q, k, v, bt, lens):
        return paged_decode_attention_pallas(q, k, v, bt, lens, scale=0.125)

    def ragged(q, k, v, bt, lens, qsl):
        return ragged_paged_attention_pallas(q, k, v, bt, lens, qsl, scale=0.125)

    assert _triton_calls(decode, SDS((batch, hq, d), dtype), pages, pages,
                         SDS((batch, pages_per_seq), i32), SDS((batch,), i32)) >= 1
    assert _triton_calls(ragged, SDS((num_tokens, hq, d), dtype), pages, pages,
                         SDS((num_seqs, pages_per_seq), i32), SDS((num_seqs,), i32), SDS((num_seqs + 1,), i32)) >= 1
    assert _triton_calls(write_kv_pallas, pages, pages, SDS((num_tokens, hkv, d), dtype),
                         SDS((num_tokens, hkv, d), dtype), SDS((num_tokens,), i32)) >= 1
