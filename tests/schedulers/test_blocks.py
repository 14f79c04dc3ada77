"""BlockManager: exact accounting in both pools, swap mappings, pending frees of overlapped copies."""

from __future__ import annotations

import pytest

from schedulers import BlockError, BlockManager, KVLocation, Request


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
