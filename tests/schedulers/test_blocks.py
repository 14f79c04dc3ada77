"""BlockManager: exact accounting in both pools, swap mappings, pending frees of overlapped copies."""

from __future__ import annotations

import pytest

import random

from schedulers import BlockError, BlockManager, KVLocation, Request
from schedulers.blocks import FreeIds


def _req(rid=0, prompt=10, new=5):
    return Request(rid, prompt, new)


def test_allocation_grows_by_blocks_and_uses_lowest_ids_first():
    bm = BlockManager(num_device_blocks=6, num_host_blocks=4, block_size=4)
    r = _req()
    assert bm.allocate(r, 5) == 2  # 5 tokens -> 2 blocks of 4
    assert r.blocks == [0, 1] and r.kv_location is KVLocation.DEVICE
    assert bm.allocate(r, 8) == 0  # still fits in 2 blocks
    assert bm.allocate(r, 9) == 1
    assert r.blocks == [0, 1, 2]
    assert bm.num_free_device_blocks == 3
    bm.check([r])


@pytest.mark.parametrize("seed", range(20))
def test_free_ids_hand_out_what_a_full_descending_stack_would(seed):
    """FreeIds against the plain stack it replaces: every id of [0, size) minus the excluded, descending,
    popped from the top, ids given back pushed on top."""
    rng = random.Random(seed)
    size = rng.randint(1, 40)
    excluded = frozenset(rng.sample(range(size), rng.randint(0, size - 1)))
    ids = FreeIds(size, excluded, chunk=rng.choice([1, 3, 4096]))  # ids listed a few at a time, or all at once
    stack = [i for i in range(size - 1, -1, -1) if i not in excluded]
    held: list[int] = []
    for _ in range(60):
        assert len(ids) + ids.unlisted == len(stack) and sorted(ids.all_ids()) == sorted(stack)
        if held and rng.random() < 0.4:
            back = [held.pop(rng.randrange(len(held))) for _ in range(rng.randint(1, len(held)))]
            if len(back) == 1:
                ids.append(back[0])
            else:
                ids.extend(back)
            stack.extend(back)
        else:
            n = rng.randint(0, len(stack))
            want = [stack.pop() for _ in range(n)]
            assert ids.take(n) == want
            held.extend(want)


def test_huge_pools_cost_nothing_until_used():
    """A pool of 10^12 blocks (a mistyped count, or a large swap space over small blocks) is created and
    used without building its free lists."""
    bm = BlockManager(num_device_blocks=10**12, num_host_blocks=10**12, block_size=16, reserved_device_ids=(0,))
    assert bm.num_free_device_blocks == 10**12 - 1 and bm.num_free_host_blocks == 10**12
    r = _req(prompt=40)
    bm.allocate(r, 40)
    assert r.blocks == [1, 2, 3]
    assert bm.swap_out(r, overlapped=False) == [(1, 0), (2, 1), (3, 2)]
    assert bm.num_free_host_blocks == 10**12 - 3


def test_reserved_ids_are_never_handed_out():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=0, block_size=2, reserved_device_ids=(0, 2))
    assert bm.num_usable_device_blocks == 2
    r = _req()
    bm.allocate(r, 4)
    assert sorted(r.blocks) == [1, 3]
    with pytest.raises(BlockError, match="needs 1 more device blocks, only 0 free"):
        bm.allocate(r, 5)
    assert r.blocks == [1, 3]  # nothing taken on failure
    bm.check([r])


def test_sync_swap_round_trip_maps_every_block_and_frees_sources_at_once():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=4, block_size=2)
    r = _req()
    bm.allocate(r, 5)  # 3 blocks
    dev = list(r.blocks)
    out = bm.swap_out(r, overlapped=False)
    assert [d for d, _ in out] == dev
    assert r.kv_location is KVLocation.HOST and r.blocks == [h for _, h in out]
    assert bm.num_free_device_blocks == 4 and bm.num_free_host_blocks == 1
    back = bm.swap_in(r, overlapped=False)
    assert [h for h, _ in back] == [h for _, h in out]
    assert r.kv_location is KVLocation.DEVICE
    # The host sources wait for the end of the step: a swap-out of the same plan runs before this swap-in.
    assert bm.num_free_host_blocks == 1 and bm.num_pending_host_blocks == 3
    bm.check([r])
    bm.end_step()
    assert bm.num_free_host_blocks == 4


def test_overlapped_swap_keeps_sources_until_end_step():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=4, block_size=2)
    a, b = _req(0), _req(1)
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    out = bm.swap_out(a, overlapped=True)
    assert bm.num_free_device_blocks == 0 and bm.num_pending_device_blocks == 2
    bm.check([a, b])  # pending blocks are accounted
    with pytest.raises(BlockError):
        bm.allocate(b, 6)  # the sources may still be read: not reusable in this step
    bm.end_step()
    assert bm.num_free_device_blocks == 2
    bm.allocate(b, 6)
    assert b.blocks[-1] in {d for d, _ in out}
    bm.check([a, b])


