"""What the engine hands back per request: ``RequestOutput`` (text, token ids, finish reason, error) and
``RequestMetrics`` (timestamps on the engine clock: seconds since the engine was created); and
``IncrementalDetokenizer``, the text so far of a request that is still running (for streaming)."""

from __future__ import annotations

import dataclasses
from typing import Hashable

from .sampling import SamplingParams

__all__ = ["IncrementalDetokenizer", "RequestMetrics", "RequestOutput"]


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # when the request was added
    first_scheduled_time: float | None = None  # start of the first step it ran in
    first_token_time: float | None = None  # end of the step that sampled its first token
    finish_time: float | None = None  # end of the step that finished it (or the abort / rejection time)
    num_preemptions: int = 0  # times it lost the device (swap-out or recompute drop)

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """The state of one request. ``token_ids`` are the generated ids (prompt excluded); ``text`` their
    decoding (stop strings cut off). The engine sets ``text`` when the request finishes; the snapshots that
    ``LLM.stream`` and ``AsyncLLMEngine.generate`` yield carry the text so far before that
    (``IncrementalDetokenizer``). ``finish_reason``: None while running, then "stop" (end-of-sequence, a
    stop id or a stop string), "length" (max_tokens or the model's context), "abort", or "error" (the
    request was refused; ``error`` says why). ``new_token_ids`` holds the ids added by the last step (for
    streaming). ``logprobs`` (when ``SamplingParams.logprobs`` is set, else None): one ``{token id:
    log-probability}`` dict per generated token, aligned with ``token_ids``; each holds the sampled id first,
    then the k most likely ids in descending order (k + 1 entries, or k when the sampled id is among them).
    The log-probabilities are the model's: log-softmax of the raw logits at temperature 1, before top-k/top-p.
    ``prompt_logprobs`` (when ``SamplingParams.prompt_logprobs`` is set, else None): one entry per prompt token,
    None for the first (nothing precedes it), then the same kind of dict for each later prompt token given
    the ones before it (the prompt's id first); ``prompt_logprob_ranks`` beside it: None, then each prompt
    token's rank among the whole vocabulary at its position (1 + the ids with a strictly greater
    log-probability). Both complete once the first generated token is out."""

    request_id: Hashable
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop id that ended it, if any
    metrics: RequestMetrics | None = None
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache when the request started

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def snapshot(self) -> "RequestOutput":
        """A copy safe to hand to another thread."""
        return dataclasses.replace(
            self,
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=list(self.token_ids),
            new_token_ids=list(self.new_token_ids),
            logprobs=None if self.logprobs is None else list(self.logprobs),  # the dicts are never changed
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            prompt_logprob_ranks=None if self.prompt_logprob_ranks is None else list(self.prompt_logprob_ranks),
            metrics=dataclasses.replace(self.metrics) if self.metrics else None,
        )


class TextWindow:
    """Decodes a growing list of token ids a window at a time (vLLM's prefix / read offsets): ``decoded`` is the
    text of the ids up to the last group that completed text, and each ``extend`` decodes only the ids from the
    group before that group on, so a step costs about the same however long the output is."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.decoded = ""  # decode(ids[:read]): whole characters only
        self._prefix = 0  # ids[prefix:read] decode to the end of ``decoded``
        self._read = 0
        self._window_text = ""  # decode(ids[prefix:read])

    def extend(self, ids) -> str:
        """Take ``ids`` (every id so far: the earlier ones and new ones) and return the text past ``decoded``
        that is not yet final: "" when the new ids end on a whole character (they then join ``decoded``), else
        what they decode to without the trailing incomplete UTF-8 sequence (U+FFFD) the next id may complete."""
        decode = self.tokenizer.decode
        window = decode(ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        new = window[len(self._window_text):] if len(window) > len(self._window_text) else ""
        if new and not new.endswith("\ufffd"):  # the new ids end on a whole character: move the window on
            self.decoded += new
            self._prefix, self._read = self._read, len(ids)
            self._window_text = decode(ids[self._prefix:self._read], skip_special_tokens=self.skip_special_tokens)
            return ""
        return new.rstrip("\ufffd")


class IncrementalDetokenizer:
    """The text so far of one request's successive outputs, for streaming (``LLM.stream``,
    ``AsyncLLMEngine.generate``, and through it the server's SSE chunks).

    The engine sets ``RequestOutput.text`` only when a request finishes (per-step decoding stays off its loop).
    ``update(out)``, called with the request's outputs in order, returns the text of ``out`` so far. It decodes
    only a window of the newest ids (vLLM's prefix / read offsets: the window starts at the last group of tokens
    that completed text), so a step costs about the same however long the output is. While the request runs
    the text leaves out a trailing incomplete UTF-8 sequence (decoded as U+FFFD; the next token may complete
    it) and the longest tail that could still grow into one of ``params.stop`` (the engine cuts a stop string
    from the final text, and text already handed out cannot be taken back). Once ``out`` is finished the text
    is the engine's own ``out.text``. Each text is a prefix of the next, and of the final text, as long as the
    tokenizer decodes more ids to an extension of what fewer decode to (``jserve.tokenizer.Tokenizer`` does,
    byte-fallback runs included: it repairs invalid ones; the final text is cut only after a stop-string start
    held back here). Without a tokenizer the text is "" (the engine's too)."""

    def __init__(self, tokenizer, params: SamplingParams | dict | None = None):
        self.tokenizer = tokenizer
        try:
            sp = SamplingParams.coerce(params)
        except (TypeError, ValueError):  # the engine refuses such a request: its only output is finished
            sp = SamplingParams()
        self.stop = tuple(sp.stop)
        self._stop_len = max(map(len, self.stop), default=0)
        self._window = TextWindow(tokenizer, sp.skip_special_tokens)
        self._seen = 0  # ids looked at
        self.text = ""  # the text so far (the last ``update``'s)

    def update(self, out: RequestOutput) -> str:
        """The text so far of ``out`` (the same request's output as every earlier call, or a later one)."""
        if out.finished:
            self.text = out.text
            return self.text
        ids = out.token_ids
        if self.tokenizer is None or len(ids) <= self._seen:
            return self.text
        self._seen = len(ids)
        pending = self._window.extend(ids)  # an incomplete character last: what precedes it
        text = self._without_stop_start(self._window.decoded + pending)
        if len(text) > len(self.text):
            self.text = text
        return self.text

    def _without_stop_start(self, text: str) -> str:
        """``text`` less its longest tail that is the start of a stop string (a whole one included: one
        completed before ``min_tokens`` stays in the text, and shows once more text follows it)."""
        for start in range(max(0, len(text) - self._stop_len), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stop):
                return text[:start]
        return text
