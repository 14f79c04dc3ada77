"""WorkloadSpec / SyntheticLengths validation: every bad field raises ValueError naming that field."""

from __future__ import annotations

import pytest

from eval.workloads import SyntheticLengths, WorkloadSpec


def test_defaults_are_the_artifacts_sharegpt_poisson_setting():
    spec = WorkloadSpec()
    assert (spec.dataset, spec.arrival, spec.cv, spec.max_prompt_len, spec.max_total_len) == \
        ("sharegpt", "poisson", 1.0, 1024, 2048)
    assert spec.dataset_path is None and spec.tokenizer is None and spec.io_ratio_scale == 1.0


@pytest.mark.parametrize("kwargs, field", [
    ({"rate": 0}, "rate"),
    ({"rate": -1.0}, "rate"),
    ({"rate": float("inf")}, "rate"),
    ({"rate": float("nan")}, "rate"),
    ({"dataset": "lmsys"}, "dataset"),
    ({"num_requests": 0}, "num_requests"),
    ({"num_requests": 2.5}, "num_requests"),
    ({"arrival": "burst"}, "arrival"),
    ({"arrival": "gamma", "cv": 0}, "cv"),
    ({"cv": 2.0}, "cv"),  # cv only applies to gamma
    ({"io_ratio_scale": 0}, "io_ratio_scale"),
    ({"max_prompt_len": 0}, "max_prompt_len"),
    ({"max_total_len": 1}, "max_total_len"),
    ({"dataset": "synthetic"}, "synthetic"),  # synthetic needs its options
    ({"synthetic": SyntheticLengths()}, "synthetic"),  # ... and only synthetic takes them
    ({"arrival": "trace"}, "trace_path"),
    ({"trace_path": "x.csv"}, "trace_path"),
    ({"tokenizer": "tokenizer.json"}, "tokenizer"),  # only with dataset_path
    # Wrong types were accepted: "no" is truthy, so the trace was rescaled; 123 failed later inside Path().
    ({"arrival": "trace", "trace_path": "x.csv", "trace_rescale": "no"}, "trace_rescale"),
    ({"dataset_path": 123}, "dataset_path"),
    ({"arrival": "trace", "trace_path": 5}, "trace_path"),
    ({"dataset_path": "d.json", "tokenizer": 7}, "tokenizer"),
])
def test_bad_spec_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"WorkloadSpec\.{field}"):
        WorkloadSpec(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"distribution": "pareto"}, "distribution"),
    ({"prompt_mean": 0}, "prompt_mean"),
    ({"output_mean": -3}, "output_mean"),
    ({"sigma": 0}, "sigma"),
    ({"alpha": -1}, "alpha"),
    ({"min_len": 0}, "min_len"),
    ({"max_len": 4, "min_len": 8, "prompt_mean": 8, "output_mean": 8}, "max_len"),
    ({"prompt_mean": 5000}, "prompt_mean"),
    ({"distribution": "uniform", "output_mean": 1500}, "output_mean"),  # 2*mean-1 > max_len
])
def test_bad_synthetic_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SyntheticLengths\.{field}"):
        SyntheticLengths(**kwargs)


def test_spec_is_frozen_and_hashable():
    spec = WorkloadSpec(dataset="alpaca", rate=2.0)
    with pytest.raises(AttributeError):
        spec.rate = 3.0  # type: ignore[misc]
    assert spec == WorkloadSpec(dataset="alpaca", rate=2.0) and hash(spec) == hash(WorkloadSpec(dataset="alpaca",
                                                                                                  rate=2.0))
