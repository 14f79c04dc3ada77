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

Prefix caching (used only by requests that carry ``Request.prefix_hashes``, keys of the full blocks of their
known tokens, prompt and generated). Once a step has computed a keyed block, ``register_prefix`` records it
under its key: it is then *cached*, and several requests' tables may hold it (a reference count).
``lookup_prefix`` gives a fresh request the cached blocks of its longest cached prefix, so it computes only
the rest. A cached block that no table holds is *evictable*: it counts as free and keeps its contents until
an allocation needs it (least recently released first, and only once the plain free list is empty), which
takes it out of the cache. A request only ever writes past its computed tokens, so a cached block is never
written while cached. A swap-out copies every block of the request (its host table stays whole) and
releases its hold on shared ones (a shared block that an overlapped swap-out reads stays out of the free
pool until ``end_step`` even if its other holders let go of it in the same step); ``num_releasable`` counts
the device blocks that leaving the device would really free. With no registered block, every path is the
plain one above.

Accounting is exact and checkable: every usable block is, at every moment, in exactly one of {free list,
evictable set, pending-free list, the tables of live requests (several only for a cached block, as many as
its reference count)}. ``check(requests)`` verifies that.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

from .config import MAX_COUNT
from .request import KVLocation, Request


class BlockError(RuntimeError):
    """A block-pool operation that cannot be carried out (pool exhausted, wrong location)."""


