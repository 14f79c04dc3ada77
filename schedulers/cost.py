"""The iteration-cost protocol and the fitted cost form that policies, the simulator and profiles share.

Policies use a cost model to *predict* (skip-join's queue placement, ENST, the default MLFQ quantum); the
simulator uses the same model to *advance time*; the engine's profiler writes measured coefficients in the
same form. All times are seconds.

The fitted form (DistServe's, used by its simulator for OPT-13B on an A100) is, for one iteration:

* prefill of prompts with lengths ``l_i``: ``p0 + p1 * sum(l_i) + p2 * sum(l_i ** 2)``;
* decode of ``B`` requests with contexts ``c_i``: ``d0 + d1 * sum(c_i) + d2 * B``.

A chunk of ``n`` new tokens that follows ``c`` cached tokens costs ``p1 * n + p2 * ((c + n) ** 2 - c ** 2)``
(the quadratic term is attention over the prefix, so a chunked prompt costs what the whole prompt costs,
plus the per-iteration constant of each extra step). A mixed iteration pays one constant,
``max(p0, d0)``, plus the token terms of both parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from .plan import StepPlan


@runtime_checkable
class IterationCostModel(Protocol):
    """What a policy or a simulator may ask about iteration costs (seconds)."""

    def prefill_time(self, prompt_len: int) -> float:
        """One prompt of ``prompt_len`` tokens prefilled alone (batch size 1)."""
        ...

    def decode_time(self, batch_size: int, total_context: int) -> float:
        """One decode iteration of ``batch_size`` requests whose contexts sum to ``total_context`` tokens."""
        ...

    def step_time(self, prefill: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        """One iteration: ``prefill`` holds ``(num_new_tokens, context_before)`` per chunk, ``decode_contexts``
        the context length of each decoding request. An empty iteration costs 0."""
        ...

    def swap_time(self, num_blocks: int) -> float:
        """Copying ``num_blocks`` KV blocks one way between device and host memory."""
        ...


@dataclass(frozen=True, slots=True)
class FittedCostModel:
    """The fitted iteration-cost form above, with copy bandwidth for swaps.

    Coefficients are in seconds (``p0``/``d0``), seconds per token (``p1``, ``d1``), seconds per token^2
    (``p2``) and seconds per request (``d2``). ``block_bytes`` is the size of one KV block of all layers
    (K and V); ``swap_bandwidth`` is bytes per second over the host link; ``swap_latency`` is a fixed
    per-copy cost.
    """

    p0: float
    p1: float
    p2: float
    d0: float
    d1: float
    d2: float
    block_bytes: int = 0
    swap_bandwidth: float = float("inf")
    swap_latency: float = 0.0
    name: str = "fitted"

    def __post_init__(self) -> None:
        for field_name in ("p0", "p1", "p2", "d0", "d1", "d2", "swap_latency"):
            value = getattr(self, field_name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"FittedCostModel.{field_name} must be >= 0, got {value!r}")
        if self.block_bytes < 0:
            raise ValueError(f"FittedCostModel.block_bytes must be >= 0, got {self.block_bytes!r}")
        if not self.swap_bandwidth > 0:
            raise ValueError(f"FittedCostModel.swap_bandwidth must be > 0, got {self.swap_bandwidth!r}")

    @classmethod
    def from_ms(cls, prefill_ms: Sequence[float], decode_ms: Sequence[float], **kwargs) -> "FittedCostModel":
        """Build from coefficients published in milliseconds: ``prefill_ms=(p0, p1, p2)``, ``decode_ms=(d0, d1, d2)``."""
        p0, p1, p2 = (x / 1e3 for x in prefill_ms)
        d0, d1, d2 = (x / 1e3 for x in decode_ms)
        return cls(p0, p1, p2, d0, d1, d2, **kwargs)

    def prefill_time(self, prompt_len: int) -> float:
        return self.p0 + self.p1 * prompt_len + self.p2 * prompt_len * prompt_len

    def decode_time(self, batch_size: int, total_context: int) -> float:
        if batch_size <= 0:
            return 0.0
        return self.d0 + self.d1 * total_context + self.d2 * batch_size

    def step_time(self, prefill: Sequence[tuple[int, int]], decode_contexts: Sequence[int]) -> float:
        if not prefill and not decode_contexts:
            return 0.0
        t = 0.0
        base = 0.0
        if prefill:
            base = self.p0
            for n, c in prefill:
                t += self.p1 * n + self.p2 * (n * n + 2 * n * c)
        if decode_contexts:
            base = max(base, self.d0)
            t += self.d1 * sum(decode_contexts) + self.d2 * len(decode_contexts)
        return base + t

    def swap_time(self, num_blocks: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return self.swap_latency + num_blocks * self.block_bytes / self.swap_bandwidth


def plan_compute_time(cost: IterationCostModel, plan: StepPlan) -> float:
    """Compute time of ``plan``'s batch. Call before ``on_step_end`` (it reads progress at plan time).

    A decoding request's context is its computed tokens plus the one it computes now."""
    prefill = [(e.num_tokens, e.request.num_computed_tokens) for e in plan.prefill]
    decode = [r.num_computed_tokens + 1 for r in plan.decode]
    return cost.step_time(prefill, decode)


# OPT-13B on one A100-40GB, DistServe's published fit (milliseconds); see DESIGN.md section 6.
OPT13B_A100_DISTSERVE_MS = dict(prefill_ms=(18.10, 0.1019, 7.12e-6), decode_ms=(19.93, 6.27e-4, 0.0385))
# The same model measured on the vLLM engine (milliseconds).
OPT13B_A100_VLLM_MS = dict(prefill_ms=(22.05, 0.1405, 8.08e-6), decode_ms=(23.48, 5.93e-4, 0.0607))


def default_cost_model() -> FittedCostModel:
    """The paper's setting: OPT-13B fp16 on one A100-40GB over PCIe 4.0 x16 (about 25 GB/s).

    One 16-token block of OPT-13B holds 16 * 2 * 40 layers * 5120 * 2 bytes = 13,107,200 bytes."""
    return FittedCostModel.from_ms(
        **OPT13B_A100_DISTSERVE_MS,
        block_bytes=16 * 2 * 40 * 5120 * 2,
        swap_bandwidth=25e9,
        name="opt-13b/a100-40gb (DistServe fit)",
    )
