"""The KV cache is updated in place: a compiled decode step never copies a whole page pool.

A one-token step is the case that regressed once: XLA rewrote the one-token scatter, through a reshape of
the pages to flat slots, into a dynamic-update-slice that copied both page pools of every layer (a CPU
batch-1 decode step cost 19x a batch-2 one at 1024 pages). The check reads the optimized HLO, so it
measures no time and cannot be flaky.
"""

from __future__ import annotations

import re

import pytest

from jserve.models import SeqChunk, build_step, load

NUM_PAGES, PAGE = 256, 16


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_does_not_copy_the_page_pool(batch):
    model = load("tiny-llama", backend="reference")
    caches = model.allocate_kv_caches(NUM_PAGES, PAGE)
    chunks = [SeqChunk([7], 40, list(range(4 * b, 4 * b + 4))) for b in range(batch)]
    step = build_step(chunks, PAGE, pages_per_seq=4)
    hlo = model._step.lower(model.state, step.input_ids, step.positions, caches, step.metadata).compile().as_text()
    k_pages = caches[0][0]
    pool_shape = ",".join(str(d) for d in k_pages.shape)
    copies = [ln for ln in hlo.splitlines() if re.search(rf"\[{pool_shape}\]\S* copy\(", ln)]
    assert not copies, f"{len(copies)} whole-pool copies, e.g. {copies[0].strip()[:160]}"
