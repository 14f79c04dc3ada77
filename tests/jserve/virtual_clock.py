"""A deterministic engine clock for tests whose scheduling depends on elapsed time."""

from __future__ import annotations

import itertools


def virtual_clock(llm, tick: float = 0.004):
    """Run ``llm``'s engine on a virtual clock that advances ``tick`` seconds at every reading.

    FastServe's MLFQ demotes a request by the time it has run, so which requests it preempts depends on how
    long steps take. On the wall clock a test's preemptions would change with the machine's speed (and with
    the CPU kernels in use); on this clock every machine makes the same scheduling decisions."""
    llm.engine.now = virtual_now(tick)
    return llm


def virtual_now(tick: float = 0.004):
    """A clock function that advances ``tick`` seconds at every reading (``virtual_clock``'s; set it on an
    engine that must get its own clock back, e.g. with ``monkeypatch.setattr(engine, "now", virtual_now())``)."""
    ticks = itertools.count()
    return lambda: next(ticks) * tick