class FreeIds(list):
    """The free ids of one pool ``[0, size)``: a stack (a plain list: ``pop``, ``append``, ``extend`` and ``len``
    are the list's own) over the ``unlisted`` ids never handed out, which join the bottom of the stack a chunk
    at a time (``fill``; ``take`` fills as needed). Popping hands out given-back ids last-returned first, then
    never-used ids lowest first, skipping ``excluded`` ones: the order of a stack built from every id in
    descending order, without building it, so a pool of any size (a huge host pool of small blocks, or a
    mistyped count) costs one chunk until its ids are used. A pool's free count is ``len(ids) + ids.unlisted``.
    """

    __slots__ = ("unlisted", "chunk", "_next", "_size", "_excluded")

    def __init__(self, size: int, excluded: frozenset[int] = frozenset(), chunk: int = 4096) -> None:
        super().__init__()
        self.chunk = chunk  # ids listed at a time
        self.unlisted = size - len(excluded)  # free ids not in the list yet: every id >= _next not excluded
        self._next = 0
        self._size = size
        self._excluded = excluded
        self.fill(chunk)

    def fill(self, k: int) -> None:
        """Put the next ``k`` never-used ids (fewer when fewer are left) at the bottom of the stack."""
        ids: list[int] = []
        while len(ids) < k and self._next < self._size:
            stop = min(self._size, self._next + k - len(ids))
            ids.extend(i for i in range(self._next, stop) if i not in self._excluded)
            self._next = stop
        self.unlisted -= len(ids)
        self[0:0] = ids[::-1]

    def take(self, n: int) -> list[int]:
        """``n`` ids off the top (the caller has checked that ``n <= len(self) + self.unlisted``)."""
        if n > len(self):
            self.fill(max(n - len(self), self.chunk))
        return [self.pop() for _ in range(n)]

    def all_ids(self) -> list[int]:
        """Every free id, listed or not (for accounting checks)."""
        return list(self) + [i for i in range(self._next, self._size) if i not in self._excluded]


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
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_COUNT:
                raise ValueError(f"BlockManager: {name} must be an int in [{low}, 2**62], got {value!r}")
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
        # Free lists: the lowest ids are handed out first, given-back ids last-returned first.
        self._free_device = FreeIds(num_device_blocks, self.reserved_device_ids)
        self._free_host = FreeIds(num_host_blocks)
        # Sources of overlapped copies, returned to the free lists at end_step().
        self._pending_device: list[int] = []
        self._pending_host: list[int] = []
        # Prefix cache: key <-> device block, tables holding each cached block, cached blocks no table holds
        # (oldest release first).
        self._cached: dict[Hashable, int] = {}
        self._key_of: dict[int, Hashable] = {}
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Cached blocks an overlapped swap-out reads in this step while another table still holds them: if
        # that last holder lets go before end_step, they go to the pending list, not the evictable set.
        self._shared_sources: set[int] = set()

    # ------------------------------------------------------------------ queries

    @property
    def num_free_device_blocks(self) -> int:
        """Device blocks an allocation may take: the free list and the evictable cached blocks."""
        free = self._free_device
        return len(free) + free.unlisted + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Device blocks in the prefix cache (held by some table or evictable)."""
        return len(self._key_of)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._free_host) + self._free_host.unlisted

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
        return self.num_usable_device_blocks - self.num_free_device_blocks

    @property
    def num_used_host_blocks(self) -> int:
        return self.num_host_blocks - self.num_free_host_blocks

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
        return self.num_free_device_blocks - num_blocks >= watermark_blocks

    def num_releasable(self, request: Request) -> int:
        """Device blocks that ``request`` leaving the device would free: its blocks no other table holds."""
        if request.kv_location is not KVLocation.DEVICE:
            return 0
        if not self._refs:
            return len(request.blocks)
        refs = self._refs
        return sum(1 for b in request.blocks if refs.get(b, 1) == 1)

    def _take_device(self, n: int) -> list[int]:
        """``n`` device blocks for new contents: the free list first, then the oldest evictable cached ones
        (which leave the cache). The caller has checked that ``n`` are free."""
        free = self._free_device
        taken = free.take(min(n, len(free) + free.unlisted))
        while len(taken) < n:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(b)]
            del self._refs[b]
            taken.append(b)
        return taken

    def _release_device(self, blocks: list[int], pending: bool) -> None:
        """Drop one table's hold on ``blocks``: a cached block no table holds any more becomes evictable
        (or pending, when an overlapped copy may still read it); the others go to the free list (or pending).
        A table's blocks are released last one first, so that eviction takes the ends of cached sequences
        before their beginnings: a lookup walks a prefix from its first block, and a sequence whose first
        block is gone is unreachable however much of the rest stays cached."""
        if not self._refs:
            (self._pending_device if pending else self._free_device).extend(blocks)
            return
        refs = self._refs
        for b in reversed(blocks):
            n = refs.get(b)
            if n is None:
                (self._pending_device if pending else self._free_device).append(b)
            elif n > 1:
                refs[b] = n - 1
            else:
                refs[b] = 0
                if pending or b in self._shared_sources:
                    self._pending_device.append(b)
                else:
                    self._evictable[b] = None

    # ------------------------------------------------------------------ prefix cache

    def cached_prefix(self, request: Request, max_blocks: int) -> list[bool]:
        """The cached blocks ``lookup_prefix`` could give ``request`` (its longest cached prefix, at most
        ``max_blocks``), one flag each: True when the block is evictable, so taking it uses a free block."""
        keys = request.prefix_hashes
        if not keys or max_blocks <= 0 or not self._cached:
            return []
        flags: list[bool] = []
        for key in keys[:max_blocks]:
            b = self._cached.get(key)
            if b is None or (self._refs[b] == 0 and b not in self._evictable):  # pending: held back this step
                break
            flags.append(self._refs[b] == 0)
        return flags

    def lookup_prefix(self, request: Request, max_blocks: int) -> int:
        """Give a fresh ``request`` (no KV, nothing computed) the cached blocks of its longest cached prefix,
        at most ``max_blocks``; returns how many (the request then holds them on the device)."""
        if request.kv_location is not KVLocation.NONE or request.blocks:
            raise BlockError(f"request {request.request_id!r}: a prefix lookup needs a request without KV")
        n = len(self.cached_prefix(request, max_blocks))
        hits = [self._cached[key] for key in request.prefix_hashes[:n]]
        for b in hits:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        if hits:
            request.blocks = hits
            request.kv_location = KVLocation.DEVICE
        return len(hits)

    def register_prefix(self, request: Request, start_token: int, end_token: int) -> int:
        """A step computed ``request``'s tokens ``[start_token, end_token)``: cache its keyed blocks that this
        completed (under their ``prefix_hashes`` key, unless that key or block is cached already). Returns
        the blocks added to the cache."""
        keys = request.prefix_hashes
        if not keys or request.kv_location is not KVLocation.DEVICE:
            return 0
        bs = self.block_size
        added = 0
        for i in range(start_token // bs, min(len(keys), end_token // bs)):
            b = request.blocks[i]
            if keys[i] in self._cached or b in self._key_of:
                continue
            self._cached[keys[i]] = b
            self._key_of[b] = keys[i]
            self._refs[b] = 1
            added += 1
        return added

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
        if need > self.num_free_device_blocks:
            raise BlockError(
                f"request {request.request_id!r}: needs {need} more device blocks, "
                f"only {self.num_free_device_blocks} free"
            )
        request.blocks.extend(self._take_device(need))
        request.kv_location = KVLocation.DEVICE
        return need

    def free(self, request: Request) -> int:
        """Return every block of ``request`` to its pool; the request then holds no KV. Returns the count."""
        n = len(request.blocks)
        if request.kv_location is KVLocation.DEVICE:
            self._release_device(request.blocks, pending=False)
        elif request.kv_location is KVLocation.HOST:
            self._free_host.extend(request.blocks)
        elif n:
            raise BlockError(f"request {request.request_id!r}: has blocks but kv_location NONE")
        request.blocks = []
        request.kv_location = KVLocation.NONE
        return n

    # ------------------------------------------------------------------ swaps

    def can_swap_out(self, request: Request) -> bool:
        return request.kv_location is KVLocation.DEVICE and len(request.blocks) <= self.num_free_host_blocks

    def can_swap_in(self, request: Request) -> bool:
        return request.kv_location is KVLocation.HOST and len(request.blocks) <= self.num_free_device_blocks

    def swap_out(self, request: Request, overlapped: bool) -> list[tuple[int, int]]:
        """Move ``request``'s KV to the host; returns ``(device_block, host_block)`` pairs in logical order."""
        if request.kv_location is not KVLocation.DEVICE:
            raise BlockError(f"request {request.request_id!r}: swap_out needs its KV on the device, it is {request.kv_location.value}")
        n = len(request.blocks)
        if n > self.num_free_host_blocks:
            raise BlockError(f"request {request.request_id!r}: swap_out needs {n} host blocks, only "
                             f"{self.num_free_host_blocks} free")
        dst = self._free_host.take(n)
        src = request.blocks
        if overlapped and self._refs:
            self._shared_sources.update(b for b in src if self._refs.get(b, 0) > 1)
        self._release_device(src, pending=overlapped)
        request.blocks = dst
        request.kv_location = KVLocation.HOST
        return list(zip(src, dst))

    def swap_in(self, request: Request, overlapped: bool) -> list[tuple[int, int]]:
        """Move ``request``'s KV to the device; returns ``(host_block, device_block)`` pairs in logical order."""
        if request.kv_location is not KVLocation.HOST:
            raise BlockError(f"request {request.request_id!r}: swap_in needs its KV on the host, it is {request.kv_location.value}")
        n = len(request.blocks)
        if n > self.num_free_device_blocks:
            raise BlockError(f"request {request.request_id!r}: swap_in needs {n} device blocks, only "
                             f"{self.num_free_device_blocks} free")
        dst = self._take_device(n)
        src = request.blocks
        # Host sources return only at end_step, even for a synchronous copy: an executor performs every
        # swap-out of a plan before its swap-ins, so a swap-out in the same plan must not write them.
        self._pending_host.extend(src)
        request.blocks = dst
        request.kv_location = KVLocation.DEVICE
        return list(zip(src, dst))

    def end_step(self) -> None:
        """The step is over: sources of overlapped copies return to the free lists."""
        self._shared_sources.clear()
        if self._pending_device:
            pending, self._pending_device = self._pending_device, []
            if self._refs:
                for b in pending:
                    if b in self._refs:  # a cached block whose last holder swapped out: keeps its contents
                        self._evictable[b] = None
                    else:
                        self._free_device.append(b)
            else:
                self._free_device.extend(pending)
        if self._pending_host:
            self._free_host.extend(self._pending_host)
            self._pending_host = []

    # ------------------------------------------------------------------ verification

    def check(self, requests: Iterable[Request]) -> None:
        """Verify exact accounting against the live ``requests``; raises ``AssertionError`` naming the fault.

        Every usable device block and every host block must be in exactly one of: the free list, the
        evictable set, the pending list, one request's table (whose ``kv_location`` names that pool); a
        cached device block may be in several tables, as many as its reference count (0: evictable or
        pending)."""
        dev_owner: dict[int, object] = {}
        host_owner: dict[int, object] = {}
        holders: dict[int, int] = {}
        for b in self._free_device.all_ids():
            _claim(dev_owner, b, "free list", "device")
        for b in self._evictable:
            _claim(dev_owner, b, "evictable set", "device")
        for b in self._pending_device:
            _claim(dev_owner, b, "pending list", "device")
        for b in self._free_host.all_ids():
            _claim(host_owner, b, "free list", "host")
        for b in self._pending_host:
            _claim(host_owner, b, "pending list", "host")
        for r in requests:
            if r.kv_location is KVLocation.DEVICE:
                for b in r.blocks:
                    if b in self._refs:
                        if holders.get(b, 0) == 0 and b in dev_owner:
                            raise AssertionError(f"device block {b} is in both {dev_owner[b]} and request {r.request_id!r}")
                        holders[b] = holders.get(b, 0) + 1
                        dev_owner[b] = f"request {r.request_id!r}"
                    else:
                        _claim(dev_owner, b, f"request {r.request_id!r}", "device")
            elif r.kv_location is KVLocation.HOST:
                for b in r.blocks:
                    _claim(host_owner, b, f"request {r.request_id!r}", "host")
            elif r.blocks:
                raise AssertionError(f"request {r.request_id!r} holds blocks {r.blocks} but kv_location is NONE")
        for b, n in self._refs.items():
            if holders.get(b, 0) != n:
                raise AssertionError(f"cached device block {b}: reference count {n}, held by {holders.get(b, 0)} tables")
            if n == 0 and b not in self._evictable and b not in self._pending_device:
                raise AssertionError(f"cached device block {b} is held by no table but neither evictable nor pending")
        if set(self._key_of) != set(self._refs) or {self._key_of[b]: b for b in self._key_of} != self._cached:
            raise AssertionError("prefix cache maps disagree")
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
