"""The engine's KV cache: a device page pool, host pages in ``pinned_host`` memory, and where each host page
lives (the copies between the two are issued by ``jserve.engine.runner``).

Layout. Device pages are what the model reads: per layer ``(k, v)``, each
``[num_kv_heads, num_device_pages, page_size, head_dim]``. Device page ``num_device_pages - 1`` is reserved as
a padding target (the scheduler never hands it out: it is in ``reserved_device_ids``); padded block-table
columns, padded copy slots and padded tokens point there, and whatever lands in it is never read unmasked.

Host pages are not one big pool. Every swap-out chunk becomes its own contiguous ``pinned_host`` buffer
``[L, 2, num_kv_heads, n, page_size, head_dim]`` (``n`` a swap bucket), and a map from the scheduler's host
block id to ``(buffer, slot)`` says where each host page lives. The scheduler's host block ids stay the
accounting unit: at most ``num_host_pages`` ids are live at once. A chunk holds the pages of one request only
(the runner chunks each request's pairs on its own), and the scheduler moves and frees a request's pages all
together, so a buffer is never kept alive by some of its pages while others are dead: host memory stays
within ``num_host_pages`` pages plus the padding slots of partly filled chunks (fewer than the smallest swap
bucket per chunk; none with the default buckets, which include 1).

Copies (a whole request's pages at a time; the scheduler never splits a request across pools), with no
compute on the host and each transfer between memory kinds a plain copy of one contiguous buffer:

* swap-out ``(device_src -> host_dst)``: a device-local gather of the pages of every layer into one staged
  buffer (``gather_pages``, compiled per bucket), ``jax.device_put`` of that buffer to ``pinned_host``
  (asynchronous: it returns at once and the transfer runs while later work computes), and
  ``KVCache.store`` records ``host_dst[j] -> (buffer, j)``;
* swap-in ``(host_src -> device_dst)``: ``KVCache.locate`` groups the host pages by buffer; each buffer is
  ``device_put`` back to device memory (asynchronous) and scattered device-locally into the device pages
  (``scatter_pages``, compiled per bucket; slots not asked for go to the padding page). A request whose
  pages came from several earlier swap-outs takes one transfer and one scatter per buffer.

Ordering rules (who touches which buffer, and when):

1. Only the engine thread (the thread that runs ``LLMEngine.step``) reads or writes the device pool and the
   host map. Other threads hand requests to it through queues (``jserve.engine.async_engine``).
2. Every executable that writes the device pool (the step, a swap-in scatter) takes it *donated* and returns
   the new pool; the engine rebinds ``KVCache.device`` at once and never touches the donated array again.
   Host buffers are never written after the transfer that creates them: a host page is overwritten by
   pointing its id at a new buffer, and a buffer is dropped when no id points at it (JAX keeps it alive
   while a transfer still reads it).
3. JAX orders work that shares buffers in dispatch order. Critical-path copies (``plan.sync_swap_out`` then
   ``plan.sync_swap_in``) are dispatched whole before the step, so the step reads their results and may
   compute into device pages a sync swap-out just read.
4. Overlapped copies (``plan.swap_out``, ``plan.swap_in``): the swap-out's gather and transfer are
   dispatched before the step (the gather reads the pool before the step, which donates it, can write), the
   swap-in's transfer is dispatched before the step too and its scatter after it (it takes the step's
   output pool). Both transfers therefore run while the step computes, and nothing is fused into the step's
   executable. This is correct because the scheduler keeps the sources of overlapped copies allocated until
   the step ends and never puts a request that is being copied in the batch.
5. The engine releases host ids whose data is no longer needed (``release_host``: the sources of a swap-in
   once it is issued; ``retain_host``: after a request on the host is dropped or aborted), so buffers go
   back as soon as the scheduler frees their blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

__all__ = ["KVCacheSpec", "KVCache", "HostBuffer", "gather_pages", "scatter_pages", "bucket_pairs"]

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


def host_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="pinned_host")


def device_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind=device.default_memory().kind)


def gather_pages(
    device_pool: Pool,
    src: jax.Array,  # [n] int32 device page ids
) -> jax.Array:  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    """Device-local gather of pages ``src`` of every layer into one contiguous buffer (traceable).

    (Writing each layer's pages into the buffer with ``dynamic_update_slice`` ran 2.5x faster on a CPU, where
    XLA fuses these gathers into one element-wise loop, but compiled 15x slower: 2-3 s per bucket.)"""
    return jnp.stack([jnp.stack([k[:, src], v[:, src]]) for k, v in device_pool])


def scatter_pages(
    device_pool: Pool,
    staged: jax.Array,  # [L, 2, num_kv_heads, n, page_size, head_dim] on the device
    dst: jax.Array,  # [n] int32 device page ids
) -> Pool:
    """Device-local scatter of a staged buffer into pages ``dst`` of every layer (traceable)."""
    return [(k.at[:, dst].set(staged[i, 0]), v.at[:, dst].set(staged[i, 1])) for i, (k, v) in enumerate(device_pool)]


def bucket_pairs(
    pairs: Sequence[tuple[int, int]], buckets: Sequence[int], pad_src: int, pad_dst: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Split copy pairs into chunks padded to bucket sizes: ``[(bucket, src [bucket], dst [bucket]), ...]``.

    Every slot of a chunk is moved (and, on the host, kept), so padding is what to avoid: a chunk takes a
    bucket that holds the rest with fewer than ``min(buckets)`` padding slots if there is one, else the
    largest bucket that the rest fills. With buckets 1, 2, 4, ... no chunk is padded."""
    out = []
    order = sorted(set(buckets))
    smallest = order[0]
    i = 0
    n = len(pairs)
    while i < n:
        rest = n - i
        b = next((x for x in order if rest <= x < rest + smallest), None)
        if b is None:
            b = max((x for x in order if x <= rest), default=smallest)
        take = min(b, rest)
        src = np.full(b, pad_src, np.int32)
        dst = np.full(b, pad_dst, np.int32)
        chunk = np.asarray(pairs[i : i + take], np.int32).reshape(take, 2)
        src[:take], dst[:take] = chunk[:, 0], chunk[:, 1]
        out.append((b, src, dst))
        i += take
    return out


