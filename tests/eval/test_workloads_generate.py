"""make_workload: determinism by seed, built-in profile sampling, arrival processes and trace replay."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from eval.workloads import SyntheticLengths, WorkloadSpec, load_profile, make_workload, read_trace, workload_stats


def lengths(reqs):
    return [(r.prompt_len, r.output_len) for r in reqs]


def times(reqs):
    return np.array([r.arrival_time for r in reqs])


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_same_seed_same_workload_and_basic_shape(dataset):
    spec = WorkloadSpec(dataset=dataset, num_requests=200, rate=3.0)
    a, b = make_workload(spec, 7), make_workload(spec, 7)
    assert a == b
    assert make_workload(spec, 8) != a
    assert [r.request_id for r in a] == list(range(200))
    t = times(a)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)


def test_lengths_do_not_depend_on_rate_or_arrival_and_times_scale_with_rate():
    base = make_workload(WorkloadSpec(num_requests=300, rate=1.0), 5)
    fast = make_workload(WorkloadSpec(num_requests=300, rate=4.0), 5)
    gamma = make_workload(WorkloadSpec(num_requests=300, rate=1.0, arrival="gamma", cv=1.0), 5)
    bursty = make_workload(WorkloadSpec(num_requests=300, rate=1.0, arrival="gamma", cv=4.0), 5)
    assert lengths(base) == lengths(fast) == lengths(gamma) == lengths(bursty)
    np.testing.assert_allclose(times(fast), times(base) / 4.0, rtol=1e-12)
    np.testing.assert_array_equal(times(gamma), times(base))  # Poisson is Gamma with CV 1, same draws


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_profile_sampling_keeps_pairs_joint_and_draws_without_replacement(dataset):
    pool = load_profile(dataset)
    pool_pairs = Counter(zip(pool.prompt_lens.tolist(), pool.output_lens.tolist()))
    # n == pool size: a permutation of the pool, so the multiset of pairs is the pool's exactly.
    reqs = make_workload(WorkloadSpec(dataset=dataset, num_requests=len(pool), rate=1.0), 1)
    assert Counter(lengths(reqs)) == pool_pairs
    # n > pool size: every pair still comes from the pool, none more than ceil(n / size) times its own count.
    n = 2 * len(pool) + 3
    reqs = make_workload(WorkloadSpec(dataset=dataset, num_requests=n, rate=1.0), 2)
    got = Counter(lengths(reqs))
    assert all(got[p] <= 3 * pool_pairs[p] for p in got) and set(got) <= set(pool_pairs)


def test_stricter_caps_apply_to_the_builtin_profile():
    reqs = make_workload(WorkloadSpec(num_requests=500, rate=1.0, max_prompt_len=100, max_total_len=300), 0)
    assert max(r.prompt_len for r in reqs) <= 100 and max(r.prompt_len + r.output_len for r in reqs) <= 300


def test_poisson_gaps_have_mean_one_over_rate_and_cv_one():
    stats = workload_stats(make_workload(WorkloadSpec(num_requests=20000, rate=5.0), 11))
    assert stats["realized_rate"] == pytest.approx(5.0, rel=0.03)
    assert stats["gap_cv"] == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv(cv):
    spec = WorkloadSpec(num_requests=40000, rate=2.0, arrival="gamma", cv=cv)
    gaps = np.diff(times(make_workload(spec, 3)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_uniform_arrivals_are_evenly_spaced():
    reqs = make_workload(WorkloadSpec(num_requests=5, rate=4.0, arrival="uniform"), 0)
    np.testing.assert_allclose(times(reqs), [0.0, 0.25, 0.5, 0.75, 1.0])


def test_io_ratio_scale_keeps_each_requests_total_tokens():
    base = make_workload(WorkloadSpec(num_requests=400, rate=1.0), 4)
    for scale in (0.25, 4.0, 256.0):
        scaled = make_workload(WorkloadSpec(num_requests=400, rate=1.0, io_ratio_scale=scale), 4)
        assert [p + o for p, o in lengths(scaled)] == [p + o for p, o in lengths(base)]
        assert all(p <= 1024 and p >= 1 and o >= 1 for p, o in lengths(scaled))
        np.testing.assert_array_equal(times(scaled), times(base))
    up = workload_stats(make_workload(WorkloadSpec(num_requests=400, rate=1.0, io_ratio_scale=4.0), 4))
    assert up["mean_prompt_len"] > workload_stats(base)["mean_prompt_len"]


def test_synthetic_fixed_workload():
    spec = WorkloadSpec(dataset="synthetic", num_requests=10, rate=1.0,
                        synthetic=SyntheticLengths("fixed", prompt_mean=64, output_mean=32))
    assert lengths(make_workload(spec, 0)) == [(64, 32)] * 10


def test_seed_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="seed"):
        make_workload(WorkloadSpec(), -1)
    with pytest.raises(ValueError, match="seed"):
        make_workload(WorkloadSpec(), 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="WorkloadSpec"):
        make_workload({"dataset": "sharegpt"}, 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- traces


def test_csv_trace_is_rescaled_to_the_rate_keeping_its_burst_pattern(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("# a comment\narrival_time\n10.0\n10.0\n10.5\n14.0\n\n")
    spec = WorkloadSpec(num_requests=4, rate=2.0, arrival="trace", trace_path=str(path))
    t = times(make_workload(spec, 0))
    # Span 4 s for 3 gaps = 0.75 req/s; at 2 req/s every gap shrinks by 0.75 / 2.
    np.testing.assert_allclose(t, np.array([0.0, 0.0, 0.5, 4.0]) * 0.375)
    raw = WorkloadSpec(num_requests=3, rate=2.0, arrival="trace", trace_path=str(path), trace_rescale=False)
    np.testing.assert_allclose(times(make_workload(raw, 0)), [0.0, 0.0, 0.5])


def test_json_trace_with_lengths_replays_them(tmp_path):
    path = tmp_path / "t.json"
    rows = [{"arrival_time": 1.0, "prompt_len": 5, "output_len": 7},
            {"arrival_time": 2.0, "prompt_len": 9, "output_len": 3}]
    path.write_text(json.dumps(rows))
    spec = WorkloadSpec(num_requests=2, rate=1.0, arrival="trace", trace_path=str(path), trace_rescale=False)
    reqs = make_workload(spec, 0)
    assert lengths(reqs) == [(5, 7), (9, 3)] and times(reqs).tolist() == [0.0, 1.0]
    plain = tmp_path / "plain.json"
    plain.write_text("[0, 0.5, 2]")
    assert read_trace(plain).times.tolist() == [0.0, 0.5, 2.0] and read_trace(plain).prompt_lens is None


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "time\n1\n", r"a\.csv: the CSV header must name a 'arrival_time' column"),
    ("b.csv", "arrival_time\n1\n0.5\n", r"b\.csv: row 1: arrival_time 0\.5 is earlier"),
    ("c.csv", "arrival_time\n-1\n", r"c\.csv: row 0: arrival_time must be finite and >= 0"),
    ("d.csv", "arrival_time\nsoon\n", r"d\.csv: row 0: arrival_time 'soon' is not a number"),
    ("e.csv", "arrival_time,prompt_len\n1,3\n", r"e\.csv: give both prompt_len and output_len"),
    ("f.csv", "arrival_time,prompt_len,output_len\n1,3,0\n", r"f\.csv: row 0: output_len must be an integer >= 1"),
    ("g.csv", "", r"g\.csv is empty"),
    ("h.json", "{\"arrival_time\": 1}", r"h\.json: expected a JSON list"),
    ("i.json", "[0, \"x\"]", r"i\.json: row 1 must be a number or an object"),
    ("j.csv", "arrival_time\ninf\n", r"j\.csv: row 0: arrival_time must be finite"),
    # Row 0 had no lengths, so the lengths of rows 1 and 2 were dropped without a word.
    ("late.json", json.dumps([{"arrival_time": 0}, {"arrival_time": 1, "prompt_len": 5, "output_len": 6}]),
     r"late\.json: row 1 gives prompt_len/output_len but row 0 does not"),
    ("blank.csv", "arrival_time,prompt_len,output_len\n0,,\n1,5,6\n",
     r"blank\.csv: row 1 gives prompt_len/output_len but row 0 does not"),
    ("gap.json", json.dumps([{"arrival_time": 0, "prompt_len": 5, "output_len": 6}, {"arrival_time": 1}]),
     r"gap\.json: row 1 has no prompt_len/output_len but row 0 does"),
    # int64 overflow used to escape as a bare OverflowError.
    ("big.csv", "arrival_time,prompt_len,output_len\n0,1e30,5\n", r"big\.csv: row 0: prompt_len .* too large"),
])
def test_malformed_traces_name_the_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_trace(path)


def test_trace_problems_found_when_making_the_workload(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("arrival_time\n0\n1\n")
    with pytest.raises(ValueError, match="fewer than num_requests=3"):
        make_workload(WorkloadSpec(num_requests=3, arrival="trace", trace_path=str(short)), 0)
    same = tmp_path / "same.csv"
    same.write_text("arrival_time\n2\n2\n")
    with pytest.raises(ValueError, match="trace_rescale=False"):
        make_workload(WorkloadSpec(num_requests=2, arrival="trace", trace_path=str(same)), 0)
    long = tmp_path / "long.csv"
    long.write_text("arrival_time,prompt_len,output_len\n0,2000,10\n")
    with pytest.raises(ValueError, match=r"long\.csv: row 0: prompt_len=2000"):
        make_workload(WorkloadSpec(num_requests=1, arrival="trace", trace_path=str(long)), 0)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        make_workload(WorkloadSpec(num_requests=1, arrival="trace", trace_path=str(tmp_path / "missing.csv")), 0)


def test_workload_stats_hand_computed():
    from eval.records import WorkloadRequest

    reqs = [WorkloadRequest(0, 10, 5, 0.0), WorkloadRequest(1, 30, 15, 1.0), WorkloadRequest(2, 20, 10, 3.0)]
    s = workload_stats(reqs)
    assert s["mean_prompt_len"] == 20 and s["mean_output_len"] == 10 and s["mean_io_ratio"] == 2.0
    assert s["span_s"] == 3.0 and s["realized_rate"] == pytest.approx(2 / 3)
    assert s["gap_cv"] == pytest.approx(0.5 / 1.5)
    assert math.isinf(workload_stats(reqs[:1])["realized_rate"])


# ------------------------------------------------------------------------------------ adversarial inputs


@pytest.mark.parametrize("kwargs, message", [
    # cv^2 overflows to inf and standard_gamma(shape -> 0) draws 0: 0 * inf gave NaN times (the simulator then
    # waited forever for them).
    ({"arrival": "gamma", "cv": 1e200, "rate": 2.0}, r"arrival times .*gamma.* rate=2\.0, cv=1e\+200"),
    # 1 / 1e-320 overflows: every time after the first was inf.
    ({"arrival": "uniform", "rate": 1e-320}, r"arrival times .*uniform.* rate=1e-320"),
])
def test_arrival_processes_that_overflow_are_an_error_not_nan_times(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_workload(WorkloadSpec(num_requests=3, **kwargs), 0)


def test_unreadable_trace_files_name_the_file(tmp_path):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfearrival_time\n0\n")
    with pytest.raises(ValueError, match=r"bin\.csv is not UTF-8 text"):
        read_trace(binary)
    with pytest.raises(ValueError, match=r"is a directory, not a trace file"):
        read_trace(tmp_path)
