"""The engine's records: a live request's tokens, sampling state and output (``SequenceState``; the
scheduler's side of a request is ``schedulers.request.Request``), a dispatched iteration awaiting its sampled
tokens (``InFlight``), and the ``{id: logprob}`` dicts of generated and prompt tokens (``logprob_dict``,
``fill_prompt_logprobs``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from schedulers.request import Request

from .outputs import RequestOutput
from .runner import StepOutputs
from .sampling import SamplingParams

__all__ = ["SequenceState", "InFlight", "logprob_dict", "fill_prompt_logprobs"]


@dataclasses.dataclass
class SequenceState:
    """The engine's side of a request: its tokens and output (the scheduler's side is ``Request``)."""

    request: Request
    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    output: RequestOutput
    stop_eos: frozenset[int]  # end-of-sequence ids that stop it (empty with ignore_eos)
    # what a sampling row adds to its logits, while fewer than min_tokens are generated and after: () or
    # (ids [k] int32, values [k] float32): logit_bias, plus -inf per end-of-sequence and stop id in the first
    adjust: tuple = ((), ())
    stop_searched: int | None = None  # characters of the output text already searched for stop strings
    prefix_cached: bool = False  # its full pages get prefix-cache keys (``request.prefix_hashes``) as they fill

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output.token_ids)

    def prompt_logprob_targets(self, start: int, n: int) -> list[int]:
        """Prompt positions ``q + 1`` whose log-probability a step computing positions ``start .. start+n-1``
        gives (the hidden state at ``q`` predicts the token at ``q + 1``) and nobody has computed yet."""
        lps = self.output.prompt_logprobs
        if lps is None:
            return []
        end = min(start + n, len(self.prompt_ids) - 1)
        return [q + 1 for q in range(start, end) if lps[q + 1] is None]

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
    # prompt log-probabilities computed beside the step: device arrays ([P], [P, K], [P, K], [P]) and, per row of
    # them, (sequence, prompt position); None / [] when no row asked
    prompt_logprobs: tuple | None = None
    prompt_positions: list = dataclasses.field(default_factory=list)
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


def fill_prompt_logprobs(flight: InFlight) -> None:
    """Write ``flight``'s prompt log-probabilities into their outputs (waits for the device). A position
    computed twice (a recompute replayed it before the first result was read) keeps the first value."""
    if flight.prompt_logprobs is None:
        return
    *arrays, ranks = (np.asarray(a) for a in flight.prompt_logprobs)
    for i, (seq, pos) in enumerate(flight.prompt_positions):
        lps = seq.output.prompt_logprobs
        if lps[pos] is None:
            lps[pos] = logprob_dict(seq.prompt_ids[pos], seq.params.prompt_logprobs, tuple(arrays), i)
            seq.output.prompt_logprob_ranks[pos] = int(ranks[i])


def logprob_dict(tok: int, k: int, logprobs: tuple[np.ndarray, np.ndarray, np.ndarray], row: int) -> dict[int, float]:
    """``{id: logprob}`` of one generated token: the sampled id first, then the ``k`` most likely ids (most
    likely first; the sampled id is not repeated). ``logprobs``: ``flight.read_logprobs()``."""
    chosen, top_ids, top_lps = logprobs
    d = {tok: float(chosen[row])}
    for i, lp in zip(top_ids[row, :k].tolist(), top_lps[row, :k].tolist()):
        d.setdefault(int(i), float(lp))
    return d
