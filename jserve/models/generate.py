"""``greedy_generate``: prefill then decode, one token per step, through the paged KV path.

A simple driver for tests and users before the engine exists: it allocates pages for the whole generation,
packs every prompt into one ragged prefill step (token count padded to a power of two), then runs
decode-only steps (one token per sequence) until ``max_new_tokens``. Shapes stay fixed per phase, so it
compiles twice per bucket.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .model import Model
from .paged import PageAllocator, SeqChunk, bucket, build_step, pages_needed

__all__ = ["greedy_generate"]


def greedy_generate(
    model: Model,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    page_size: int = 16,
    stop_at_eos: bool = False,
) -> list[int] | list[list[int]]:
    """Greedy (argmax) continuation of one prompt (a list of ids) or a batch of prompts (list of lists).
    Returns the new ids only, ``max_new_tokens`` of them (fewer with ``stop_at_eos``)."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], (int, np.integer))
    prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    for p in prompts:
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt of {len(p)} + {max_new_tokens} new tokens exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if max(p) >= cfg.vocab_size or min(p) < 0:
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    per_seq = [pages_needed(len(p) + max_new_tokens, page_size) for p in prompts]
    alloc = PageAllocator(sum(per_seq))
    pages = [alloc.allocate(n) for n in per_seq]
    m = max(per_seq)
    caches = model.allocate_kv_caches(alloc.num_pages, page_size)
    eos = cfg.eos_token_id if stop_at_eos else None

    chunks = [SeqChunk(p, 0, pg) for p, pg in zip(prompts, pages)]
    total = sum(len(p) for p in prompts)
    step = build_step(chunks, page_size, num_tokens=bucket(total), pages_per_seq=m)
    logits, caches = model.step(step.input_ids, step.positions, caches, step.metadata)
    next_ids = np.asarray(jnp.argmax(logits, axis=-1))
    out = [[int(t)] for t in next_ids]
    done = [eos is not None and o[-1] == eos for o in out]
    lengths = [len(p) for p in prompts]
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        chunks = [SeqChunk([o[-1]], n, pg) for o, n, pg in zip(out, lengths, pages)]
        step = build_step(chunks, page_size, pages_per_seq=m)
        logits, caches = model.step(step.input_ids, step.positions, caches, step.metadata)
        next_ids = np.asarray(jnp.argmax(logits, axis=-1))
        for i, t in enumerate(next_ids):
            lengths[i] += 1
            if not done[i]:
                out[i].append(int(t))
                done[i] = eos is not None and int(t) == eos
    return out[0] if single else out
