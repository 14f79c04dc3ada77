"""The engine's KV cache: a device page pool, a host page pool in ``pinned_host`` memory, and the copies
between them (traceable functions that the runner compiles in fixed block-count buckets).

Layout. Device pages are what the model reads: per layer ``(k, v)``, each
``[num_kv_heads, num_device_pages, page_size, head_dim]``. The host pool has the same per-layer layout with
``num_host_pages + 1`` pages in the ``pinned_host`` memory kind. One page of each pool is reserved as a
padding target: device page ``num_device_pages - 1`` (the scheduler never hands it out: it is in
``reserved_device_ids``) and host page ``num_host_pages``. Padded block-table columns, padded copy slots and
padded tokens point there; whatever lands in a padding page is never read unmasked.

Copies (a whole request's pages at a time; the scheduler never splits a request across pools):

* swap-out ``(device_src -> host_dst)``: gather the device pages of every layer into one contiguous buffer
  ``[L, 2, kv_heads, n, page, dim]`` on the device (``gather_pages``), transfer it to ``pinned_host`` memory
  and scatter it into the host pool there (``store_on_host``, run by the host: ``compute_type="device_host"``);
* swap-in ``(host_src -> device_dst)``: gather on the host and transfer (``load_from_host``), scatter into
  the device pages (``scatter_pages``).

``n`` is padded to a bucket (padding pairs point at the two padding pages), so every copy runs a
precompiled executable.

Ordering rules (who touches which buffer, and when):

1. Only the engine thread (the thread that runs ``LLMEngine.step``) reads or writes the two pools. Other
   threads hand requests to it through queues (``jserve.engine.async_engine``).
2. Every executable that writes a pool takes it *donated* and returns the new pool; the engine rebinds its
   reference at once and never touches the donated array again. The device pool is donated to every step.
3. Critical-path copies (``plan.sync_swap_out`` then ``plan.sync_swap_in``) run as standalone executables
   dispatched before the step, so the step reads their results (JAX orders executables that share buffers).
4. Overlapped copies (``plan.swap_out``, ``plan.swap_in``) are split so that their slow part, the transfer
   between memory kinds, runs *inside* the step's executable, where XLA schedules it concurrently with the
   layers' compute: a device-local gather (``gather_pages``, its own executable) stages the swap-out pages
   before the step; the step transfers that buffer to the host and scatters it into the host pool, and
   gathers the swap-in pages on the host and transfers them to a staged device buffer; a device-local
   scatter (``scatter_pages``, its own executable) writes them into the device pool after the step. The
   step itself never reads or writes the device pool for a copy: doing the gather/scatter inside it made
   XLA copy the whole pool of every layer to keep the step's in-place KV writes safe (measured in the
   optimized HLO; a test keeps it out). The ordering is still the plan's: swap-out pages are read before
   the step writes anything, swap-in pages are written after it (the scheduler guarantees neither is in
   the batch). Copies beyond the step's copy bucket run as standalone executables before the step, which
   is also correct because the scheduler keeps the sources of overlapped copies allocated until the step
   ends.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import inspect

from jax.experimental import compute_on as _compute_on
from jax.sharding import SingleDeviceSharding

__all__ = ["KVCacheSpec", "KVCache", "gather_pages", "scatter_pages", "store_on_host", "load_from_host",
           "gather_to_host", "scatter_from_host", "bucket_pairs"]

Pool = list  # per layer (k, v): 2 x [num_kv_heads, num_pages, page_size, head_dim]


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (block) of every layer, K and V."""
        itemsize = np.dtype(jnp.dtype(self.dtype)).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.page_size * self.head_dim * itemsize


def _on_host(fn):
    """``fn`` run by the host (``compute_type="device_host"``), its outputs left in host memory.

    The function-transform spelling is ``compute_on2`` up to jax 0.10 and ``compute_on`` from 0.11 (where
    the old context-manager ``compute_on`` is gone)."""
    transform = _compute_on.compute_on
    if "out_memory_spaces" not in inspect.signature(transform).parameters:
        transform = _compute_on.compute_on2
    return transform(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)


def _host_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="pinned_host")


def _device_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind=device.default_memory().kind)


def gather_pages(
    device_pool: Pool,
    src: jax.Array,  # [n] int32 device page ids
) -> jax.Array:  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    """Device-local gather of pages ``src`` of every layer into one contiguous buffer (traceable)."""
    return jnp.stack([jnp.stack([k[:, src], v[:, src]]) for k, v in device_pool])


def scatter_pages(
    device_pool: Pool,
    staged: jax.Array,  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    dst: jax.Array,  # [n] int32 device page ids
) -> Pool:
    """Device-local scatter of a staged buffer into pages ``dst`` of every layer (traceable)."""
    return [(k.at[:, dst].set(staged[i, 0]), v.at[:, dst].set(staged[i, 1])) for i, (k, v) in enumerate(device_pool)]


