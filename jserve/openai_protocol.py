"""The OpenAI API's request bodies and errors as the jserve server accepts them (``jserve.server`` serves them).

``CompletionRequest`` and ``ChatCompletionRequest`` are strict pydantic models: a field of the wrong JSON type
or a field the API does not have is refused, never coerced or ignored. OpenAI fields that jserve does not
implement (``suffix``, tools...) are accepted only at their neutral value (absent, null, empty,
false), so a client that sends its defaults works and one that asks for the feature learns it is missing.
``n`` (1..128) and, for completions, ``best_of`` (n..128, not above n when streaming) and a list of prompts
are checked here (``MAX_CHOICES``, ``MAX_SEQUENCES``); ``jserve.server_requests`` fans them out.
``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (OpenAI's), ``repetition_penalty`` and
``min_tokens`` (vLLM's) are the ``SamplingParams`` fields of the same names (``logit_bias``'s keys, strings of
token ids in JSON, become ints here). Log-probabilities: ``logprobs`` (completions: an int 0..5) and
``logprobs`` + ``top_logprobs`` (chat: true and 0..20) become ``SamplingParams.logprobs``; vLLM's
``prompt_logprobs`` (both endpoints: 0..20) asks for the prompt tokens' (``jserve.server_responses`` renders
them); ``LogprobRenderer`` renders the engine's log-probabilities as the two APIs' response objects. ``ApiError`` is an error with its
HTTP status, rendered as the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``;
``validation_error`` turns a pydantic ``ValidationError`` into one that names the offending field. Sampling
values are checked by ``SamplingParams`` itself (``sampling_params``), so the server and the Python API give
the same messages.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from jserve.engine.outputs import TextWindow
from jserve.engine.sampling import SamplingParams

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "LogprobRenderer",
    "TokenizeRequest",
    "parse_body",
    "sampling_params",
    "validation_error",
]


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------ request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationFields(_Strict):
    """Fields common to both endpoints. ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``repetition_penalty``,
    ``min_tokens`` and ``return_token_ids`` are jserve extensions (vLLM has the same names)."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    user: str | None = None  # accepted and ignored
    presence_penalty: float | None = None  # OpenAI's, in [-2, 2]
    frequency_penalty: float | None = None  # OpenAI's, in [-2, 2]
    repetition_penalty: float | None = None  # vLLM's extension, > 0 (1: off)
    min_tokens: int | None = None  # vLLM's extension: no end-of-sequence or stop id before this many tokens
    logit_bias: dict[str, float] | None = None  # OpenAI's: {"token id": bias in [-100, 100]}
    prompt_logprobs: int | None = None  # vLLM's extension: 0..20 most likely ids per prompt token


class CompletionRequest(_GenerationFields):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or a list of prompts
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompt_list(self) -> tuple[list[str | list[int]], bool]:
        """(the prompts, whether ``prompt`` was a list of prompts): a string or a list of token ids is one
        prompt; a list of strings or of token-id lists holds several (LangChain sends a batch of one,
        lm-eval-harness whole batches). An empty list raises ``ApiError(400)``."""
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ApiError(400, "'prompt' is an empty list (give a string, token ids, or a list of prompts)",
                           param="prompt")
        if isinstance(p, list) and not isinstance(p[0], int):
            return list(p), True
        return [p], False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: ``prompt`` (as /v1/completions takes one) or ``messages`` (as chat takes them,
    rendered with the generation prompt), exactly one of them."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # with messages, as chat takes it


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``: the text of ``tokens``."""

    model: str | None = None
    tokens: list[int]


# field -> values that mean "not used"; anything else is refused as unsupported
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
}

_FIELD_NAMES = set()
for _m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions, TokenizeRequest,
           DetokenizeRequest):
    _FIELD_NAMES |= set(_m.model_fields)

_EXPECTED = {  # how a union-typed field is described in a type error
    "prompt": "a string, a list of token ids (integers), or a list of prompts (strings or token-id lists)",
    "stop": "a string or a list of strings",
    "content": "a string, a list of text parts ({\"type\": \"text\", \"text\": ...}) or null",
}


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``'messages[0].content'`` (union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += ("." if out else "") + part
    return out


def validation_error(err: ValidationError) -> ApiError:
    """The first problem of a pydantic error, as a 400 naming the field."""
    e = err.errors()[0]
    loc = tuple(e.get("loc", ()))
    param = _param(loc)
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        where = _param(loc[:-1])
        return ApiError(400, f"unknown field {name!r}" + (f" in {where}" if where else "") +
                        " (jserve follows the OpenAI API; see docs/server.md for the supported fields)",
                        param=(where + "." if where else "") + name)
    if kind == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param)
    if not loc or not param:
        return ApiError(400, f"the request body must be a JSON object, got {_json_kind(e.get('input'))}")
    leaf = param.rsplit(".", 1)[-1].split("[", 1)[0]
    got = json.dumps(e.get("input"), default=str)
    if len(got) > 80:
        got = got[:77] + "..."
    if leaf in _EXPECTED:
        return ApiError(400, f"{param!r} must be {_EXPECTED[leaf]}, got {got}", param=param)
    return ApiError(400, f"{param!r}: {e.get('msg', 'invalid value')}, got {got}", param=param)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return type(value).__name__


def parse_body(raw: bytes, model: type[_Strict]) -> _Strict:
    """The request body as ``model``; malformed JSON, a non-object body, a type error, an unknown field or an
    unsupported OpenAI feature raise ``ApiError(400)`` naming the problem."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_kind(data)}")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    for name, neutral in UNSUPPORTED.items():
        if name in req.model_fields_set and getattr(req, name) not in neutral:
            raise ApiError(400, f"{name!r} is not supported by jserve (only {neutral[0]!r} or absent)", param=name)
    if isinstance(req, _GenerationFields):
        _check_choices(req)
        _check_logprobs(req)
    return req


