"""The two records that tie the eval package together: what a workload asks for, and what a run measured.

``WorkloadRequest`` is produced by ``eval.workloads`` (identical for every system under one seed) and consumed
by the simulator or the engine harness. ``RequestRecord`` is produced by a run, one per request, and consumed by
``eval.metrics``, the artifact-format logs and the plots. Times are seconds on the run's clock, with the first
arrival of a workload at or after 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    request_id: int
    prompt_len: int  # tokens
    output_len: int  # tokens the request asks for (its reference output length; EOS ignored)
    arrival_time: float  # seconds


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    prompt_len: int
    output_len: int  # tokens generated
    arrival_time: float
    first_token_time: float | None = None  # None if the run ended before the first token
    finish_time: float | None = None  # None if unfinished or rejected
    # Breakdown of (finish - arrival): waiting without running, moving KV on the critical path, computing.
    queued_time: float = 0.0
    swapping_time: float = 0.0
    executing_time: float = 0.0
    num_preemptions: int = 0
    rejected_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def latency(self) -> float:
        """End-to-end latency in seconds (finish - arrival)."""
        assert self.finish_time is not None, f"request {self.request_id} did not finish"
        return self.finish_time - self.arrival_time

    @property
    def normalized_latency(self) -> float:
        """The paper's 'latency (s/token)': end-to-end latency over output tokens."""
        return self.latency / max(self.output_len, 1)

    @property
    def ttft(self) -> float:
        assert self.first_token_time is not None, f"request {self.request_id} has no first token"
        return self.first_token_time - self.arrival_time
