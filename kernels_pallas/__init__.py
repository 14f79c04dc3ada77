"""Paged-attention kernels for jserve: decode attention, ragged prefill attention and KV writes over a
paged KV cache, each with a pure-jnp reference (``kernels_pallas.reference``).

Layout of the cache: K and V pages are ``[num_kv_heads, num_pages, page_size, head_dim]`` (as in JAX's own
paged kernels); a slot is ``page * page_size + offset``. ``metadata.AttentionMetadata`` describes one
step's packed tokens. Modules: ``api`` (public functions, checks, backend dispatch), ``decode``, ``ragged``,
``kv_write`` (the Pallas kernels and their tuning configs), ``tiles`` (in-kernel pieces they share),
``reference`` (ground truth), ``checks`` (validation), ``bench_gpu`` (the GPU check script).

Backends (``backend=`` on every public function): ``"pallas"`` (GPU lowering), ``"interpret"`` (Pallas
interpret mode, for CPU tests), ``"reference"`` (plain XLA, the ground truth), ``"xla"`` (XLA loops over
pages, ``xla_paged``) and ``"cpu"`` (``"xla"`` with decode attention in the native kernel of ``kernels_cpu``).
``None`` follows the platform: ``pallas`` on a GPU, ``reference`` elsewhere (the models pick ``cpu`` off a
GPU: ``checks.serving_backend``; interpret mode is a correctness tool, far too slow to serve with).
"""

from .api import paged_decode_attention, ragged_paged_attention, write_kv
from .checks import BACKENDS, resolve_backend
from .decode import DecodeConfig
from .kv_write import WriteConfig
from .metadata import AttentionMetadata
from .ragged import PrefillConfig
from .reference import (
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)

__all__ = [
    "AttentionMetadata",
    "BACKENDS",
    "DecodeConfig",
    "PrefillConfig",
    "WriteConfig",
    "paged_decode_attention",
    "ragged_paged_attention",
    "resolve_backend",
    "write_kv",
    "paged_decode_attention_reference",
    "ragged_paged_attention_reference",
    "write_kv_reference",
]
