"""``AsyncLLMEngine``: an ``LLMEngine`` on a background thread, for asyncio servers.

The engine thread owns the engine (the scheduler, the KV pools, every compiled step; see
``jserve.engine.kv_cache`` for the buffer rules). Other threads never touch it: ``generate`` and ``abort``
put commands on a thread-safe queue that the engine thread drains between iterations, and the engine thread
hands each changed ``RequestOutput`` (a snapshot) back to the caller's event loop with
``call_soon_threadsafe``; ``generate`` fills in the snapshot's text so far there, in the caller's thread
(``IncrementalDetokenizer``), not on the engine thread. When no request is live the thread sleeps on the
queue. Each stream has its own key, which the engine thread ties to its request id when it adds the request:
outputs go to the stream of the request that made them, so a stream that reuses the id of one left early
never sees that one's outputs. A request the engine cannot take (a duplicate live id, input that ``add_request`` could not even
refuse) comes back finished with an error; when the thread ends (``shutdown``, or a failure) every waiting
stream raises ``RuntimeError``.

    engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(...)))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=32), request_id="a"):
        ...            # out.new_token_ids, out.text (so far; final once out.finished)
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from typing import AsyncIterator, Hashable

from .engine import LLMEngine, check_request_id
from .outputs import IncrementalDetokenizer, RequestOutput
from .sampling import SamplingParams

__all__ = ["AsyncLLMEngine"]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        # stream key -> (its event loop, its queue); caller side: request id -> the key of its live stream
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._live: dict[Hashable, int] = {}
        self._stream_keys = itertools.count()
        self._owner: dict[Hashable, int] = {}  # engine thread: request id -> the key of the stream it feeds
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._closed = False  # set by the engine thread when it ends (shutdown or failure)
        self._thread = threading.Thread(target=self._loop, name="jserve-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------- caller side

    async def generate(
        self, prompt, params: SamplingParams | dict | None = None, request_id: Hashable | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (one per step that changed it; the last is finished), each with the
        text so far (``IncrementalDetokenizer``: a prefix of the next one's; the last one's is the engine's
        final text). Cancelling the iteration (e.g. a client disconnect) aborts the request."""
        if self.error is not None:
            raise RuntimeError(f"the engine thread stopped: {self.error!r}")
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        rid = f"req-{next(self._ids)}" if request_id is None else check_request_id(request_id)
        if rid in self._live:  # two streams of one id: the engine would refuse the second request
            raise ValueError(f"request id {rid!r} is already live")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        key = next(self._stream_keys)
        self._streams[key] = (loop, q)
        self._live[rid] = key
        if self._closed:  # the engine thread ended before it could see this stream
            self._streams.pop(key, None)
            self._live.pop(rid, None)
            raise RuntimeError("the engine is shut down" if self.error is None else
                               f"the engine thread stopped: {self.error!r}")
        self._commands.put(("add", rid, prompt, params, key))
        text = IncrementalDetokenizer(self.engine.tokenizer, params)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    if self.error is None:
                        raise RuntimeError("the engine was shut down before the request finished")
                    raise RuntimeError(f"the engine thread stopped: {item!r}") from item
                item.text = text.update(item)  # the engine thread's snapshot: this thread's own copy
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(key, None)
            if self._live.get(rid) == key:
                del self._live[rid]
            if not finished:
                self._commands.put(("abort", rid, key))

    def abort(self, request_id: Hashable) -> None:
        self._commands.put(("abort", request_id, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread. Streams still running raise ``RuntimeError``, and so does a later
        ``generate``."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # ---------------------------------------------------------------------------------- engine thread

    def _emit(self, out: RequestOutput, key: int | None = None) -> None:
        """Hand ``out`` to the stream of its request (``key``: that stream, when the request is not live)."""
        rid = out.request_id
        key = self._owner.get(rid) if key is None else key
        if out.finished:
            self._owner.pop(rid, None)
        target = self._streams.get(key)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, out.snapshot())
            except RuntimeError:  # the caller's event loop is closed: nobody will read this stream
                self._streams.pop(key, None)
                if not out.finished:
                    self._owner.pop(rid, None)
                    self.engine.abort(rid)

    def _run_command(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, key = cmd
            try:
                out = self.engine.add_request(prompt, params, request_id=rid)
            except Exception as e:  # a duplicate live id, or input add_request could not even refuse
                msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                out = RequestOutput(rid, None, [], finish_reason="error", error=msg)
                self._emit(out, key)
                return
            self._owner[rid] = key
            if out.finished:
                self._emit(out)
        elif cmd[0] == "abort":
            _, rid, key = cmd
            if key is not None and self._owner.get(rid) != key:  # that stream's request is over already
                return
            out = self.engine.get_output(rid)
            if self.engine.abort(rid) and out is not None:
                self._emit(out)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                    self._run_command(cmd)
                    while True:  # drain whatever else arrived
                        self._run_command(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._emit(out)
        except BaseException as e:  # surface the failure to every waiting caller
            self.error = e
            self._closed = True
            self._fail_streams(e)
            return
        self._closed = True  # shut down: callers still waiting would otherwise wait forever
        self._fail_streams(RuntimeError("the engine was shut down"))

    def _fail_streams(self, error: BaseException) -> None:
        for loop, q in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):  # that caller's event loop is already closed
                loop.call_soon_threadsafe(q.put_nowait, error)