def test_free_returns_blocks_to_the_pool_they_came_from():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=4, block_size=2)
    r = _req()
    bm.allocate(r, 3)
    bm.swap_out(r, overlapped=False)
    assert bm.free(r) == 2
    assert r.kv_location is KVLocation.NONE and r.blocks == []
    assert bm.num_free_host_blocks == 4 and bm.num_free_device_blocks == 4
    bm.check([r])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 4, 0)
    with pytest.raises(ValueError, match="reserved_device_ids entry 9"):
        BlockManager(4, 4, 2, reserved_device_ids=(9,))
    bm = BlockManager(num_device_blocks=4, num_host_blocks=1, block_size=2)
    r = _req()
    with pytest.raises(BlockError, match="swap_out needs its KV on the device"):
        bm.swap_out(r, overlapped=False)
    bm.allocate(r, 4)
    with pytest.raises(BlockError, match="needs 2 host blocks, only 1 free"):
        bm.swap_out(r, overlapped=False)
    with pytest.raises(BlockError, match="swap_in needs its KV on the host"):
        bm.swap_in(r, overlapped=False)


def test_check_detects_a_leak_and_a_double_owner():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=0, block_size=2)
    a, b = _req(0), _req(1)
    bm.allocate(a, 2)
    with pytest.raises(AssertionError, match="unaccounted"):
        bm.check([])  # a's block is owned by nobody the check knows
    b.blocks = list(a.blocks)
    b.kv_location = KVLocation.DEVICE
    with pytest.raises(AssertionError, match="is in both"):
        bm.check([a, b])


# ---------------------------------------------------------------------- prefix cache


def _keyed(rid, prompt, keys, new=4):
    return Request(rid, prompt, new, prefix_hashes=tuple(keys))


def test_prefix_blocks_are_cached_once_computed_and_shared_by_reference():
    bm = BlockManager(num_device_blocks=8, num_host_blocks=4, block_size=4)
    a = _keyed("a", 10, ["k0", "k1"])  # 2 full prompt blocks + 2 tokens
    assert bm.lookup_prefix(a, 2) == 0  # nothing cached yet
    bm.allocate(a, 10)
    assert a.blocks == [0, 1, 2]
    assert bm.register_prefix(a, 0, 6) == 1  # tokens 0..5 computed: block 0 complete, block 1 not
    assert bm.register_prefix(a, 6, 10) == 1  # block 1 complete now; block 2 holds no keyed block
    assert bm.num_cached_blocks == 2
    b = _keyed("b", 9, ["k0", "other"])
    assert bm.lookup_prefix(b, 2) == 1 and b.blocks == [0] and b.kv_location is KVLocation.DEVICE
    bm.allocate(b, 9)
    assert b.blocks == [0, 3, 4]
    assert bm.num_releasable(a) == 2 and bm.num_releasable(b) == 2  # block 0 is held by both
    bm.check([a, b])
    bm.free(a)  # block 0 stays with b; block 1 (cached, unheld) becomes evictable; block 2 is free
    assert bm.num_free_device_blocks == 8 - 3 and bm.num_cached_blocks == 2
    bm.check([b])
    c = _keyed("c", 12, ["k0", "k1", "k2"])
    assert bm.lookup_prefix(c, 2) == 2 and c.blocks == [0, 1]  # capped at 2 blocks by the caller
    bm.check([b, c])


def test_evictable_blocks_are_taken_last_and_oldest_first():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=0, block_size=2)
    a, b = _keyed("a", 3, ["a0"]), _keyed("b", 3, ["b0"])
    for r in (a, b):
        bm.allocate(r, 3)
        bm.register_prefix(r, 0, 3)
    assert a.blocks == [0, 1] and b.blocks == [2, 3]
    bm.free(a)  # block 0 evictable first, block 1 free
    bm.free(b)  # block 2 evictable next, block 3 free
    assert bm.num_free_device_blocks == 4 and bm.num_cached_blocks == 2
    c = Request("c", 5, 1)
    bm.allocate(c, 5)  # the two plain free blocks, then the oldest evictable one (block 0, key a0)
    assert sorted(c.blocks[:2]) == [1, 3] and c.blocks[2] == 0
    assert bm.num_cached_blocks == 1
    assert bm.lookup_prefix(_keyed("a2", 3, ["a0"]), 1) == 0  # a0 was evicted
    b2 = _keyed("b2", 3, ["b0"])
    assert bm.lookup_prefix(b2, 1) == 1 and b2.blocks == [2]
    bm.check([c, b2])