def store_on_host(
    host_pool: Pool,
    staged: jax.Array,  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    dst: jax.Array,  # [n] int32 host page ids
    *,
    device,
) -> Pool:
    """Transfer a staged buffer to ``pinned_host`` memory and scatter it into host pages ``dst`` there."""
    host = _host_sharding(device)
    staged = jax.device_put(staged, host)

    @_on_host
    def scatter(pool, staged, dst):
        return [(k.at[:, dst].set(staged[i, 0]), v.at[:, dst].set(staged[i, 1])) for i, (k, v) in enumerate(pool)]

    # Say where the result lives: compute_on's outputs are otherwise typed as device memory.
    return jax.device_put(scatter(host_pool, staged, jax.device_put(dst, host)), host)


def load_from_host(
    host_pool: Pool,
    src: jax.Array,  # [n] int32 host page ids
    *,
    device,
) -> jax.Array:  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    """Gather host pages ``src`` on the host and transfer them to the device as one staged buffer."""
    host = _host_sharding(device)

    @_on_host
    def gather(pool, src):
        return jnp.stack([jnp.stack([k[:, src], v[:, src]]) for k, v in pool])

    host_pool = jax.device_put(host_pool, host)  # a no-op for a pool already on the host
    return jax.device_put(gather(host_pool, jax.device_put(src, host)), _device_sharding(device))


def gather_to_host(device_pool: Pool, host_pool: Pool, src: jax.Array, dst: jax.Array, *, device) -> Pool:
    """Swap-out: device pages ``src`` -> host pages ``dst``; returns the new host pool (traceable)."""
    return store_on_host(host_pool, gather_pages(device_pool, src), dst, device=device)


def scatter_from_host(device_pool: Pool, host_pool: Pool, src: jax.Array, dst: jax.Array, *, device) -> Pool:
    """Swap-in: host pages ``src`` -> device pages ``dst``; returns the new device pool (traceable)."""
    return scatter_pages(device_pool, load_from_host(host_pool, src, device=device), dst)


def bucket_pairs(
    pairs: Sequence[tuple[int, int]], buckets: Sequence[int], pad_src: int, pad_dst: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Split copy pairs into chunks padded to bucket sizes: ``[(bucket, src [bucket], dst [bucket]), ...]``.

    Chunks take the largest bucket while more than it remains, then the smallest bucket that holds the rest."""
    out = []
    largest = max(buckets)
    i = 0
    n = len(pairs)
    while i < n:
        rest = n - i
        b = largest if rest >= largest else min(x for x in buckets if x >= rest)
        take = min(b, rest)
        src = np.full(b, pad_src, np.int32)
        dst = np.full(b, pad_dst, np.int32)
        for j in range(take):
            src[j], dst[j] = pairs[i + j]
        out.append((b, src, dst))
        i += take
    return out


class KVCache:
    """The two pools of one engine. ``device``/``host`` are rebound after every executable that donates them."""

    def __init__(self, spec: KVCacheSpec, num_device_pages: int, num_host_pages: int, device=None):
        if num_device_pages < 2:
            raise ValueError(f"num_device_pages must be >= 2 (one is the padding page), got {num_device_pages}")
        if num_host_pages < 0:
            raise ValueError(f"num_host_pages must be >= 0, got {num_host_pages}")
        self.spec = spec
        self.device_id = device or jax.devices()[0]
        self.num_device_pages = num_device_pages
        self.num_host_pages = num_host_pages
        self.pad_device_page = num_device_pages - 1
        self.pad_host_page = num_host_pages
        dt = jnp.dtype(spec.dtype)
        dshape = (spec.num_kv_heads, num_device_pages, spec.page_size, spec.head_dim)
        hshape = (spec.num_kv_heads, num_host_pages + 1, spec.page_size, spec.head_dim)
        L = spec.num_layers
        self.device: Pool = jax.jit(
            lambda: [(jnp.zeros(dshape, dt), jnp.zeros(dshape, dt)) for _ in range(L)],
            out_shardings=_device_sharding(self.device_id),
        )()
        self.host: Pool = jax.jit(
            lambda: [(jnp.zeros(hshape, dt), jnp.zeros(hshape, dt)) for _ in range(L)],
            out_shardings=_host_sharding(self.device_id),
        )()

    @property
    def device_bytes(self) -> int:
        return self.num_device_pages * self.spec.page_bytes

    @property
    def host_bytes(self) -> int:
        return (self.num_host_pages + 1) * self.spec.page_bytes

    def read_pages(self, pool: str, pages: Sequence[int]) -> np.ndarray:
        """Copy of pages (``pool`` = "device" | "host") as ``[L, 2, kv_heads, n, page_size, head_dim]`` numpy
        (for tests and debugging; synchronous)."""
        src = self.device if pool == "device" else self.host
        idx = np.asarray(pages, np.int64)
        return np.stack([np.stack([np.asarray(k)[:, idx], np.asarray(v)[:, idx]]) for k, v in src])
