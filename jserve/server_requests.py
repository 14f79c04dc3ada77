"""From an HTTP request body to the engine requests that answer it (used by ``jserve.server``).

``RequestPreparer.prepare`` parses and checks one body in full (JSON, types, model name, every prompt,
context length, sampling values; ``jserve.openai_protocol`` does the field-level part) and returns a
``Prepared`` request, or raises ``ApiError`` naming the problem, before anything reaches the engine.

One HTTP request fans out to several engine requests (``SubRequest``): one per prompt of a completion batch
and per sample, ``best_of`` samples per prompt (``n`` when there is no ``best_of``), in prompt-major order:
sub-request ``k = prompt_index * per_prompt + j``. With a ``seed``, sample ``j`` uses seed ``seed + j``
(mod 2**32; vLLM's rule), so a response is reproducible and its samples differ; sample 0 is what the same
request with ``n = 1`` returns. When ``best_of > n`` picks by cumulative log-probability, the sub-requests ask
the engine for log-probabilities (``logprobs=0``) even if the client did not; ``Prepared.logprobs`` says
whether the client sees them. vLLM's ``prompt_logprobs`` is asked of the engine once per prompt, by its
sample 0 (``Prepared.prompt_k``): the prompt's log-probabilities are the same for every sample, and its other
choices reuse them; with ``echo`` and ``logprobs`` every sample asks (each choice's ``logprobs`` starts with
them), for the larger of the two top-k.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from jserve.engine.sampling import SamplingParams
from jserve.openai_protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, parse_body, sampling_params)
from jserve.tokenizer import TokenizerError, check_template_kwargs

__all__ = ["DEFAULT_COMPLETION_TOKENS", "Prepared", "RequestPreparer", "ServedModel", "SubRequest", "child_seed"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class ServedModel:
    """What the server tells clients about the model, and the limits it checks requests against."""

    name: str
    max_model_len: int
    vocab_size: int
    created: int
    prompt_logprobs: bool = False  # the engine serves SamplingParams.prompt_logprobs (echo with logprobs,
    # the prompt_logprobs field)


def child_seed(seed: int | None, j: int) -> int | None:
    """The seed of sample ``j`` of a request seeded with ``seed`` (None: the engine draws one per request)."""
    return None if seed is None else (seed + j) % 2**32


@dataclass(frozen=True)
class SubRequest:
    """One engine request of an HTTP request: sample ``sample`` of prompt ``prompt``."""

    request_id: str
    prompt: int  # index of its prompt in the request
    sample: int  # 0 .. per_prompt - 1
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Prepared:
    """A validated request, ready for the engine. ``prompts[i]`` has its own ``params[i]`` (the default
    ``max_tokens`` depends on the prompt's length)."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int  # choices returned per prompt
    best_of: int  # samples generated per prompt (>= n); the n with the highest cumulative logprob are returned
    logprobs: bool  # the client asked for log-probabilities
    batched: bool  # ``prompt`` was a list of prompts (errors and ids then name ``prompt[i]``)
    stream: bool
    include_usage: bool
    return_token_ids: bool
    echo: list[str] | None = None  # completions' echo: each prompt's text, put before its choices' text
    echo_only: bool = False  # echo with max_tokens 0: the choices hold the prompt alone
    prompt_logprobs: int | None = None  # vLLM's field: the prompt tokens' top-k the client asked for
    request_id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.request_id = ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def field(self) -> str:
        """The request field that holds the prompt."""
        return "prompt" if self.kind == "completion" else "messages"

    def prompt_field(self, i: int) -> str:
        """The name of prompt ``i`` in errors: ``prompt[i]`` in a batch, else the field itself."""
        return f"{self.field}[{i}]" if self.batched else self.field

    def prompt_k(self, sample: int) -> int | None:
        """``SamplingParams.prompt_logprobs`` of sample ``sample`` (of any prompt): None, or the larger of echo's
        ``logprobs`` (every sample) and the ``prompt_logprobs`` field (sample 0; the others reuse its)."""
        echo_k = self.params[0].prompt_logprobs  # set by echo with logprobs, the same for every prompt
        if echo_k is None:
            return self.prompt_logprobs if sample == 0 else None
        return max(echo_k, self.prompt_logprobs or 0)

    def leader(self, i: int) -> int:
        """The sub-request index of sample 0 of prompt ``i`` (it holds the prompt's log-probabilities)."""
        return i * self.best_of

    def sub_requests(self) -> list[SubRequest]:
        """Every engine request, prompt-major (``k = i * best_of + j``)."""
        subs = []
        for i, (ids, params) in enumerate(zip(self.prompts, self.params)):
            if self.best_of > self.n and params.logprobs is None:
                params = dataclasses.replace(params, logprobs=0)  # the engine's logprobs rank the candidates
            for j in range(self.best_of):
                p = params if params.seed is None else dataclasses.replace(params, seed=child_seed(params.seed, j))
                if p.prompt_logprobs != self.prompt_k(j):
                    p = dataclasses.replace(p, prompt_logprobs=self.prompt_k(j))
                subs.append(SubRequest(f"{self.request_id}-{i * self.best_of + j}", i, j, ids, p))
        return subs


def _encode(tokenizer, text: str, field: str, **kwargs) -> list[int]:
    """``tokenizer.encode(text)``; text it refuses (a lone surrogate from a JSON escape) is a 400 naming ``field``."""
    try:
        return tokenizer.encode(text, **kwargs)
    except ValueError as e:
        raise ApiError(400, f"{field!r} cannot be tokenized: {e}", field) from None


class RequestPreparer:
    """Checks request bodies against the served model and tokenizes their prompts."""

    def __init__(self, model: ServedModel, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")

    def _completion_prompt(self, prompt: str | list[int], field: str) -> list[int]:
        label = "the prompt" if field == "prompt" else field
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send 'prompt' as a list of token ids", field)
            ids = _encode(self.tokenizer, prompt, field, add_special_tokens=True)  # BOS where the model uses one
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ApiError(400, f"{field} token id {bad[0]} is outside the vocabulary "
                                    f"[0, {self.model.vocab_size})", field)
        if not ids:
            raise ApiError(400, f"{label} is empty", field)
        return ids

    def _chat_prompt(self, req: ChatCompletionRequest | TokenizeRequest) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer, so it cannot render chat messages; use "
                                "/v1/completions with token ids", "messages")
        if tok.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        if not req.messages:
            raise ApiError(400, "'messages' is empty", "messages")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in req.messages]
        try:
            kwargs = check_template_kwargs(req.chat_template_kwargs)
        except TokenizerError as e:
            raise ApiError(400, str(e), "chat_template_kwargs") from None
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except Exception as e:  # jinja errors and the template's own raise_exception
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        ids = _encode(tok, text, "messages", add_special_tokens=False)
        if not ids:
            raise ApiError(400, "the rendered chat prompt is empty", "messages")
        return ids

    def tokenize(self, raw: bytes) -> dict:
        """vLLM's ``POST /tokenize``: the ids /v1/completions would feed the model for ``prompt``, or
        /v1/chat/completions for ``messages`` (an empty ``prompt`` string gives none)."""
        req = parse_body(raw, TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if req.messages is not None:
            ids = self._chat_prompt(req)
        elif not req.prompt:  # "" or []
            ids = []
        else:
            ids = self._completion_prompt(req.prompt, "prompt")
        return {"count": len(ids), "max_model_len": self.model.max_model_len, "tokens": ids}

    def detokenize(self, raw: bytes) -> dict:
        """vLLM's ``POST /detokenize``: ``{"prompt": the text of tokens}``."""
        req = parse_body(raw, DetokenizeRequest)
        self.check_model(req.model)
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so token ids have no text", "tokens")
        bad = next((t for t in req.tokens if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'tokens' holds {bad}, outside the vocabulary [0, {self.model.vocab_size})",
                           "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _params(self, req, kind: str, ids: list[int], field: str) -> SamplingParams:
        """The prompt's ``SamplingParams``, its context length checked (``field`` names the prompt)."""
        limit = self.model.max_model_len
        label = "the prompt" if field in ("prompt", "messages") else field
        if len(ids) >= limit:
            raise ApiError(400, f"{label} has {len(ids)} tokens; this model's maximum context length is {limit} "
                                "tokens (prompt plus at least one new token)", field, code="context_length_exceeded")
        max_tokens, max_field = req.max_tokens, "max_tokens"
        if kind == "chat" and req.max_completion_tokens is not None:
            max_tokens, max_field = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS if kind == "completion" else limit - len(ids)
            max_tokens = min(max_tokens, limit - len(ids))
        if max_tokens == 0 and kind == "completion" and req.echo:  # scoring the prompt: one token, not returned
            max_tokens = 1
        params = sampling_params(req, max_tokens)
        if params.logit_bias and params.logit_bias[-1][0] >= self.model.vocab_size:  # sorted by id
            raise ApiError(400, f"'logit_bias' names token id {params.logit_bias[-1][0]}, outside the vocabulary "
                                f"[0, {self.model.vocab_size})", "logit_bias")
        if len(ids) + max_tokens > limit:
            asker = "the request" if label == "the prompt" else field
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; {asker} asks for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} in {max_field!r})",
                           max_field, code="context_length_exceeded")
        return params

    def prepare(self, raw: bytes, kind: str) -> Prepared:
        """The body ``raw`` of a ``kind`` ("completion" | "chat") request, checked and tokenized."""
        model = CompletionRequest if kind == "completion" else ChatCompletionRequest
        req = parse_body(raw, model)
        self.check_model(req.model)
        if req.prompt_logprobs is not None and not self.model.prompt_logprobs:
            raise ApiError(400, "'prompt_logprobs' needs a server started with prompt log-probabilities "
                                "(jserve serve --enable-prompt-logprobs); this one was started without them",
                           "prompt_logprobs")
        if kind == "completion":
            texts, batched = req.prompt_list()
            fields = [f"prompt[{i}]" if batched else "prompt" for i in range(len(texts))]
            prompts = [self._completion_prompt(t, f) for t, f in zip(texts, fields)]
        else:
            batched, fields, prompts = False, ["messages"], [self._chat_prompt(req)]
        params = [self._params(req, kind, ids, f) for ids, f in zip(prompts, fields)]
        if params[0].stop and self.tokenizer is None:  # the engine would refuse every prompt, naming the prompt
            raise ApiError(400, "'stop' needs a tokenizer to match text; this model has none (use "
                                "'stop_token_ids')", "stop")
        echo = None
        if kind == "completion" and req.echo:
            echo = self._echo(req, texts, prompts)
            if req.logprobs is not None:  # the prompt's tokens get log-probabilities too
                params = [dataclasses.replace(p, prompt_logprobs=req.logprobs) for p in params]
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        best_of = getattr(req, "best_of", None) or req.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(kind, prompts, params, req.n, best_of, params[0].logprobs is not None, batched, req.stream,
                        include_usage, req.return_token_ids, echo, echo is not None and req.max_tokens == 0,
                        prompt_logprobs=req.prompt_logprobs)

    def _echo(self, req: CompletionRequest, texts: list, prompts: list[list[int]]) -> list[str]:
        """The text each choice starts with under ``echo``: the prompt as sent (a string), or its decoding
        (token ids)."""
        if req.logprobs is not None and not self.model.prompt_logprobs:
            raise ApiError(400, "'echo' with 'logprobs' needs the prompt's log-probabilities; this server was "
                                "started without them (jserve serve --enable-prompt-logprobs)", "echo")
        out = []
        for t, ids in zip(texts, prompts):
            if isinstance(t, str):
                out.append(t)
            else:
                out.append("" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True))
        return out
