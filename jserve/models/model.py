"""``Model``: a loaded jserve model (config, NNX module, tokenizer) with its jitted iteration step.

The step is one pure function ``(state, input_ids [T], positions [T], kv_caches, metadata) -> (logits
[S, vocab] float32, kv_caches)``, jitted once per shape bucket (T, S, pages per sequence, decode_only) with
the KV caches donated, so the cache pages are updated in place. The NNX module is split once into a static
graph definition and its parameter state; the state is passed as an argument (never baked in as constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import AttentionMetadata

from .config import ModelConfig
from .layers import jnp_dtype
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

__all__ = ["Model", "ARCHITECTURES", "abstract_module", "KVCaches"]

ARCHITECTURES: dict[str, type[nnx.Module]] = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}

KVCaches = list[tuple[jax.Array, jax.Array]]  # per layer 2 x [num_kv_heads, num_pages, page_size, head_dim]


def abstract_module(cfg: ModelConfig, backend: str | None = None) -> nnx.Module:
    """The model for ``cfg`` with abstract (shape-only) parameters: builds without allocating memory."""
    cls = ARCHITECTURES[cfg.architecture]
    return nnx.eval_shape(lambda: cls(cfg, backend))


@dataclasses.dataclass(eq=False)
class Model:
    """A ready-to-run model. Build with ``jserve.models.load``; call :meth:`step` once per iteration."""

    config: ModelConfig
    graphdef: Any  # nnx.GraphDef (static)
    state: nnx.State  # parameters on the device
    tokenizer: Any = None  # jserve.tokenizer.Tokenizer | None
    backend: str | None = None
    source: str = ""
    load_info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trace_count = 0  # number of times the step was traced (= compiles, one per shape bucket)

        def run(state, input_ids, positions, kv_caches, metadata):
            self.trace_count += 1
            module = nnx.merge(self.graphdef, state)
            return module(input_ids, positions, kv_caches, metadata)

        self._step = jax.jit(run, donate_argnums=(3,))

    @property
    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)

    def step(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        kv_caches: KVCaches,  # donated: do not use the passed caches after the call
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, KVCaches]:  # logits [S, vocab] float32, updated caches
        c = self.config
        if len(kv_caches) != c.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {c.num_layers}")
        k0 = kv_caches[0][0]
        if k0.ndim != 4 or k0.shape[0] != c.num_kv_heads or k0.shape[3] != c.head_dim:
            raise ValueError(
                f"kv_caches[0] has shape {tuple(k0.shape)}, expected [num_kv_heads={c.num_kv_heads}, num_pages, "
                f"page_size, head_dim={c.head_dim}]"
            )
        if input_ids.shape != positions.shape or input_ids.shape[0] != metadata.num_tokens:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)} and "
                f"metadata.slot_mapping ({metadata.num_tokens},) must all be [T]"
            )
        return self._step(self.state, input_ids, positions, kv_caches, metadata)

    def allocate_kv_caches(self, num_pages: int, page_size: int, dtype: str | None = None) -> KVCaches:
        """Zeroed per-layer K/V pages ``[num_kv_heads, num_pages, page_size, head_dim]`` on the device."""
        c = self.config
        dt = jnp_dtype(dtype or c.dtype)
        shape = (c.num_kv_heads, num_pages, page_size, c.head_dim)
        make = jax.jit(lambda: [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.num_layers)])
        return make()

    @property
    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.state))

    @property
    def weight_bytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self.state))
