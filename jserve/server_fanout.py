"""Running one HTTP request's engine requests together (used by ``jserve.server``).

``FanOut`` starts every ``SubRequest`` of a request on the ``AsyncLLMEngine`` at once and merges their output
streams into one, in arrival order, as ``(k, RequestOutput)`` pairs (``k``: the sub-request's index).
``abort`` stops every sub-request still running (the client went away, one was refused, the stream was
cancelled): nothing of the request keeps running in the engine. ``best_choices`` picks ``best_of``'s winners.
"""

from __future__ import annotations

import asyncio
import collections

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.outputs import RequestOutput
from jserve.server_requests import SubRequest

__all__ = ["FanOut", "best_choices", "cumulative_logprob"]


class FanOut:
    """The merged output streams of a request's sub-requests. Create it inside the event loop."""

    def __init__(self, engine: AsyncLLMEngine, subs: list[SubRequest]):
        self.engine = engine
        self.subs = subs
        self.finals: dict[int, RequestOutput] = {}  # k -> its finished output, once it has one
        self.first: dict[int, RequestOutput] = {}  # k -> its first output (prompt log-probabilities complete)
        self._started: set[int] = set()  # sub-requests that have produced an output
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replay: collections.deque = collections.deque()  # outputs consumed by wait_started, not yet read
        self._closed = False
        self._tasks = [asyncio.ensure_future(self._pump(k, s)) for k, s in enumerate(subs)]

    async def _pump(self, k: int, sub: SubRequest) -> None:
        try:
            async for out in self.engine.generate(sub.prompt_ids, sub.params, request_id=sub.request_id):
                self._queue.put_nowait((k, out))
        except Exception as e:  # the engine thread stopped (RuntimeError): the reader raises it
            self._queue.put_nowait((k, e))

    async def _get(self) -> tuple[int, RequestOutput]:
        k, item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        self._started.add(k)
        self.first.setdefault(k, item)
        if item.finished:
            self.finals[k] = item
        return k, item

    @property
    def done(self) -> bool:
        """Every sub-request has finished and every output has been read."""
        return len(self.finals) == len(self.subs) and not self._replay and self._queue.empty()

    async def wait_started(self, ks) -> list[tuple[int, RequestOutput]]:
        """Wait until each sub-request in ``ks`` has produced an output (a token, or a refusal); returns the
        outputs read meanwhile, which ``next`` hands out again."""
        while not self._started.issuperset(ks):
            self._replay.append(await self._get())
        return list(self._replay)

    async def next(self) -> tuple[int, RequestOutput]:
        """The next output of any sub-request. Raises ``RuntimeError`` if the engine thread stopped."""
        if self._replay:
            return self._replay.popleft()
        return await self._get()

    async def all_finals(self) -> list[RequestOutput]:
        """Every sub-request's finished output, in sub-request order (waits for them)."""
        while len(self.finals) < len(self.subs):
            await self.next()
        self._replay.clear()
        return [self.finals[k] for k in range(len(self.subs))]

    def abort(self) -> None:
        """Abort every unfinished sub-request (idempotent): the engine frees its pages between two steps."""
        if self._closed:
            return
        self._closed = True
        for k, (task, sub) in enumerate(zip(self._tasks, self.subs)):
            if k not in self.finals:
                self.engine.abort(sub.request_id)  # queued after its "add": the engine drops it
                task.cancel()  # the stream's own cleanup aborts too (harmless twice)


def cumulative_logprob(out: RequestOutput) -> float:
    """The sum of the log-probabilities of ``out``'s generated tokens (needs ``SamplingParams.logprobs``)."""
    if out.logprobs is None:
        raise ValueError(f"request {out.request_id!r} has no log-probabilities")
    return sum(d[t] for t, d in zip(out.token_ids, out.logprobs))


def best_choices(candidates: list[RequestOutput], n: int) -> list[RequestOutput]:
    """The ``n`` candidates with the highest cumulative log-probability, best first (ties: the earlier)."""
    ranked = sorted(range(len(candidates)), key=lambda i: (-cumulative_logprob(candidates[i]), i))
    return [candidates[i] for i in ranked[:n]]
