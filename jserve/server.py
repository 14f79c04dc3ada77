"""The OpenAI-compatible HTTP server: FastAPI endpoints over an ``AsyncLLMEngine``.

    engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(...)))
    app = build_app(engine, "SmolLM2-135M-Instruct")
    run_server(app, listen("127.0.0.1", 8000))              # or: with serve_in_thread(app) as url: ...

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(request fields in ``jserve.openai_protocol``; user guide in docs/server.md).

Threads: the engine runs on its own thread (it owns the scheduler, the KV pools and every compiled step);
the server's event loop only tokenizes, validates and awaits the engine's streams, so a slow step never
blocks accepting or refusing other requests. Each request is checked in full (JSON, types, model name,
prompt, context length, sampling values) before it reaches the engine; the engine's own refusals (a request
the scheduler can never fit) are awaited before any response starts, so every refused request gets a 400
with an OpenAI error body, streaming or not. A client that disconnects aborts its request: a streaming
response is cancelled by Starlette when the client goes, a non-streaming one races the engine against a
disconnect watch; either way the engine frees the request's pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.outputs import RequestOutput
from jserve.engine.sampling import SamplingParams
from jserve.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LogprobRenderer,
    parse_body,
    sampling_params,
)

__all__ = ["build_app", "listen", "run_server", "serve_in_thread", "server_url", "ServedModel"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class ServedModel:
    """What the server tells clients about the model, and the limits it checks requests against."""

    name: str
    max_model_len: int
    vocab_size: int
    created: int


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ------------------------------------------------------------------------------------------ streaming text


class _TextDeltas:
    """Turns a request's successive outputs into text increments whose concatenation is the final text.

    While the request runs, the visible text is the decoding of the ids so far minus a trailing incomplete
    UTF-8 sequence (decoded as U+FFFD) and minus the longest tail that could still grow into a stop string
    (the engine cuts stop strings from the final text; text already sent cannot be taken back). When the
    request finishes, the engine's final ``text`` is what remains to send."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.sent = ""

    def _visible(self, out: RequestOutput) -> str:
        if out.finished:
            return out.text
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=self.params.skip_special_tokens)
        text = text.rstrip("\ufffd")
        for start in range(max(0, len(text) - max((len(s) for s in self.params.stop), default=0)), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.params.stop):
                return text[:start]
        return text

    def next(self, out: RequestOutput) -> str:
        text = self._visible(out)
        if len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


def _sse(payload: dict | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# ------------------------------------------------------------------------------------------ the server


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    kind: str  # "completion" | "chat"
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool
    request_id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.request_id = ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())