def test_a_released_sequence_is_evicted_from_its_end():
    """A freed table's cached blocks become evictable last block first, so an allocation that must evict
    takes a sequence's tail and leaves its head (where every lookup starts) reachable."""
    bm = BlockManager(num_device_blocks=4, num_host_blocks=0, block_size=2)
    a = _keyed("a", 7, ["a0", "a1", "a2"])
    bm.allocate(a, 7)
    bm.register_prefix(a, 0, 7)
    assert a.blocks == [0, 1, 2, 3] and bm.num_cached_blocks == 3
    bm.free(a)  # block 3 (partial) is plain free; 2, 1, 0 become evictable in that order
    c = Request("c", 5, 1)
    bm.allocate(c, 5)  # block 3, then the oldest evictable ones: 2 (key a2), then 1 (key a1)
    assert c.blocks == [3, 2, 1]
    again = _keyed("a-again", 7, ["a0", "a1", "a2"])
    assert bm.lookup_prefix(again, 3) == 1 and again.blocks == [0]  # evicting a0 first would have left nothing
    bm.check([c, again])


def test_swap_out_copies_shared_blocks_and_pending_cached_blocks_are_not_handed_out():
    bm = BlockManager(num_device_blocks=6, num_host_blocks=6, block_size=2)
    a = _keyed("a", 5, ["x0", "x1"])
    bm.allocate(a, 5)
    bm.register_prefix(a, 0, 5)  # blocks 0, 1 cached
    b = _keyed("b", 5, ["x0", "y1"])
    bm.lookup_prefix(b, 2)
    bm.allocate(b, 5)
    assert b.blocks[0] == 0
    pairs = bm.swap_out(a, overlapped=True)  # every block is copied, the shared one too
    assert [d for d, _ in pairs] == [0, 1, 2]
    assert bm.num_pending_device_blocks == 2  # block 1 (cached, no holder) and block 2; block 0 stays with b
    late = _keyed("late", 5, ["x0", "x1"])
    assert bm.lookup_prefix(late, 2) == 1 and late.blocks == [0]  # x1 is pending: the copy still reads it
    bm.check([a, b, late])
    bm.end_step()
    bm.check([a, b, late])
    bm.free(late)
    again = _keyed("again", 5, ["x0", "x1"])
    assert bm.lookup_prefix(again, 2) == 2 and again.blocks == [0, 1]  # x1 kept its contents
    bm.check([a, b, again])


# A prefix page that one request copies out with an overlapped swap-out while another request still holds it
# stays out of the free pool until the step ends, even if that other holder lets go of it in the same plan (a
# drop when the host pool is full, a synchronous swap-out): the copy may still be reading it.

def _shared_then_swapped(overlapped: bool):
    """a computes a 5-token prompt (blocks 0, 1 cached under k0, k1; block 2 its own); b takes both cached
    blocks and one of its own (block 3): the 4-block pool is full. a is then swapped out."""
    bm = BlockManager(num_device_blocks=4, num_host_blocks=6, block_size=2)
    a, b = _keyed("a", 5, ["k0", "k1"]), _keyed("b", 5, ["k0", "k1"])
    bm.allocate(a, 5)
    assert bm.register_prefix(a, 0, 5) == 2
    assert bm.lookup_prefix(b, 2) == 2 and b.blocks == [0, 1]
    bm.allocate(b, 5)
    assert b.blocks == [0, 1, 3] and bm.num_free_device_blocks == 0
    pairs = bm.swap_out(a, overlapped=overlapped)
    return bm, a, b, [d for d, _ in pairs]


@pytest.mark.parametrize("release", ["drop", "sync swap-out"])
def test_an_overlapped_copy_source_freed_by_its_last_holder_is_not_reused_in_the_same_step(release):
    bm, a, b, sources = _shared_then_swapped(overlapped=True)
    assert sources == [0, 1, 2] and bm.num_pending_device_blocks == 1  # block 2; 0 and 1 stay with b
    if release == "drop":
        bm.free(b)
    else:
        bm.swap_out(b, overlapped=False)
    # The copy of a's blocks 0 and 1 still runs: only b's own block 3 may be written in this step.
    assert bm.num_free_device_blocks == 1
    c = Request("c", 2, 4)
    bm.allocate(c, 2)
    assert c.blocks == [3]
    with pytest.raises(BlockError, match="more device blocks"):
        bm.allocate(Request("d", 2, 4), 2)
    assert bm.lookup_prefix(_keyed("e", 5, ["k0", "k1"]), 2) == 0  # held back: not handed to a lookup either
    bm.check([a, b, c])
    bm.end_step()  # the copy is done: the cached blocks are evictable, their contents kept
    assert bm.num_free_device_blocks == 3 and bm.num_cached_blocks == 2
    f = _keyed("f", 5, ["k0", "k1"])
    assert bm.lookup_prefix(f, 2) == 2 and f.blocks == [0, 1]
    bm.check([a, b, c, f])


def test_a_synchronous_copy_does_not_hold_back_the_shared_source():
    bm, a, b, sources = _shared_then_swapped(overlapped=False)
    assert sources == [0, 1, 2] and bm.num_pending_device_blocks == 0
    bm.free(b)  # the copy finished before the step: the cached blocks are evictable at once
    assert bm.num_free_device_blocks == 4 and bm.num_cached_blocks == 2
    bm.check([a, b])
    assert a.kv_location is KVLocation.HOST