MAX_CHOICES = 128  # the most choices (n) or candidates (best_of) one request may ask for
MAX_SEQUENCES = 1024  # the most engine requests one HTTP request may start (prompts x best_of)


def _check_choices(req: _Strict) -> None:
    """``n`` in 1..MAX_CHOICES; completions: ``best_of`` in n..MAX_CHOICES and not above ``n`` when
    streaming (as OpenAI), and prompts x best_of at most MAX_SEQUENCES. Otherwise ``ApiError(400)``."""
    if not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"'n' must be an integer in 1..{MAX_CHOICES}, got {req.n}", param="n")
    if not isinstance(req, CompletionRequest):
        return
    best_of = req.n if req.best_of is None else req.best_of
    if not req.n <= best_of <= MAX_CHOICES:
        raise ApiError(400, f"'best_of' must be an integer in n..{MAX_CHOICES} (n is {req.n}), got {best_of}",
                       param="best_of")
    if req.stream and best_of > req.n:
        raise ApiError(400, f"'best_of' ({best_of}) above 'n' ({req.n}) cannot be streamed: the best choices are "
                            "known only when every candidate has finished", param="best_of")
    prompts = len(req.prompt_list()[0])
    if prompts * best_of > MAX_SEQUENCES:
        raise ApiError(400, f"the request asks for {prompts * best_of} sequences ({prompts} prompts x "
                            f"{'best_of' if req.best_of is not None else 'n'} {best_of}); at most "
                            f"{MAX_SEQUENCES} per request: split the batch", param="prompt")


MAX_COMPLETION_LOGPROBS = 5  # the OpenAI completions API's limit
MAX_TOP_LOGPROBS = 20  # the chat API's limit (and the engine's)


def _check_logprobs(req: _Strict) -> None:
    """Completions: ``logprobs`` in 0..5. Chat: ``top_logprobs`` in 0..20, and above 0 only with
    ``logprobs: true``. Both: ``prompt_logprobs`` in 0..20. Otherwise ``ApiError(400)`` naming the field."""
    k = req.prompt_logprobs
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'prompt_logprobs' must be an integer in 0..{MAX_TOP_LOGPROBS} or null, got {k}",
                       param="prompt_logprobs")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError(400, f"'logprobs' must be an integer in 0..{MAX_COMPLETION_LOGPROBS}, got {req.logprobs}",
                           param="logprobs")
    elif isinstance(req, ChatCompletionRequest):
        k = req.top_logprobs
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be an integer in 0..{MAX_TOP_LOGPROBS}, got {k}",
                           param="top_logprobs")
        if k and not req.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")


def logprobs_asked(req: _GenerationFields) -> int | None:
    """``SamplingParams.logprobs`` for ``req``: None when the request does not ask for log-probabilities."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if isinstance(req, ChatCompletionRequest) and req.logprobs:
        return req.top_logprobs or 0
    return None


# ------------------------------------------------------------------------------------------ sampling

_SP_FIELD = re.compile(r"SamplingParams\.(\w+)")


def sampling_params(req: _GenerationFields, max_tokens: int) -> SamplingParams:
    """``SamplingParams`` for ``req`` with ``max_tokens`` already resolved; its own ``ValueError`` becomes a 400
    naming the request field (its message is kept)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            seed=req.seed,
            stop=req.stop or (),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs_asked(req),
            presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            min_tokens=req.min_tokens or 0,
            logit_bias=_bias_ids(req.logit_bias),
        )
    except ValueError as e:
        m = _SP_FIELD.search(str(e))
        field = m.group(1) if m else None
        if field == "max_tokens" and isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            field = "max_completion_tokens"
        raise ApiError(400, str(e), param=field) from None