def _encode(tokenizer, text: str, field: str, **kwargs) -> list[int]:
    """``tokenizer.encode(text)``; text it refuses (a lone surrogate from a JSON escape) is a 400 naming ``field``."""
    try:
        return tokenizer.encode(text, **kwargs)
    except ValueError as e:
        raise ApiError(400, f"{field!r} cannot be tokenized: {e}", field) from None


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
        self.model = ServedModel(model_name, eng.max_model_len, eng.model.config.vocab_size, int(time.time()))
        self.max_body_bytes = max_body_bytes or default_max_body_bytes(eng.max_model_len)

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

    # ------------------------------------------------------------------ validation

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send 'prompt' as a list of token ids", "prompt")
            ids = _encode(self.tokenizer, prompt, "prompt")
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.vocab_size})",
                               "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.tokenizer
        if tok is None or not tok.chat_template:
            raise ApiError(400, f"the model {self.model.name!r} has no chat template; use /v1/completions",
                           "messages", code="chat_template_missing")
        if not req.messages:
            raise ApiError(400, "'messages' is empty", "messages")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # jinja errors and the template's own raise_exception
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        ids = _encode(tok, text, "messages", add_special_tokens=False)
        if not ids:
            raise ApiError(400, "the rendered chat prompt is empty", "messages")
        return ids

    def _prepare(self, raw: bytes, kind: str) -> _Prepared:
        model = CompletionRequest if kind == "completion" else ChatCompletionRequest
        req = parse_body(raw, model)
        self._check_model(req.model)
        ids = self._completion_prompt(req) if kind == "completion" else self._chat_prompt(req)
        limit = self.model.max_model_len
        field = "prompt" if kind == "completion" else "messages"
        if len(ids) >= limit:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length is {limit} "
                                "tokens (prompt plus at least one new token)", field, code="context_length_exceeded")
        max_tokens, max_field = req.max_tokens, "max_tokens"
        if kind == "chat" and req.max_completion_tokens is not None:
            max_tokens, max_field = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS if kind == "completion" else limit - len(ids)
            max_tokens = min(max_tokens, limit - len(ids))
        params = sampling_params(req, max_tokens)
        if len(ids) + max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request asks for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} in {max_field!r})",
                           max_field, code="context_length_exceeded")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        return _Prepared(kind, ids, params, req.stream, include_usage, req.return_token_ids)

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

    async def handle(self, request: Request, kind: str) -> Response:
        # parsing and tokenizing a large prompt takes a while: off the event loop, which keeps serving
        prep = await asyncio.to_thread(self._prepare, await self._body(request), kind)
        stream = self.engine.generate(prep.prompt_ids, prep.params, request_id=prep.request_id)
        try:
            first = await self._race_disconnect(anext(stream), request)
        except _ClientGone:
            self.engine.abort(prep.request_id)
            return Response(status_code=499)
        except RuntimeError as e:  # the engine thread stopped
            raise ApiError(500, str(e)) from None
        if first.finish_reason == "error":
            raise ApiError(400, first.error or "the engine refused the request", "prompt" if kind == "completion"
                           else "messages")
        if prep.stream:
            return StreamingResponse(self._chunks(prep, stream, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(self.engine.abort, prep.request_id))

        async def last() -> RequestOutput:
            out = first
            while not out.finished:
                out = await anext(stream)
            return out

        try:
            final = await self._race_disconnect(last(), request)
        except _ClientGone:
            self.engine.abort(prep.request_id)
            return Response(status_code=499)
        except RuntimeError as e:
            raise ApiError(500, str(e)) from None
        return JSONResponse(self._response(prep, final))

    # ------------------------------------------------------------------ response bodies

    def _usage(self, prep: _Prepared, out: RequestOutput) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": len(prep.prompt_ids), "completion_tokens": n,
                "total_tokens": len(prep.prompt_ids) + n}

    def _head(self, prep: _Prepared, chunk: bool) -> dict:
        if prep.kind == "completion":
            obj = "text_completion"  # OpenAI names completion chunks the same
        else:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": prep.request_id, "object": obj, "created": prep.created, "model": self.model.name}

    def _logprobs(self, prep: _Prepared, out: RequestOutput, start: int = 0,
                  render: LogprobRenderer | None = None) -> dict | None:
        """The choice's ``logprobs`` object for tokens ``start ..`` (None when the request did not ask);
        a stream passes its own ``render`` (it keeps the text offsets of earlier chunks)."""
        if out.logprobs is None:
            return None
        render = render or LogprobRenderer(self.tokenizer, prep.params)
        ids = out.token_ids[: len(out.logprobs)]  # aligned: one dict per token
        return (render.completion if prep.kind == "completion" else render.chat)(ids, out.logprobs, start)

    def _response(self, prep: _Prepared, out: RequestOutput) -> dict:
        lp = self._logprobs(prep, out)
        if prep.kind == "completion":
            choice = {"index": 0, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                      "finish_reason": out.finish_reason}
        body = self._head(prep, chunk=False) | {"choices": [choice], "usage": self._usage(prep, out)}
        if prep.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
            body["prompt_token_ids"] = list(prep.prompt_ids)
        return body

    def _chunk(self, prep: _Prepared, text: str | None, new_ids: list[int], finish: str | None,
               role: bool = False, logprobs: dict | None = None) -> dict:
        if prep.kind == "completion":
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if prep.return_token_ids:
            choice["token_ids"] = list(new_ids)
        body = self._head(prep, chunk=True) | {"choices": [choice]}
        if prep.include_usage:
            body["usage"] = None
        return body

    async def _chunks(self, prep: _Prepared, stream: AsyncIterator[RequestOutput],
                      first: RequestOutput) -> AsyncIterator[str]:
        """The SSE body: a role chunk (chat), one chunk per engine output that adds text (or ids, with
        ``return_token_ids``; the last one carries ``finish_reason``), a usage chunk if asked, ``[DONE]``.
        With logprobs, a chunk carries those of every token not reported by an earlier chunk.
        Cancelled when the client disconnects; closing ``stream`` then aborts the request."""
        deltas = _TextDeltas(self.tokenizer, prep.params)
        reported = 0  # tokens whose logprobs earlier chunks carried
        render = LogprobRenderer(self.tokenizer, prep.params)
        try:
            if prep.kind == "chat":
                yield _sse(self._chunk(prep, None, [], None, role=True))
            out = first
            while True:
                text = deltas.next(out)
                if text or out.finished or prep.return_token_ids:  # no empty chunks for held-back text
                    lp = self._logprobs(prep, out, reported, render)
                    reported = len(out.token_ids)
                    yield _sse(self._chunk(prep, text, out.new_token_ids, out.finish_reason, logprobs=lp))
                if out.finished:
                    break
                out = await anext(stream)
            if prep.include_usage:
                yield _sse(self._head(prep, chunk=True) | {"choices": [], "usage": self._usage(prep, out)})
        except RuntimeError as e:  # the engine thread stopped mid-stream: say so in the stream
            yield _sse(ApiError(500, str(e)).body())
        finally:
            await stream.aclose()
        yield _sse("[DONE]")

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

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(server.models_body())

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        server._check_model(name)
        return JSONResponse(server.models_body()["data"][0])

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