@dataclasses.dataclass(eq=False)
class HostBuffer:
    """One swap-out chunk in ``pinned_host`` memory and how many host ids still point into it."""

    array: jax.Array  # [L, 2, num_kv_heads, n, page_size, head_dim] in pinned_host memory
    live: int

    @property
    def num_slots(self) -> int:
        return self.array.shape[3]


class KVCache:
    """The device pool (rebound after every executable that donates it) and the host pages of one engine."""

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
        self.pad_host_page = num_host_pages  # marks padding slots of a swap-out chunk (never stored)
        self.host_sharding = host_sharding(self.device_id)
        self.device_sharding = device_sharding(self.device_id)
        dt = jnp.dtype(spec.dtype)
        dshape = (spec.num_kv_heads, num_device_pages, spec.page_size, spec.head_dim)
        L = spec.num_layers
        self.device: Pool = jax.jit(
            lambda: [(jnp.zeros(dshape, dt), jnp.zeros(dshape, dt)) for _ in range(L)],
            out_shardings=self.device_sharding,
        )()
        self._where: dict[int, tuple[HostBuffer, int]] = {}  # host block id -> (buffer, slot)
        self._buffers: dict[int, HostBuffer] = {}  # id(buffer) -> buffer, for every buffer some id points into

    # ------------------------------------------------------------------------------------------ sizes

    @property
    def device_bytes(self) -> int:
        return self.num_device_pages * self.spec.page_bytes

    @property
    def host_bytes(self) -> int:
        """The most host memory the live host ids may name (``num_host_pages`` pages)."""
        return self.num_host_pages * self.spec.page_bytes

    @property
    def host(self) -> list[jax.Array]:
        """The live host buffers (for ``jax.block_until_ready``: transfers still in flight included)."""
        return [b.array for b in self._buffers.values()]

    @property
    def host_ids(self) -> list[int]:
        """Host block ids that hold data, sorted."""
        return sorted(self._where)

    @property
    def num_host_ids(self) -> int:
        """Host block ids that hold data."""
        return len(self._where)

    @property
    def host_pages_held(self) -> int:
        """Pages of host memory the live buffers take (their padding and dead slots included)."""
        return sum(b.num_slots for b in self._buffers.values())

    # ------------------------------------------------------------------------------------------ host map

    def store(
        self,
        array: jax.Array,  # [L, 2, num_kv_heads, n, page_size, head_dim] in pinned_host memory
        host_ids: Sequence[int],  # [n]: the host block id of every slot; pad_host_page marks padding
    ) -> None:
        """Record a swap-out chunk: slot ``j`` of ``array`` is the data of host block ``host_ids[j]`` from now
        on (whatever that id named before is released)."""
        if array.ndim != 6 or array.shape[3] != len(host_ids):
            raise ValueError(f"a host buffer of shape {array.shape} cannot hold {len(host_ids)} slots "
                             "(expected [L, 2, kv_heads, n, page_size, head_dim] with n slots)")
        buf = HostBuffer(array, 0)
        for j, h in enumerate(host_ids):
            h = int(h)
            if h == self.pad_host_page:
                continue
            if not 0 <= h < self.num_host_pages:
                raise ValueError(f"host block id {h} is outside [0, {self.num_host_pages})")
            self._release(h)
            self._where[h] = (buf, j)
            buf.live += 1
        if buf.live:
            self._buffers[id(buf)] = buf

    def locate(self, host_ids: Sequence[int]) -> list[tuple[HostBuffer, list[tuple[int, int]]]]:
        """Where host blocks ``host_ids`` live: ``[(buffer, [(slot, index into host_ids), ...]), ...]``, one
        entry per buffer in order of first use. Raises if an id holds no data."""
        groups: dict[int, tuple[HostBuffer, list[tuple[int, int]]]] = {}
        for i, h in enumerate(host_ids):
            found = self._where.get(int(h))
            if found is None:
                raise ValueError(f"host block {int(h)} holds no data (never swapped out, or already released)")
            buf, slot = found
            groups.setdefault(id(buf), (buf, []))[1].append((slot, i))
        return list(groups.values())

    def release_host(self, host_ids: Iterable[int]) -> None:
        """Forget the data of host blocks ``host_ids`` (ids that hold none are ignored)."""
        for h in host_ids:
            self._release(int(h))

    def retain_host(self, live_ids: Iterable[int]) -> int:
        """Forget every host block not in ``live_ids``; returns how many were forgotten."""
        keep = set(live_ids)
        stale = [h for h in self._where if h not in keep]
        for h in stale:
            self._release(h)
        return len(stale)

    def _release(self, h: int) -> None:
        found = self._where.pop(h, None)
        if found is None:
            return
        buf = found[0]
        buf.live -= 1
        if buf.live == 0:
            del self._buffers[id(buf)]

    # ------------------------------------------------------------------------------------------ debugging

    def read_pages(self, pool: str, pages: Sequence[int]) -> np.ndarray:
        """Copy of pages (``pool`` = "device" | "host") as ``[L, 2, kv_heads, n, page_size, head_dim]`` numpy
        (for tests and debugging; synchronous). Host pages must hold data."""
        idx = np.asarray(pages, np.int64)
        if pool == "device":
            return np.stack([np.stack([np.asarray(k)[:, idx], np.asarray(v)[:, idx]]) for k, v in self.device])
        if pool != "host":
            raise ValueError(f"pool must be 'device' or 'host', got {pool!r}")
        s = self.spec
        out = np.empty((s.num_layers, 2, s.num_kv_heads, len(idx), s.page_size, s.head_dim), jnp.dtype(s.dtype))
        for buf, items in self.locate(idx.tolist()):
            host = np.asarray(buf.array)
            for slot, i in items:
                out[:, :, :, i] = host[:, :, :, slot]
        return out
