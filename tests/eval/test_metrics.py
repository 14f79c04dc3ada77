"""eval.metrics against hand-computed cases and numpy / the artifact's own formulas as references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.metrics import (capacity_at_slo, rate_where_attainment_falls_below, slo_attainment, summarize,
                          time_breakdown)
from eval.records import RequestRecord


def rec(rid, arrival, first, finish, out, prompt=10, **kw):
    return RequestRecord(request_id=rid, prompt_len=prompt, output_len=out, arrival_time=arrival,
                         first_token_time=first, finish_time=finish, **kw)


# normalized latencies 1.0, 0.5, 2.0, 0.2; TTFTs 1, 0.5, 2, 0.2; true TPOTs 1.0, 0.5, 2.0 (r3 has 1 token)
FINISHED = [rec(0, 0.0, 1.0, 11.0, 11), rec(1, 1.0, 1.5, 3.5, 5), rec(2, 2.0, 4.0, 6.0, 2), rec(3, 3.0, 3.2, 3.2, 1)]


def test_summarize_all_finished_hand_computed():
    s = summarize(FINISHED)
    assert (s["num_requests"], s["num_finished"], s["num_rejected"], s["num_unfinished"]) == (4, 4, 0, 0)
    assert s["mean_norm_latency"] == pytest.approx(0.925)
    assert s["p50_norm_latency"] == pytest.approx(0.75)
    assert s["p95_norm_latency"] == pytest.approx(1.85)  # rank 2.85 between 1.0 and 2.0
    nl = [1.0, 0.5, 2.0, 0.2]
    for q in (50, 95, 99):
        assert s[f"p{q}_norm_latency"] == pytest.approx(np.percentile(nl, q))  # the artifact's np.percentile
    assert s["mean_ttft"] == pytest.approx((1 + 0.5 + 2 + 0.2) / 4)
    assert s["p95_ttft"] == pytest.approx(np.percentile([1, 0.5, 2, 0.2], 95))
    assert s["mean_tpot"] == pytest.approx((1.0 + 0.5 + 2.0) / 3)
    assert s["makespan_s"] == 11.0 and s["throughput_rps"] == pytest.approx(4 / 11)
    assert s["throughput_tokens_per_s"] == pytest.approx(19 / 11)
    assert s["mean_norm_latency_finished"] == pytest.approx(0.925)


def test_unfinished_and_rejected_requests_are_counted_as_infinite_not_dropped():
    records = FINISHED + [rec(4, 4.0, 5.0, None, 10),  # started, never finished
                          rec(5, 5.0, None, None, 10, rejected_reason="prompt too long")]
    s = summarize(records)
    assert (s["num_finished"], s["num_rejected"], s["num_unfinished"]) == (4, 1, 1)
    assert math.isinf(s["mean_norm_latency"]) and math.isinf(s["mean_ttft"])
    # sorted [0.2, 0.5, 1, 2, inf, inf]: P50 rank 2.5 -> 1.5; P95 touches inf.
    assert s["p50_norm_latency"] == pytest.approx(1.5)
    assert math.isinf(s["p95_norm_latency"]) and math.isinf(s["p99_norm_latency"])
    assert s["mean_norm_latency_finished"] == pytest.approx(0.925)
    assert s["mean_tpot"] == pytest.approx((1.0 + 0.5 + 2.0) / 3)  # finished requests only
    assert slo_attainment(records, 10.0, 10.0) == pytest.approx(4 / 6)


def test_slo_attainment_is_strict_and_needs_both_conditions():
    # TTFT < 1.0 and normalized latency < 1.0: r1 (0.5, 0.5) and r3 (0.2, 0.2) pass; r0 has latency == 1.0
    # (strict: a miss), r2 fails both.
    assert slo_attainment(FINISHED, 1.0, 1.0) == pytest.approx(0.5)
    assert slo_attainment(FINISHED, 1.01, 1.01) == pytest.approx(0.75)
    assert slo_attainment(FINISHED, 100.0, 0.3) == pytest.approx(0.25)  # latency alone binds
    # The artifact's fig13 check, independently: ttft < X and (end - start) / output_len < Y.
    X, Y = 1.55, 0.6
    ref = np.mean([(r.first_token_time - r.arrival_time) < X and (r.finish_time - r.arrival_time) / r.output_len < Y
                   for r in FINISHED])
    assert slo_attainment(FINISHED, X, Y) == pytest.approx(ref)
    with pytest.raises(ValueError, match="ttft_slo"):
        slo_attainment(FINISHED, 0, 1.0)
    with pytest.raises(ValueError, match="no records"):
        slo_attainment([], 1.0, 1.0)


def test_capacity_first_upward_crossing_interpolated():
    assert capacity_at_slo([1, 2, 3, 4], [0.1, 0.2, 0.4, 0.5], 0.3) == pytest.approx(2.5)
    # Not monotone: the *first* crossing counts, even if the curve dips back under later.
    assert capacity_at_slo([1, 2, 3, 4], [0.1, 0.4, 0.2, 0.5], 0.3) == pytest.approx(1 + 0.2 / 0.3)
    assert capacity_at_slo([1, 2], [0.1, 0.3], 0.3) == math.inf  # touching the SLO is not crossing it
    assert capacity_at_slo([1, 2, 3], [0.35, 0.4, 0.5], 0.3) is None  # already over at the lowest rate
    assert capacity_at_slo([1, 2, 3], [0.1, 0.2, 0.25], 0.3) == math.inf  # never over: at least rates[-1]


def test_capacity_skips_failed_points_and_treats_inf_as_over():
    assert capacity_at_slo([1, 2, 3], [0.1, float("nan"), 0.4], 0.3) == pytest.approx(1 + 2 * 0.2 / 0.3)
    assert capacity_at_slo([1, 2, 3], [0.1, None, 0.4], 0.3) == pytest.approx(1 + 2 * 0.2 / 0.3)
    assert capacity_at_slo([1, 2, 3], [0.1, 0.2, math.inf], 0.3) == 2.0
    assert capacity_at_slo([1, 2], [None, None], 0.3) is None


def test_capacity_rejects_malformed_curves():
    with pytest.raises(ValueError, match="differ in length"):
        capacity_at_slo([1, 2], [0.1], 0.3)
    with pytest.raises(ValueError, match="strictly increasing"):
        capacity_at_slo([2, 1], [0.1, 0.2], 0.3)
    with pytest.raises(ValueError, match="> 0"):
        capacity_at_slo([0, 1], [0.1, 0.2], 0.3)


def artifact_find_intersection_point(xs, ys, slo):
    """The artifact's fig13.py rule, rewritten here as an independent reference (percent attainments)."""
    for i in range(1, len(xs)):
        if ys[i] < slo:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (slo - ys[i - 1]) / (ys[i] - ys[i - 1])
    return xs[-1]


