"""Metrics over a run's ``RequestRecord``s: latency statistics, SLO attainment, capacity, time breakdown.

Definitions (DESIGN.md section 4 and the artifact's plotting scripts):

- normalized latency = (finish - arrival) / output tokens (the paper's "latency, s/token");
- TTFT = first token - arrival; true TPOT = (finish - first token) / (output tokens - 1), for outputs >= 2;
- SLO attainment = share of requests with TTFT < X **and** normalized latency < Y (strict, as the artifact);
- capacity at an SLO = the rate where a latency-vs-rate curve first crosses the SLO upward, linearly
  interpolated; ``rate_where_attainment_falls_below`` = where attainment first falls below a level.

**Unfinished and rejected requests are never dropped.** A request without a finish time has normalized latency
+inf, and one without a first token has TTFT +inf. So in ``summarize`` the percentiles are taken over *all*
requests (P95 becomes inf once more than 5% are unfinished) and the means become inf if any request is
unfinished; ``mean_norm_latency_finished`` gives the mean over finished requests alone, labelled as such.
SLO attainment divides by all requests, so an unfinished one counts as a miss (the artifact's client waited for
every request, so its logs never held unfinished ones). TPOT is a per-token rate of finished requests only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from eval.records import RequestRecord

INF = math.inf


def _require(records: Sequence[RequestRecord], fn: str) -> None:
    if len(records) == 0:
        raise ValueError(f"{fn}: no records")


def norm_latencies(records: Sequence[RequestRecord]) -> np.ndarray:
    """Normalized latency per request [num_records]; +inf for unfinished or rejected requests."""
    return np.array([r.normalized_latency if r.finished else INF for r in records], dtype=np.float64)


def ttfts(records: Sequence[RequestRecord]) -> np.ndarray:
    """TTFT per request [num_records]; +inf where no first token was produced."""
    return np.array([r.ttft if r.first_token_time is not None else INF for r in records], dtype=np.float64)


def true_tpots(records: Sequence[RequestRecord]) -> np.ndarray:
    """(finish - first token) / (output_len - 1) [num_finished_with_output>=2] over finished requests."""
    return np.array([(r.finish_time - r.first_token_time) / (r.output_len - 1) for r in records
                     if r.finished and r.first_token_time is not None and r.output_len >= 2], dtype=np.float64)


def _percentile(x: np.ndarray, q: float) -> float:
    """Percentile with numpy's default "linear" rule (as the artifact's np.percentile), defined with +inf samples:
    an interpolation that touches an inf sample is inf."""
    if x.size == 0:
        return math.nan
    xs = np.sort(x)
    rank = (xs.size - 1) * q / 100.0
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    if math.isinf(xs[hi]):
        return INF
    return float(xs[lo] + (xs[hi] - xs[lo]) * (rank - lo))


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def summarize(records: Sequence[RequestRecord]) -> dict:
    """Latency, TTFT, TPOT and throughput figures of one run (see the module docstring for conventions).

    Throughput is finished requests (and their output tokens) per second over the span from the first
    arrival to the last finish.
    """
    _require(records, "summarize")
    nl = norm_latencies(records)
    tt = ttfts(records)
    tp = true_tpots(records)
    finished = [r for r in records if r.finished]
    rejected = sum(1 for r in records if r.rejected_reason is not None and not r.finished)
    start = min(r.arrival_time for r in records)
    end = max((r.finish_time for r in finished), default=start)
    span = end - start
    out_tokens = sum(r.output_len for r in finished)
    return {
        "num_requests": len(records), "num_finished": len(finished), "num_rejected": rejected,
        "num_unfinished": len(records) - len(finished) - rejected,
        "mean_norm_latency": _mean(nl), "p50_norm_latency": _percentile(nl, 50),
        "p95_norm_latency": _percentile(nl, 95), "p99_norm_latency": _percentile(nl, 99),
        "mean_norm_latency_finished": _mean(nl[np.isfinite(nl)]),
        "mean_ttft": _mean(tt), "p95_ttft": _percentile(tt, 95),
        "mean_tpot": _mean(tp),
        "throughput_rps": len(finished) / span if span > 0 else math.nan,
        "throughput_tokens_per_s": out_tokens / span if span > 0 else math.nan,
        "makespan_s": span,
    }


def slo_attainment(records: Sequence[RequestRecord], ttft_slo: float, norm_latency_slo: float) -> float:
    """Share (0..1) of *all* requests with TTFT < ``ttft_slo`` and normalized latency < ``norm_latency_slo``."""
    _require(records, "slo_attainment")
    for name, v in (("ttft_slo", ttft_slo), ("norm_latency_slo", norm_latency_slo)):
        if not (isinstance(v, numbers.Real) and v > 0):
            raise ValueError(f"slo_attainment: {name} must be > 0, got {v!r}")
    ok = (ttfts(records) < ttft_slo) & (norm_latencies(records) < norm_latency_slo)
    return float(ok.mean())


def _clean_curve(rates: Sequence[float], values: Sequence[float | None], fn: str) -> tuple[list[float], list[float]]:
    """Validate a curve: same length, strictly increasing rates; points whose value is None or NaN (a failed
    run) are skipped. Returns the kept (rates, values)."""
    if len(rates) != len(values):
        raise ValueError(f"{fn}: rates ({len(rates)}) and values ({len(values)}) differ in length")
    if any(not (isinstance(r, numbers.Real) and math.isfinite(r) and r > 0) for r in rates):
        raise ValueError(f"{fn}: rates must be finite numbers > 0, got {list(rates)}")
    if any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"{fn}: rates must be strictly increasing, got {list(rates)}")
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"{fn}: values[{i}] must be a number or None, got {v!r}")
    kept = [(float(r), float(v)) for r, v in zip(rates, values) if v is not None and not math.isnan(v)]
    return [r for r, _ in kept], [v for _, v in kept]


def _crossing(xs: list[float], ys: list[float], level: float, crossed) -> float | None:
    """First i with crossed(ys[i]); linear interpolation between point i-1 and i. None if point 0 has already
    crossed; inf if no point crosses. An infinite y at the crossing gives x[i-1] (the last point known good)."""
    if not xs:
        return None
    for i, y in enumerate(ys):
        if crossed(y):
            if i == 0:
                return None
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            if math.isinf(y) or y == y0:
                return x0
            return x0 + (x1 - x0) * (level - y0) / (y - y0)
    return INF


def capacity_at_slo(rates: Sequence[float], values: Sequence[float | None], slo: float) -> float | None:
    """The highest rate whose latency curve stays under ``slo``: the first upward crossing, interpolated.

    ``values[i]`` is a latency statistic (e.g. mean normalized latency) at ``rates[i]``. Returns:

    - the interpolated rate between the last point <= slo and the first point > slo;
    - ``None`` if the curve is already above the SLO at the lowest rate (capacity below the measured range),
      or if no point is valid;
    - ``math.inf`` if it never exceeds the SLO (capacity above the measured range; at least ``rates[-1]``).

    Points with ``None``/NaN values (failed runs) are skipped; an inf value (unfinished requests) counts as over
    the SLO, and a crossing into it returns the previous rate.
    """
    if isinstance(slo, bool) or not isinstance(slo, numbers.Real) or not slo > 0:
        raise ValueError(f"capacity_at_slo: slo must be a number > 0 (inf: no SLO), got {slo!r}")
    xs, ys = _clean_curve(rates, values, "capacity_at_slo")
    return _crossing(xs, ys, slo, lambda y: y > slo)


def rate_where_attainment_falls_below(rates: Sequence[float], attainments: Sequence[float | None],
                                      level: float = 0.95) -> float | None:
    """The rate where SLO attainment (a share in 0..1) first falls below ``level``, interpolated linearly.

    ``None`` if it is already below at the lowest rate; ``math.inf`` if it never falls below (the artifact's
    fig13 script prints the largest rate in that case). Points with ``None``/NaN are skipped.
    """
    if not 0 < level <= 1:
        raise ValueError(f"rate_where_attainment_falls_below: level is a share in (0, 1], got {level!r}")
    xs, ys = _clean_curve(rates, attainments, "rate_where_attainment_falls_below")
    if any(not 0 <= y <= 1 for y in ys):
        raise ValueError(f"rate_where_attainment_falls_below: attainments are shares in [0, 1], got {ys} "
                         f"(percentages? divide by 100)")
    return _crossing(xs, ys, level, lambda y: y < level)


def time_breakdown(records: Sequence[RequestRecord]) -> dict:
    """Where the requests' time went: queuing / swapping / execution, as shares of their sum and as means.

    Sums every request's ``queued_time``, ``swapping_time`` and ``executing_time`` (unfinished requests
    included: the time they spent is real). Shares add up to 1 (NaN if no time was recorded at all). Also
    reports swapping as a share of the finished requests' end-to-end latency (the paper: under 5%).
    """
    _require(records, "time_breakdown")
    q = sum(r.queued_time for r in records)
    s = sum(r.swapping_time for r in records)
    e = sum(r.executing_time for r in records)
    total = q + s + e
    finished = [r for r in records if r.finished]
    latency = sum(r.latency for r in finished)
    swap_finished = sum(r.swapping_time for r in finished)
    n = len(records)
    share = (lambda x: x / total) if total > 0 else (lambda x: math.nan)
    return {"queuing": share(q), "swapping": share(s), "execution": share(e),
            "mean_queuing_s": q / n, "mean_swapping_s": s / n, "mean_execution_s": e / n,
            "swap_share_of_latency": swap_finished / latency if latency > 0 else math.nan}
