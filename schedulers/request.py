"""The request as the scheduler sees it: lengths, progress, and where its KV cache lives.

A request is a prompt of ``prompt_len`` tokens that asks for at most ``max_new_tokens`` new tokens.
Progress is counted in two numbers:

* ``num_generated_tokens``: tokens sampled so far;
* ``num_computed_tokens``: tokens whose key/value entries are in the KV cache.

The request *knows* ``num_tokens = prompt_len + num_generated_tokens`` tokens. A scheduled step gives a
request ``n`` tokens to compute, ``1 <= n <= num_uncomputed``; when the step computes the last known token
(``num_computed_tokens + n == num_tokens``) the executor samples one new token. This one rule covers plain
prefill (``n = prompt_len``), chunked prefill (several steps with ``n < num_uncomputed``), decode
(``num_uncomputed == 1``) and recompute after a dropped KV cache (``num_computed_tokens`` reset to 0, so
the prompt and every generated token are prefilled again before the next token is sampled).

Policy bookkeeping (MLFQ level, attained service, last run time) lives on the request too, so that a
policy needs no side tables in its hot path. The executor owns nothing here: it reads the request and its
block table, and reports back through ``Scheduler.on_step_end``.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Hashable

RequestId = Hashable


class RequestState(enum.Enum):
    """Life cycle of a request inside a scheduler."""

    WAITING = "waiting"  # admitted; has never run, or its KV cache was dropped (recompute)
    RUNNING = "running"  # started and its KV cache is on the device (it may sit out a step)
    SWAPPED = "swapped"  # started and its KV cache is on the host
    FINISHED = "finished"
    ABORTED = "aborted"
    REJECTED = "rejected"  # refused at admission; ``Request.reject_reason`` says why


class KVLocation(enum.Enum):
    """Which pool holds a request's KV blocks (all of them: a request is never split across pools)."""

    NONE = "none"
    DEVICE = "device"
    HOST = "host"


@dataclass(slots=True, eq=False)
class Request:
    """One generation request. Identity is the object; ``request_id`` is its key in a scheduler."""

    request_id: RequestId
    prompt_len: int
    max_new_tokens: int
    arrival_time: float = 0.0
    # Known only to oracle policies (``srpt``) and to harnesses; schedulers must not read it otherwise.
    oracle_output_len: int | None = None
    # Prefix caching (set by an executor that enables it): one key per full block of the known tokens, block
    # i's key standing for tokens [0, (i + 1) * block_size) (so equal keys mean equal KV). The executor gives
    # the prompt's keys at submission and appends a key each time a sampled token completes a block (before
    # any step computes that token). Empty: the request neither uses nor fills the prefix cache.
    prefix_hashes: tuple = ()

    # Progress.
    num_computed_tokens: int = 0
    num_generated_tokens: int = 0
    # Of the computed tokens, those taken from the prefix cache when the request last started (or restarted
    # after a drop) rather than computed.
    num_cached_tokens: int = 0
    state: RequestState = RequestState.WAITING
    kv_location: KVLocation = KVLocation.NONE
    # Physical block ids in the pool named by ``kv_location``, in logical order. Owned by the BlockManager.
    blocks: list[int] = field(default_factory=list)

    # Timestamps (seconds, the executor's clock). None until they happen.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    reject_reason: str | None = None

    # Policy bookkeeping (meaningful only to policies that use them).
    priority_level: int = 0  # MLFQ queue index; 0 is the highest priority
    attained_service: float = 0.0  # seconds of service attained in the current queue
    last_scheduled_time: float | None = None  # start time of the last step this request ran in
    num_preemptions: int = 0
    num_swaps_out: int = 0
    num_swaps_in: int = 0
    # The policy's sort key in its queues (priority order; smaller runs first). Set by the policy.
    sched_key: tuple = ()
    # Time from which starvation is measured: arrival, the end of the last step it ran in, or its last
    # starvation promotion (fastserve family).
    starvation_clock: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise ValueError(f"Request {self.request_id!r}: prompt_len must be an int >= 1, got {self.prompt_len!r}")
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(
                f"Request {self.request_id!r}: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )
        t = self.arrival_time
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"Request {self.request_id!r}: arrival_time must be a finite number >= 0, got {t!r}")
        o = self.oracle_output_len
        if o is not None and (isinstance(o, bool) or not isinstance(o, int) or o < 1):
            raise ValueError(f"Request {self.request_id!r}: oracle_output_len must be None or an int >= 1, got {o!r}")
        try:
            hash(self.request_id)
        except TypeError:
            raise TypeError(f"Request {self.request_id!r}: request_id must be hashable (it keys the scheduler's "
                            f"tables), got {type(self.request_id).__name__}") from None

    @property
    def num_tokens(self) -> int:
        """Tokens the request knows: the prompt plus every token sampled so far."""
        return self.prompt_len + self.num_generated_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens that must be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while the next step is a (possibly chunked or recomputed) prefill rather than a decode."""
        return self.num_generated_tokens == 0 or self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED, RequestState.REJECTED)

    @property
    def remaining_tokens(self) -> int:
        """New tokens still allowed before ``max_new_tokens`` is reached."""
        return self.max_new_tokens - self.num_generated_tokens
