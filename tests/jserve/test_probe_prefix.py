"""Adversarial checks of prefix caching (found by the probe pass over the block manager and the engine).

1. ``BlockManager``: a prefix page that one request copies out with an overlapped swap-out while another
   request still holds it must stay out of the free pool until the step ends, even if that other holder
   lets go of it in the same plan (a drop when the host pool is full, a synchronous swap-out): the copy may
   still be reading it, so a same-plan allocation or swap-in must not be handed it to write.
2. The engine on the tiny random Llama under memory pressure, with prompts that share a prefix of exactly a
   page multiple, one token more or less, identical prompts and a prompt that is a prefix of another; with
   aborts of requests holding shared pages (also while their page-completing chunk is in flight under async
   scheduling), reused request ids, and invariants checked after every step: greedy outputs equal
   ``jserve.models.greedy_generate`` and every page returns to the pool.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jserve.engine import LLM, SamplingParams
from jserve.models import greedy_generate
from schedulers.blocks import BlockManager
from schedulers.request import KVLocation, Request

from test_engine import TIGHT


def _keyed(rid, tokens: int, keys) -> Request:
    return Request(rid, tokens, 4, prefix_hashes=tuple(keys))


# ---------------------------------------------------------------------------------------------- block manager


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
    with pytest.raises(Exception, match="more device blocks"):
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