def _bias_ids(bias: dict[str, float] | None) -> list[tuple[int, float]] | None:
    """``logit_bias`` as ``(token id, bias)`` pairs, its JSON keys (strings) read as ids; a key that is not a
    decimal integer raises ``ApiError(400)`` naming the field. Values and ids named twice (``"5"`` and
    ``" 5"``) are checked by ``SamplingParams``, whose error names ``logit_bias`` too."""
    if not bias:
        return None
    pairs = []
    for key, value in bias.items():
        k = key.strip()
        if not k.isascii() or not k.isdigit():
            raise ApiError(400, f"'logit_bias' keys must be token ids (decimal integers >= 0 as strings), "
                                f"got {key!r}", param="logit_bias")
        digits = k.lstrip("0") or "0"
        if len(digits) > 18:  # past any vocabulary (and past what int() converts from a string of 4,300 digits)
            raise ApiError(400, f"'logit_bias' names token id {digits[:20]}... ({len(digits)} digits), outside the "
                                "vocabulary", param="logit_bias")
        pairs.append((int(digits), value))
    return pairs


# ------------------------------------------------------------------------------------------ logprobs objects


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte table (GPT-2's, used by SmolLM2, Llama-3, Qwen...)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class LogprobRenderer:
    """``RequestOutput.logprobs`` as OpenAI response objects: the completions API's legacy ``logprobs``
    (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and the chat API's ``{"content": [...]}``.

    A token's text is its own decoding; a token that is only part of a UTF-8 character (it decodes to U+FFFD)
    is written ``"bytes:\\xe2\\x80"`` as OpenAI does, with its raw bytes (byte-level BPE and byte-fallback
    vocabularies) in ``bytes``. A model without a tokenizer names tokens ``"token_id:<id>"``. ``text_offset``
    is the length of the text decoded from the tokens before it, without a trailing incomplete character (so
    ``text[text_offset[i]:]`` starts with token i when it begins a character).

    One renderer serves one request: a stream reuses it, and the offsets are computed incrementally (a short
    window decoded per token by ``TextWindow``, the streamed text's decoder), linear in the output length."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.k = params.logprobs or 0
        self._names: dict[int, tuple[str, list[int]]] = {}
        self._offsets: list[int] = []  # text_offset of the tokens seen so far
        self._text = TextWindow(tokenizer, params.skip_special_tokens)  # the text those tokens completed

    def token(self, tid: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token: its name in every log-probability object."""
        if tid not in self._names:
            self._names[tid] = self._name(tid)
        return self._names[tid]

    def _name(self, tid: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            text = f"token_id:{tid}"
            return text, list(text.encode())
        text = self.tokenizer.decode([tid])
        if "\ufffd" not in text:
            return text, list(text.encode())
        raw = text.encode()
        piece = self.tokenizer.backend.id_to_token(tid)
        if piece is not None:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif piece and all(c in _BYTE_DECODER for c in piece):
                raw = bytes(_BYTE_DECODER[c] for c in piece)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def _offset(self, ids: list[int], i: int) -> int:
        """``text_offset`` of token ``i`` (``ids``: the request's tokens so far; later calls extend them)."""
        if self.tokenizer is None:
            return 0
        while len(self._offsets) <= i:
            j = len(self._offsets)
            self._offsets.append(len(self._text.decoded))
            self._text.extend(ids[: j + 1])
        return self._offsets[i]

    def _top(self, d: dict[int, float]) -> list[tuple[int, float]]:
        """The k most likely of one token's entries, most likely first (the sampled id leads the dict)."""
        return sorted(d.items(), key=lambda kv: -kv[1])[: self.k]

    def completion(self, ids: list[int], logprobs: list[dict[int, float]], start: int = 0) -> dict:
        """The legacy object for tokens ``start ..`` of ``ids`` (a streamed chunk passes where it starts)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for i in range(start, len(ids)):
            d = logprobs[i]  # None: an echoed prompt's first token (nothing precedes it)
            tokens.append(self.token(ids[i])[0])
            token_lps.append(None if d is None else d[ids[i]])
            tops.append(None if d is None else {self.token(t)[0]: lp for t, lp in d.items()})
            offsets.append(self._offset(ids, i))
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, ids: list[int], logprobs: list[dict[int, float]], start: int = 0) -> dict:
        """The chat object (``{"content": [...], "refusal": None}``) for tokens ``start ..`` of ``ids``."""
        content = []
        for i in range(start, len(ids)):
            text, raw = self.token(ids[i])
            top = []
            for t, lp in self._top(logprobs[i]):
                t_text, t_raw = self.token(t)
                top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
            content.append({"token": text, "logprob": logprobs[i][ids[i]], "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}
