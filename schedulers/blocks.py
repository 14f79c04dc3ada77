"""``BlockManager``: the device and host pools of fixed-size KV blocks, and every move between them.

A block holds the keys and values of ``block_size`` consecutive tokens of one request (all layers). Block
ids are the executor's *physical page indices*: device ids index the device KV pages
(``[num_kv_heads, num_pages, page_size, head_dim]`` per layer in the engine), host ids index the host pool.
An executor may keep some device ids for itself (``reserved_device_ids``, e.g. a padding page); those are
never handed out.

A request's blocks live in exactly one pool, named by ``request.kv_location``; ``request.blocks`` lists its
physical ids in logical order. Every operation here keeps that table and the pools consistent:

* ``allocate(request, num_tokens)`` grows the request's device table to cover ``num_tokens`` tokens;
* ``free(request)`` returns its blocks (a finish, an abort, or a recompute drop);
* ``swap_out`` / ``swap_in`` move a request to the other pool and return the ``(src, dst)`` copy pairs.

Copies that overlap a step's compute (``overlapped=True``) keep their *source* blocks out of the free lists
until ``end_step()``: the executor may still be reading them while the step runs. A synchronous swap-out (on
the critical path, finished before the compute starts) frees its device sources at once, so the same step
may compute into them or swap another request into them. The host sources of *any* swap-in wait for
``end_step()``: an executor runs all of a plan's swap-outs before its swap-ins, so a swap-out in the same
plan must not overwrite host blocks whose data is still to be read. ``end_step()`` is called by the
scheduler at every ``on_step_end``.

Accounting is exact and checkable: every usable block is, at every moment, in exactly one of {free list,
pending-free list, one live request's table}. ``check(requests)`` verifies that.
"""

from __future__ import annotations

from typing import Iterable

from .request import KVLocation, Request


class BlockError(RuntimeError):
    """A block-pool operation that cannot be carried out (pool exhausted, wrong location)."""