def test_attainment_crossing_matches_the_artifacts_rule():
    rates = [0.5, 1.0, 1.5, 2.0, 3.0]
    att = [1.0, 0.99, 0.97, 0.90, 0.40]
    ours = rate_where_attainment_falls_below(rates, att, 0.95)
    assert ours == pytest.approx(1.5 + 0.5 * (0.95 - 0.97) / (0.90 - 0.97))
    assert ours == pytest.approx(artifact_find_intersection_point(rates, [a * 100 for a in att], 95))
    # Never below: the artifact prints the largest rate; we return inf (documented). Below at once: None.
    assert rate_where_attainment_falls_below(rates, [1.0] * 5) == math.inf
    assert rate_where_attainment_falls_below(rates, [0.9] * 5) is None
    with pytest.raises(ValueError, match="percentages"):
        rate_where_attainment_falls_below(rates, [100, 99, 97, 90, 40])
    with pytest.raises(ValueError, match="level"):
        rate_where_attainment_falls_below(rates, att, 95)


def test_time_breakdown_shares_and_swap_share_of_latency():
    records = [rec(0, 0.0, 1.0, 10.0, 5, queued_time=4.0, swapping_time=1.0, executing_time=5.0),
               rec(1, 0.0, 2.0, 10.0, 5, queued_time=6.0, swapping_time=0.0, executing_time=4.0),
               rec(2, 0.0, None, None, 5, queued_time=10.0)]  # unfinished: its queueing still counts
    b = time_breakdown(records)
    assert b["queuing"] == pytest.approx(20 / 30) and b["swapping"] == pytest.approx(1 / 30)
    assert b["execution"] == pytest.approx(9 / 30)
    assert b["queuing"] + b["swapping"] + b["execution"] == pytest.approx(1.0)
    assert b["mean_queuing_s"] == pytest.approx(20 / 3)
    assert b["swap_share_of_latency"] == pytest.approx(1 / 20)
    assert math.isnan(time_breakdown([rec(0, 0.0, 1.0, 2.0, 1)])["queuing"])  # nothing recorded


def test_summarize_needs_records():
    with pytest.raises(ValueError, match="summarize: no records"):
        summarize([])


def test_capacity_rejects_a_meaningless_slo_or_non_numeric_values():
    """A NaN SLO used to return inf (capacity 'above the range'), a negative one None, and a string value raised a
    bare TypeError from float()."""
    for slo in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match=r"capacity_at_slo: slo must be a number > 0"):
            capacity_at_slo([1, 2], [0.1, 0.5], slo)
    with pytest.raises(ValueError, match=r"capacity_at_slo: values\[0\] must be a number or None, got 'a'"):
        capacity_at_slo([1, 2], ["a", 0.5], 0.3)
    with pytest.raises(ValueError, match=r"capacity_at_slo: values\[1\] must be a number or None, got True"):
        capacity_at_slo([1, 2], [0.1, True], 0.3)
    assert capacity_at_slo([1, 2], [0.1, 0.5], math.inf) == math.inf  # no SLO: never crossed
