"""``make_workload(spec, seed)``: one seed -> the same request lengths and arrival times for every system.

Flow: lengths (a pool of real pairs sampled without replacement, synthetic draws, or a trace's own lengths) ->
the input/output ratio transform -> arrival times -> ``WorkloadRequest`` records sorted by arrival, ids 0..n-1.

Lengths and arrivals use two independent random streams derived from the seed, so changing the rate or the
arrival process leaves the lengths unchanged, and the arrival times at rate r are the times at rate 1 over r.
"""

from __future__ import annotations

import numpy as np

from eval.records import WorkloadRequest
from eval.workloads.arrivals import process_arrivals, read_trace, trace_arrivals
from eval.workloads.datasets import LengthPairs, filter_pairs, load_dataset_lengths
from eval.workloads.profiles import load_profile
from eval.workloads.spec import WorkloadSpec
from eval.workloads.synthetic import scale_io_ratio, synthetic_pairs

_LENGTH_STREAM, _ARRIVAL_STREAM = 0, 1


def dataset_pool(spec: WorkloadSpec) -> LengthPairs:
    """The filtered pairs a real-dataset spec samples from: the built-in profile, or ``dataset_path`` tokenized.

    The spec's caps are applied to the pool too, so a stricter ``max_prompt_len``/``max_total_len`` takes effect
    on the built-in profiles (which were filtered with the artifact's 1024/2048; larger caps find no longer pairs).
    """
    if spec.dataset_path is None:
        pool = load_profile(spec.dataset)
    else:
        pool, _ = load_dataset_lengths(spec.dataset, spec.dataset_path, spec.tokenizer,
                                       spec.max_prompt_len, spec.max_total_len)
    keep, _ = filter_pairs(pool.prompt_lens, pool.output_lens, spec.max_prompt_len, spec.max_total_len)
    if not keep.any():
        raise ValueError(f"no pair of the {spec.dataset} pool fits max_prompt_len={spec.max_prompt_len} and "
                         f"max_total_len={spec.max_total_len}")
    return LengthPairs(pool.prompt_lens[keep], pool.output_lens[keep])


def sample_pool(pool: LengthPairs, n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` pairs drawn without replacement, reshuffling the pool each time it runs out (as the artifact's
    ``random.sample`` for n <= pool size; larger n repeat each pair at most ceil(n / size) times)."""
    rounds = -(-n // len(pool))
    idx = np.concatenate([rng.permutation(len(pool)) for _ in range(rounds)])[:n]  # [n]
    return LengthPairs(pool.prompt_lens[idx], pool.output_lens[idx])


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_workload: seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def make_workload(spec: WorkloadSpec, seed: int) -> list[WorkloadRequest]:
    """The requests of ``spec`` under ``seed``: deterministic, sorted by arrival time, first arrival at 0."""
    if not isinstance(spec, WorkloadSpec):
        raise TypeError(f"make_workload: spec must be a WorkloadSpec, got {type(spec).__name__}")
    seed = _check_seed(seed)
    n = spec.num_requests
    length_rng = np.random.default_rng([seed, _LENGTH_STREAM])
    arrival_rng = np.random.default_rng([seed, _ARRIVAL_STREAM])

    trace = read_trace(spec.trace_path) if spec.arrival == "trace" else None
    if trace is not None and trace.prompt_lens is not None:
        if trace.times.size < n:
            raise ValueError(f"trace {trace.path} has {trace.times.size} rows, fewer than num_requests={n}")
        pairs = LengthPairs(trace.prompt_lens[:n], trace.output_lens[:n])
        _check_trace_caps(trace.path, pairs, spec)
    elif spec.dataset == "synthetic":
        pairs = synthetic_pairs(spec.synthetic, n, length_rng, spec.max_prompt_len, spec.max_total_len)
    else:
        pairs = sample_pool(dataset_pool(spec), n, length_rng)
    pairs = scale_io_ratio(pairs, spec.io_ratio_scale, spec.max_prompt_len)

    if trace is not None:
        times = trace_arrivals(trace, n, spec.rate, spec.trace_rescale)
    else:
        times = process_arrivals(spec.arrival, n, spec.rate, spec.cv, arrival_rng)
    return [WorkloadRequest(request_id=i, prompt_len=int(p), output_len=int(o), arrival_time=float(t))
            for i, (p, o, t) in enumerate(zip(pairs.prompt_lens, pairs.output_lens, times))]


def _check_trace_caps(path: str, pairs: LengthPairs, spec: WorkloadSpec) -> None:
    over = np.flatnonzero((pairs.prompt_lens > spec.max_prompt_len)
                          | (pairs.prompt_lens + pairs.output_lens > spec.max_total_len))
    if over.size:
        i = int(over[0])
        raise ValueError(f"trace {path}: row {i}: prompt_len={pairs.prompt_lens[i]}, "
                         f"output_len={pairs.output_lens[i]} exceed max_prompt_len={spec.max_prompt_len} or "
                         f"max_total_len={spec.max_total_len} ({over.size} rows do)")


def workload_stats(requests: list[WorkloadRequest]) -> dict:
    """Realized means and load of a workload (for reports and checks)."""
    if not requests:
        raise ValueError("workload_stats: no requests")
    p = np.array([r.prompt_len for r in requests], dtype=np.float64)
    o = np.array([r.output_len for r in requests], dtype=np.float64)
    t = np.array([r.arrival_time for r in requests], dtype=np.float64)
    gaps = np.diff(t)
    span = float(t[-1] - t[0])
    return {"num_requests": len(requests), "mean_prompt_len": float(p.mean()), "mean_output_len": float(o.mean()),
            "mean_io_ratio": float((p / o).mean()), "span_s": span,
            "realized_rate": (len(requests) - 1) / span if span > 0 else float("inf"),
            "gap_cv": float(gaps.std() / gaps.mean()) if gaps.size and gaps.mean() > 0 else float("nan")}