class BlockManager:
    """Device and host block pools with per-request block tables (``Request.blocks``)."""

    def __init__(
        self,
        num_device_blocks: int,
        num_host_blocks: int,
        block_size: int,
        reserved_device_ids: Iterable[int] = (),
    ) -> None:
        for name, value, low in (
            ("num_device_blocks", num_device_blocks, 1),
            ("num_host_blocks", num_host_blocks, 0),
            ("block_size", block_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BlockManager: {name} must be an int >= {low}, got {value!r}")
        reserved = tuple(reserved_device_ids)
        for rid in reserved:
            if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < num_device_blocks:
                raise ValueError(
                    f"BlockManager: reserved_device_ids entry {rid!r} is not a device page id in "
                    f"[0, {num_device_blocks})"
                )
        if len(set(reserved)) != len(reserved):
            raise ValueError(f"BlockManager: reserved_device_ids has duplicates: {reserved!r}")
        if len(reserved) >= num_device_blocks:
            raise ValueError(
                f"BlockManager: reserved_device_ids ({len(reserved)}) leave no usable block of "
                f"num_device_blocks={num_device_blocks}"
            )
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.reserved_device_ids = frozenset(reserved)
        self.num_usable_device_blocks = num_device_blocks - len(reserved)
        # Free lists are stacks; built descending so that the lowest ids are handed out first.
        self._free_device: list[int] = [i for i in range(num_device_blocks - 1, -1, -1) if i not in self.reserved_device_ids]
        self._free_host: list[int] = list(range(num_host_blocks - 1, -1, -1))
        # Sources of overlapped copies, returned to the free lists at end_step().
        self._pending_device: list[int] = []
        self._pending_host: list[int] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free_device_blocks(self) -> int:
        return len(self._free_device)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._free_host)

    @property
    def num_pending_device_blocks(self) -> int:
        """Device blocks freed by an overlapped swap-out this step; free again after ``end_step``."""
        return len(self._pending_device)

    @property
    def num_pending_host_blocks(self) -> int:
        return len(self._pending_host)

    @property
    def num_used_device_blocks(self) -> int:
        """Usable device blocks held by requests or pending release."""
        return self.num_usable_device_blocks - len(self._free_device)

    @property
    def num_used_host_blocks(self) -> int:
        return self.num_host_blocks - len(self._free_host)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def extra_device_blocks(self, request: Request, num_tokens: int) -> int:
        """Device blocks ``request`` still needs so that its table covers ``num_tokens`` tokens.

        For a request on the host this counts the blocks of a full swap-in plus the growth."""
        have = len(request.blocks) if request.kv_location is KVLocation.DEVICE else 0
        need = self.blocks_for_tokens(num_tokens) - have
        return need if need > 0 else 0

    def can_allocate(self, num_blocks: int, watermark_blocks: int = 0) -> bool:
        """True when ``num_blocks`` device blocks can be taken leaving at least ``watermark_blocks`` free."""
        return len(self._free_device) - num_blocks >= watermark_blocks

    # ------------------------------------------------------------------ device allocation

    def allocate(self, request: Request, num_tokens: int) -> int:
        """Grow ``request``'s device table to cover ``num_tokens`` tokens; returns the blocks added.

        A request with no KV yet (``kv_location`` NONE) moves to the device. Raises ``BlockError`` if the
        request's KV is on the host or the device pool is short (nothing is taken in that case)."""
        if request.kv_location is KVLocation.HOST:
            raise BlockError(f"request {request.request_id!r}: cannot allocate device blocks while its KV is on the host")
        need = self.blocks_for_tokens(num_tokens) - len(request.blocks)
        if need <= 0:
            return 0
        if need > len(self._free_device):
            raise BlockError(
                f"request {request.request_id!r}: needs {need} more device blocks, "
                f"only {len(self._free_device)} free"
            )
        free = self._free_device
        request.blocks.extend(free.pop() for _ in range(need))
        request.kv_location = KVLocation.DEVICE
        return need

    def free(self, request: Request) -> int:
        """Return every block of ``request`` to its pool; the request then holds no KV. Returns the count."""
        n = len(request.blocks)
        if request.kv_location is KVLocation.DEVICE:
            self._free_device.extend(request.blocks)
        elif request.kv_location is KVLocation.HOST:
            self._free_host.extend(request.blocks)
        elif n:
            raise BlockError(f"request {request.request_id!r}: has blocks but kv_location NONE")
        request.blocks = []
        request.kv_location = KVLocation.NONE
        return n

    # ------------------------------------------------------------------ swaps

    def can_swap_out(self, request: Request) -> bool:
        return request.kv_location is KVLocation.DEVICE and len(request.blocks) <= len(self._free_host)

    def can_swap_in(self, request: Request) -> bool:
        return request.kv_location is KVLocation.HOST and len(request.blocks) <= len(self._free_device)

    def swap_out(self, request: Request, overlapped: bool) -> list[tuple[int, int]]:
        """Move ``request``'s KV to the host; returns ``(device_block, host_block)`` pairs in logical order."""
        if request.kv_location is not KVLocation.DEVICE:
            raise BlockError(f"request {request.request_id!r}: swap_out needs its KV on the device, it is {request.kv_location.value}")
        n = len(request.blocks)
        if n > len(self._free_host):
            raise BlockError(f"request {request.request_id!r}: swap_out needs {n} host blocks, only {len(self._free_host)} free")
        free = self._free_host
        dst = [free.pop() for _ in range(n)]
        src = request.blocks
        (self._pending_device if overlapped else self._free_device).extend(src)
        request.blocks = dst
        request.kv_location = KVLocation.HOST
        return list(zip(src, dst))

    def swap_in(self, request: Request, overlapped: bool) -> list[tuple[int, int]]:
        """Move ``request``'s KV to the device; returns ``(host_block, device_block)`` pairs in logical order."""
        if request.kv_location is not KVLocation.HOST:
            raise BlockError(f"request {request.request_id!r}: swap_in needs its KV on the host, it is {request.kv_location.value}")
        n = len(request.blocks)
        if n > len(self._free_device):
            raise BlockError(f"request {request.request_id!r}: swap_in needs {n} device blocks, only {len(self._free_device)} free")
        free = self._free_device
        dst = [free.pop() for _ in range(n)]
        src = request.blocks
        # Host sources return only at end_step, even for a synchronous copy: an executor performs every
        # swap-out of a plan before its swap-ins, so a swap-out in the same plan must not write them.
        self._pending_host.extend(src)
        request.blocks = dst
        request.kv_location = KVLocation.DEVICE
        return list(zip(src, dst))

    def end_step(self) -> None:
        """The step is over: sources of overlapped copies return to the free lists."""
        if self._pending_device:
            self._free_device.extend(self._pending_device)
            self._pending_device = []
        if self._pending_host:
            self._free_host.extend(self._pending_host)
            self._pending_host = []

    # ------------------------------------------------------------------ verification

    def check(self, requests: Iterable[Request]) -> None:
        """Verify exact accounting against the live ``requests``; raises ``AssertionError`` naming the fault.

        Every usable device block and every host block must be in exactly one of: the free list, the
        pending list, one request's table (whose ``kv_location`` names that pool)."""
        dev_owner: dict[int, object] = {}
        host_owner: dict[int, object] = {}
        for b in self._free_device:
            _claim(dev_owner, b, "free list", "device")
        for b in self._pending_device:
            _claim(dev_owner, b, "pending list", "device")
        for b in self._free_host:
            _claim(host_owner, b, "free list", "host")
        for b in self._pending_host:
            _claim(host_owner, b, "pending list", "host")
        for r in requests:
            if r.kv_location is KVLocation.DEVICE:
                for b in r.blocks:
                    _claim(dev_owner, b, f"request {r.request_id!r}", "device")
            elif r.kv_location is KVLocation.HOST:
                for b in r.blocks:
                    _claim(host_owner, b, f"request {r.request_id!r}", "host")
            elif r.blocks:
                raise AssertionError(f"request {r.request_id!r} holds blocks {r.blocks} but kv_location is NONE")
        usable = set(range(self.num_device_blocks)) - self.reserved_device_ids
        if set(dev_owner) != usable:
            missing = sorted(usable - set(dev_owner))[:8]
            extra = sorted(set(dev_owner) - usable)[:8]
            raise AssertionError(f"device pool not conserved: unaccounted {missing}, foreign/reserved {extra}")
        if set(host_owner) != set(range(self.num_host_blocks)):
            missing = sorted(set(range(self.num_host_blocks)) - set(host_owner))[:8]
            extra = sorted(set(host_owner) - set(range(self.num_host_blocks)))[:8]
            raise AssertionError(f"host pool not conserved: unaccounted {missing}, foreign {extra}")


def _claim(owner: dict[int, object], block: int, who: str, pool: str) -> None:
    prev = owner.get(block)
    if prev is not None:
        raise AssertionError(f"{pool} block {block} is in both {prev} and {who}")
    owner[block] = who
