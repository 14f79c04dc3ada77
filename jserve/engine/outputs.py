"""What the engine hands back per request: ``RequestOutput`` (text, token ids, finish reason, error) and
``RequestMetrics`` (timestamps on the engine clock: seconds since the engine was created)."""

from __future__ import annotations

import dataclasses
from typing import Hashable


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
    decoding (stop strings cut off). ``finish_reason``: None while running, then "stop" (end-of-sequence, a
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
