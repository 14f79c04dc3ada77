"""Paged-attention kernels for jserve: decode attention, ragged prefill attention and KV writes over a
paged KV cache, each with a pure-jnp reference (``kernels_pallas.reference``).

Backends (``backend=`` on every public function): ``"pallas"`` (GPU lowering), ``"interpret"`` (Pallas
interpret mode, for CPU tests) and ``"reference"`` (plain XLA). ``None`` follows the platform: ``pallas``
on a GPU, ``reference`` elsewhere (interpret mode is a correctness tool, far too slow to serve with).
"""

from .metadata import AttentionMetadata
from .reference import (
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)

# Public kernels with a backend switch. Until the Pallas versions land these call the references.
paged_decode_attention = paged_decode_attention_reference
ragged_paged_attention = ragged_paged_attention_reference
write_kv = write_kv_reference

__all__ = [
    "AttentionMetadata",
    "paged_decode_attention",
    "ragged_paged_attention",
    "write_kv",
    "paged_decode_attention_reference",
    "ragged_paged_attention_reference",
    "write_kv_reference",
]
