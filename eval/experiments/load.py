"""Offered load: the arrival rate at which a workload keeps a batch-``B`` server ``utilization`` busy.

Fig 16 changes every request's prompt/output ratio at constant total tokens. Prompt tokens are far cheaper
than decode tokens, so at a fixed arrival rate the high-ratio points would be nearly idle and the ablation
would compare idle systems. We therefore run each ratio at the rate that offers the same load:

    demand(l, o) = [prefill_time(l) - prefill_time(0)] + (o - 1) * decode_time(B, B * (l + o/2)) / B
    rate         = utilization / mean(demand)

i.e. a request's prefill tokens plus its share of ``o - 1`` decode steps of a full batch of ``B`` (the fixed
per-step cost split ``B`` ways), at its mean context. For the DistServe form this is exact for the linear
terms. The mean is over a fixed reference draw (2000 requests, seed 0) of the workload, so the rates are a
pure function of (dataset, ratio, preset) and every system sees the same rate.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def mean_demand(dataset: str, io_ratio_scale: float, preset: str = "opt-13b-a100", batch_size: int = 16) -> float:
    """Mean seconds of server time one request of the workload needs (see the module docstring)."""
    from ..costmodels import resolve_preset
    from ..workloads import WorkloadSpec, make_workload

    cost = resolve_preset(preset).cost
    work = make_workload(WorkloadSpec(dataset=dataset, num_requests=2000, rate=1.0, io_ratio_scale=io_ratio_scale), 0)
    base = cost.prefill_time(0)  # the fixed per-step part (p0 of the fitted form)
    total = 0.0
    for w in work:
        l, o = w.prompt_len, w.output_len
        total += cost.prefill_time(l) - base
        if o > 1:
            total += (o - 1) * cost.decode_time(batch_size, batch_size * (l + o / 2)) / batch_size
    return total / len(work)


def load_matched_rate(
    dataset: str, io_ratio_scale: float, utilization: float = 0.9, preset: str = "opt-13b-a100", batch_size: int = 16
) -> float:
    """The arrival rate (req/s, 3 significant digits) offering ``utilization`` of a batch-``batch_size`` server."""
    if not 0 < utilization:
        raise ValueError(f"utilization must be > 0, got {utilization!r}")
    rate = utilization / mean_demand(dataset, float(io_ratio_scale), preset, batch_size)
    return float(f"{rate:.3g}")
