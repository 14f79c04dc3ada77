"""The OpenAI-compatible HTTP server: FastAPI endpoints over an ``AsyncLLMEngine``.

    engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(...)))
    app = build_app(engine, "SmolLM2-135M-Instruct")
    run_server(app, listen("127.0.0.1", 8000))              # or: with serve_in_thread(app) as url: ...

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text: ``jserve.engine.metrics``), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, and vLLM's ``POST /tokenize`` and ``POST /detokenize``
(request fields in ``jserve.openai_protocol``; user guide in docs/server.md). This module holds the endpoints,
the request's life cycle and the uvicorn runners; ``jserve.server_requests`` checks bodies and plans the
engine requests, ``jserve.server_fanout`` runs them, ``jserve.server_responses`` writes the answers.

Threads: the engine runs on its own thread (it owns the scheduler, the KV pools and every compiled step);
the server's event loop only tokenizes, validates and awaits the engine's streams, so a slow step never
blocks accepting or refusing other requests. Each request is checked in full (JSON, types, model name,
every prompt, context length, sampling values) before it reaches the engine. A request becomes one engine
request per prompt and sample (``n``, ``best_of``, prompt lists); the engine's own refusals (a request the
scheduler can never fit) are awaited, for the first sample of every prompt, before any response starts, so a
refused request gets a 400 with an OpenAI error body, streaming or not, and its other engine requests are
aborted. A client that disconnects aborts all of them: a streaming response is cancelled by Starlette when
the client goes, a non-streaming one races the engine against a disconnect watch; either way the engine
frees their pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jserve.openai_protocol import ApiError
from jserve.server_fanout import FanOut
from jserve.server_requests import Prepared, RequestPreparer, ServedModel
from jserve.server_responses import ResponseWriter

__all__ = ["build_app", "listen", "run_server", "serve_in_thread", "server_url", "ServedModel"]


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def default_max_body_bytes(max_model_len: int) -> int:
    """The request body limit: 256 bytes per token of context (a token is rarely more than a few dozen bytes of
    JSON, even escaped), at least 1 MiB."""
    return max(1 << 20, 256 * max_model_len)


class OpenAIServer:
    """The endpoints' logic (one instance per app)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_body_bytes: int | None = None):
        self.engine = engine
        eng = engine.engine
        self.tokenizer = eng.tokenizer
        self.model = ServedModel(model_name, eng.max_model_len, eng.model.config.vocab_size, int(time.time()),
                                 eng.runner.config.prompt_logprobs)
        self.max_body_bytes = max_body_bytes or default_max_body_bytes(eng.max_model_len)
        self.preparer = RequestPreparer(self.model, self.tokenizer)
        self.writer = ResponseWriter(self.tokenizer, model_name, eng.config.enable_prefix_caching)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with a 413 past ``max_body_bytes`` (by its Content-Length before reading,
        or while reading a chunked one): a larger body cannot hold a prompt that fits the context."""
        limit = self.max_body_bytes

        def too_large(size: str) -> ApiError:
            return ApiError(413, f"request body of {size} bytes is over this server's limit of {limit} bytes "
                                 f"(the model's context is {self.model.max_model_len} tokens)")

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str | None) -> None:
        self.preparer.check_model(name)

    # ------------------------------------------------------------------ running

    async def _race_disconnect(self, awaitable, request: Request):
        """``await awaitable`` unless the client disconnects first (then it is cancelled: _ClientGone)."""
        task = asyncio.ensure_future(awaitable)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watch.cancel()
            raise
        if task in done:
            watch.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
        raise _ClientGone()

    @staticmethod
    def _check_refusals(prep: Prepared, fan: FanOut, outs) -> None:
        """A 400 naming the prompt if the engine refused one of ``outs`` (``(k, output)`` pairs)."""
        for k, out in outs:
            if out.finish_reason == "error":
                i = fan.subs[k].prompt
                msg = out.error or "the engine refused the request"
                raise ApiError(400, f"{prep.prompt_field(i)}: {msg}" if prep.batched else msg, prep.prompt_field(i))

    async def handle(self, request: Request, kind: str) -> Response:
        # parsing and tokenizing large prompts takes a while: off the event loop, which keeps serving
        prep = await asyncio.to_thread(self.preparer.prepare, await self._body(request), kind)
        fan = FanOut(self.engine, prep.sub_requests())
        leaders = [k for k, s in enumerate(fan.subs) if s.sample == 0]  # a refusal is the same for every sample
        try:
            seen = await self._race_disconnect(fan.wait_started(leaders), request)
            self._check_refusals(prep, fan, seen)
            if prep.stream:
                return StreamingResponse(self.writer.chunks(prep, fan), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"}, background=BackgroundTask(fan.abort))
            finals = await self._race_disconnect(fan.all_finals(), request)
            self._check_refusals(prep, fan, enumerate(finals))
        except _ClientGone:
            fan.abort()
            return Response(status_code=499)
        except RuntimeError as e:  # the engine thread stopped
            fan.abort()
            raise ApiError(500, str(e)) from None
        except BaseException:  # a refusal (ApiError), a cancelled handler
            fan.abort()
            raise
        # building and serializing a large body (prompt log-probabilities: ~0.2 s for 4,000 tokens x 21 ids) is
        # off the event loop too
        return await asyncio.to_thread(lambda: JSONResponse(self.writer.response(prep, finals)))

    # ------------------------------------------------------------------ small endpoints

    def models_body(self) -> dict:
        m = self.model
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                             "owned_by": "jserve", "max_model_len": m.max_model_len}]}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def build_app(engine: AsyncLLMEngine, model_name: str, max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (the only name requests may give as ``model``).
    Request bodies over ``max_body_bytes`` get a 413 (default ``default_max_body_bytes(max_model_len)``)."""
    server = OpenAIServer(engine, model_name, max_body_bytes)
    app = FastAPI(title="jserve", summary="OpenAI-compatible API over the jserve engine")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path!r}", 405: f"method {request.method} is not allowed on "
               f"{request.url.path!r}"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, msg, code={404: "not_found"}.get(exc.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:  # Prometheus' text format (jserve/engine/metrics.py)
        core = engine.engine
        text = core.metrics.render(core.stats, labels={"model_name": server.model.name})
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(server.models_body())

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        server.check_model(name)
        return JSONResponse(server.models_body()["data"][0])

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:  # vLLM's
        return JSONResponse(await asyncio.to_thread(server.preparer.tokenize, await server._body(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:  # vLLM's
        return JSONResponse(await asyncio.to_thread(server.preparer.detokenize, await server._body(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, "chat")

    return app


# ------------------------------------------------------------------------------------------ running it


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to (host, port) for ``run_server`` (bind first, so a busy port fails before the
    engine spends minutes compiling). ``port=0`` picks a free port. Raises ``OSError`` when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def server_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: FastAPI, on_ready: Callable[[], None] | None, log_level: str):
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_ready is not None and self.started:
                on_ready()

    return _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


def run_server(app: FastAPI, sock: socket.socket, on_ready: Callable[[str], None] | None = None,
               log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` (from ``listen``) until interrupted (SIGINT/SIGTERM); ``on_ready(url)`` runs
    once the socket accepts connections."""
    url = server_url(sock)
    server = _uvicorn_server(app, (lambda: on_ready(url)) if on_ready else None, log_level)
    server.run(sockets=[sock])


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn on a background thread; yields its URL, stops it on exit (tests, notebooks)."""
    sock = listen(host, port)
    ready = threading.Event()
    server = _uvicorn_server(app, ready.set, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="jserve-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see uvicorn's log above)")
        yield server_url(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
