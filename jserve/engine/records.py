"""The engine's records: a live request's tokens, sampling state and output (``SequenceState``; the
scheduler's side of a request is ``schedulers.request.Request``), a dispatched iteration awaiting its sampled
tokens (``InFlight``), and the ``{id: logprob}`` dict of one generated token (``logprob_dict``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from schedulers.request import Request

from .outputs import RequestOutput
from .runner import StepOutputs
from .sampling import SamplingParams

__all__ = ["SequenceState", "InFlight", "logprob_dict"]


@dataclasses.dataclass
class SequenceState:
    """The engine's side of a request: its tokens and output (the scheduler's side is ``Request``)."""

    request: Request
    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    output: RequestOutput
    stop_eos: frozenset[int]  # end-of-sequence ids that stop it (empty with ignore_eos)
    penalty_slot: int | None = None  # its row of the penalty tables (requests with penalties, once queued)
    penalty_reset: bool = False  # the slot is to be zeroed by the request's first step
    # what a sampling row adds to its logits, while fewer than min_tokens are generated and after: () or
    # (ids [k] int32, values [k] float32): logit_bias, plus -inf per end-of-sequence and stop id in the first
    adjust: tuple = ((), ())
    stop_searched: int | None = None  # characters of the output text already searched for stop strings

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output.token_ids)

    def token_slice(self, start: int, n: int) -> list[int]:
        """Known tokens ``start .. start+n-1`` (prompt, then generated) without building the whole list."""
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start : start + n]
        if start >= p:
            return self.output.token_ids[start - p : start - p + n]
        return self.prompt_ids[start:] + self.output.token_ids[: start + n - p]


@dataclasses.dataclass
class InFlight:
    """A dispatched iteration: its plan, when it was planned, who samples in it, and its sampled tokens."""

    plan: object  # schedulers.plan.StepPlan
    start: float
    samplers: list  # per row: the SequenceState that samples a token there, or None
    outputs: StepOutputs | None  # the step's device arrays (None for a copies-only iteration)
    sampler_index: dict = dataclasses.field(default_factory=dict)  # request id -> index into tokens
    _host: np.ndarray | None = None
    _host_logprobs: tuple | None = None

    def __post_init__(self) -> None:
        self.sampler_index = {seq.request.request_id: i for i, seq in enumerate(self.samplers) if seq is not None}

    def read(self) -> np.ndarray:
        """The sampled tokens on the host (waits for the device the first time)."""
        if self._host is None:
            self._host = np.zeros(0, np.int32) if self.outputs is None else np.asarray(self.outputs.tokens)
        return self._host

    def read_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sampled tokens' log-probabilities ``[slots]`` and the top ids / log-probabilities ``[slots, K]``
        on the host (read only when some row asked for them)."""
        if self._host_logprobs is None:
            o = self.outputs
            self._host_logprobs = tuple(np.asarray(a) for a in (o.logprob, o.top_ids, o.top_logprobs))
        return self._host_logprobs


def logprob_dict(tok: int, k: int, logprobs: tuple[np.ndarray, np.ndarray, np.ndarray], row: int) -> dict[int, float]:
    """``{id: logprob}`` of one generated token: the sampled id first, then the ``k`` most likely ids (most
    likely first; the sampled id is not repeated). ``logprobs``: ``flight.read_logprobs()``."""
    chosen, top_ids, top_lps = logprobs
    d = {tok: float(chosen[row])}
    for i, lp in zip(top_ids[row, :k].tolist(), top_lps[row, :k].tolist()):
        d.setdefault(int(i), float(lp))
    return d
