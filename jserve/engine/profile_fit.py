"""The profiler's arithmetic: fit measured engine steps to the simulator's iteration-cost form.

Two forms, chosen by whether the engine's compiled shapes are given:

* **Linear** (no buckets; DistServe's form, ``schedulers.cost.FittedCostModel``): prefill
  ``p0 + p1 * sum(l) + p2 * sum(l^2)``, decode ``d0 + d1 * sum(c) + d2 * B``, a mixed step the prefill
  terms plus its decodes at ``m1`` per context token and ``m2`` per request.
* **Shape-priced** (``token_buckets`` and ``seq_buckets`` given: the engine's case): the engine runs every
  step in one of a few compiled executables, and what an executable costs is set by its shape, not by a line
  through the shapes (on a CPU, one decode costs ~25 ms and two ~40 ms in the same model: a GEMV against a
  GEMM). So each token bucket ``T`` gets its own base cost ``P[T]`` (steps with prefill work, decodes riding
  along counted in the packed tokens) and each sequence bucket ``S`` its own ``D[S]`` (decode-only steps);
  what still follows real lengths is kept as terms: ``p2 * sum(l^2 + 2 l c)`` (attention among new tokens
  and to their cached context), ``d1 * sum(c)`` for decode-only steps, and ``m1 * sum(c) + m2 * B`` for the
  decodes of a mixed step. The linear coefficients ``p0, p1`` / ``d0, d2`` are then a non-negative line
  through the bucket costs, kept for readers that price without buckets.

Every fit is one joint non-negative least-squares problem on *relative* error (each point weighted by
1/time), so short decode steps count as much as long prefills. ``nnls_fit`` is Lawson and Hanson's
active-set method.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from eval.costmodels.profile import pad_to_bucket  # the cost model's padding rule, which the fit must share
from schedulers.cost import FittedCostModel

__all__ = ["nnls_fit", "FitResult", "CostFit", "fit_cost_model"]


def nnls_fit(
    x: np.ndarray,  # [n_points, n_coef] design matrix
    y: np.ndarray,  # [n_points] measured times
    weights: np.ndarray | None = None,  # [n_points] per-point weights (multiply the residuals)
) -> np.ndarray:  # [n_coef] coefficients, all >= 0
    """Weighted non-negative least squares (Lawson-Hanson active set): minimizes ``|w * (x c - y)|`` over
    ``c >= 0``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"nnls_fit: x must be [n, k] and y [n], got {x.shape} and {y.shape}")
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
    a, b = x * w[:, None], y * w
    k = a.shape[1]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale  # columns of unit norm: the tolerance below means the same for every coefficient
    coef = np.zeros(k)
    passive = np.zeros(k, bool)
    tol = 1e-12 * max(1.0, float(np.abs(a).max(initial=0.0))) * max(1.0, float(np.abs(b).max(initial=0.0))) * k
    for _ in range(3 * k + 10):
        grad = a.T @ (b - a @ coef)
        free = ~passive & (grad > tol)
        if not free.any():
            break
        passive[np.argmax(np.where(free, grad, -np.inf))] = True
        while True:
            z = np.zeros(k)
            z[passive], *_ = np.linalg.lstsq(a[:, passive], b, rcond=None)
            if np.all(z[passive] > 0):
                coef = z
                break
            neg = passive & (z <= 0)
            step = np.min(coef[neg] / (coef[neg] - z[neg]))
            coef = coef + step * (z - coef)
            passive &= coef > tol
            coef[~passive] = 0.0
    return np.maximum(coef, 0.0) / scale


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One fitted family (prefill, decode, mixed or copy): coefficients (seconds units), R^2, per-point errors."""

    coef: tuple[float, ...]
    r2: float
    points: tuple[dict, ...]  # {"x": [...], "measured_ms", "predicted_ms", "rel_err"}

    @property
    def max_rel_err(self) -> float:
        return max(abs(p["rel_err"]) for p in self.points)

    @property
    def mean_abs_rel_err(self) -> float:
        return float(np.mean([abs(p["rel_err"]) for p in self.points]))

    def summary(self) -> dict:
        return {"r2": self.r2, "mean_abs_rel_err": self.mean_abs_rel_err, "max_rel_err": self.max_rel_err,
                "points": list(self.points)}


def _fit(features: np.ndarray, times: np.ndarray, labels: Sequence, groups: Sequence[str] | None = None
         ) -> dict[str, FitResult] | FitResult:
    """NNLS on relative error; with ``groups`` (one name per point) the diagnostics are split per group."""
    times = np.asarray(times, np.float64)
    if np.any(times <= 0):
        raise ValueError("measured times must be > 0")
    coef = nnls_fit(features, times, weights=1.0 / times)
    pred = features @ coef
    names = list(groups) if groups is not None else ["all"] * len(times)
    out = {}
    for g in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == g]
        t, p = times[idx], pred[idx]
        ss_res = float(np.sum((t - p) ** 2))
        ss_tot = float(np.sum((t - t.mean()) ** 2))
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
        pts = tuple({"x": list(labels[i]), "measured_ms": float(times[i]) * 1e3, "predicted_ms": float(pred[i]) * 1e3,
                     "rel_err": float(pred[i] / times[i] - 1)} for i in idx)
        out[g] = FitResult(tuple(float(c) for c in coef), r2, pts)
    return out if groups is not None else out["all"]


def _attention(lens_ctx: Sequence[tuple[int, int]]) -> float:
    """``sum(n^2 + 2 n c)`` of chunks (n new tokens after c cached), as ``FittedCostModel.step_time``."""
    return float(sum(n * n + 2 * n * c for n, c in lens_ctx))


class CostFit(NamedTuple):
    """What ``fit_cost_model`` returns."""

    cost: FittedCostModel  # linear coefficients (with overhead); the line through the tables when shape-priced
    fits: dict[str, FitResult]  # per-kind diagnostics ("prefill", "decode", "mixed", "copy"), one joint fit
    mixed_decode: tuple[float, float]  # (m1 s/context token, m2 s/request) of decodes in a mixed step
    token_costs: tuple[float, ...] = ()  # shape-priced: seconds of a step with prefill work, per token bucket
    seq_costs: tuple[float, ...] = ()  # shape-priced: seconds of a decode-only step, per sequence bucket


def fit_cost_model(
    prefill: Sequence[tuple[Sequence[int], float]],  # (prompt lengths of the step, seconds)
    decode: Sequence[tuple[Sequence[int], float]],  # (context lengths of the step, seconds)
    copies: Sequence[tuple[int, float]] = (),  # (blocks copied, seconds)
    mixed: Sequence[tuple[Sequence[int], Sequence[int], float]] = (),  # (prompt lengths, decode contexts, s)
    *,
    block_bytes: int = 0,
    overhead: float = 0.0,
    name: str = "profile",
    token_buckets: Sequence[int] = (),
    seq_buckets: Sequence[int] = (),
) -> CostFit:
    """Fit measured steps, all kinds at once (see the module docstring for the two forms). ``overhead``
    (seconds per iteration spent outside the runner) is added to every step's base cost after the fit.
    Copies fit ``latency + n * block_bytes / bandwidth`` (they need ``block_bytes`` > 0 and two sizes;
    without them the bandwidth is infinite). Without mixed points ``(m1, m2)`` equal ``(d1, d2)``."""
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"need at least 3 prefill and 3 decode points, got {len(prefill)} and {len(decode)}")
    tb, sb = tuple(sorted(token_buckets)), tuple(sorted(seq_buckets))
    shaped = bool(tb and sb)
    rows, times, labels, groups = [], [], [], []
    if shaped:
        nt, ns = len(tb), len(sb)
        # Columns: P[T] per token bucket, p2, D[S] per sequence bucket, d1, m1, m2.
        width = nt + 1 + ns + 3

        def bucket_index(n: int, buckets: tuple[int, ...], what: str) -> int:
            if n > buckets[-1]:
                raise ValueError(f"a measured step of {n} {what} exceeds the largest bucket {buckets[-1]}")
            return next(i for i, b in enumerate(buckets) if b >= n)

        def decode_row(cs: Sequence[int]) -> np.ndarray:
            row = np.zeros(width)
            row[nt + 1 + bucket_index(len(cs), sb, "sequences")] = 1.0
            row[nt + 1 + ns] = float(sum(cs))
            return row

        # A step whose every row computes one token runs in a decode executable (the runner's rule), even
        # when some of those rows are one-token prompts.
        for ls, t in prefill:
            if all(n == 1 for n in ls):
                row = decode_row([1] * len(ls))
            else:
                row = np.zeros(width)
                row[bucket_index(sum(ls), tb, "tokens")] = 1.0
                row[nt] = _attention([(n, 0) for n in ls])
            rows.append(row), times.append(t), labels.append(list(ls)), groups.append("prefill")
        for cs, t in decode:
            rows.append(decode_row(cs)), times.append(t), labels.append([len(cs), sum(cs)]), groups.append("decode")
        for ls, cs, t in mixed:
            if all(n == 1 for n in ls):
                rows.append(decode_row([1] * len(ls) + list(cs)))
                times.append(t), labels.append([list(ls), len(cs), sum(cs)]), groups.append("mixed")
                continue
            row = np.zeros(width)
            row[bucket_index(sum(ls) + len(cs), tb, "tokens")] = 1.0
            row[nt] = _attention([(n, 0) for n in ls])
            row[-2], row[-1] = float(sum(cs)), float(len(cs))
            rows.append(row), times.append(t), labels.append([list(ls), len(cs), sum(cs)]), groups.append("mixed")
    else:
        def pad(n: int, buckets: tuple[int, ...]) -> float:
            return float(pad_to_bucket(n, buckets))

        # Columns: p0, p1, p2, d0, d1, d2, m1, m2 (m: decodes riding in a step with prefill work).
        for ls, t in prefill:
            rows.append([1.0, pad(sum(ls), tb), _attention([(n, 0) for n in ls]), 0.0, 0.0, 0.0, 0.0, 0.0])
            times.append(t), labels.append(list(ls)), groups.append("prefill")
        for cs, t in decode:
            rows.append([0.0, 0.0, 0.0, 1.0, float(sum(cs)), pad(len(cs), sb), 0.0, 0.0])
            times.append(t), labels.append([len(cs), sum(cs)]), groups.append("decode")
        for ls, cs, t in mixed:
            linear = pad(sum(ls) + len(cs), tb) if tb else float(sum(ls))
            rows.append([1.0, linear, _attention([(n, 0) for n in ls]), 0.0, 0.0, 0.0, float(sum(cs)), float(len(cs))])
            times.append(t), labels.append([list(ls), len(cs), sum(cs)]), groups.append("mixed")
    x = np.array(rows)
    fits = _fit(x, np.array(times), labels, groups)
    bandwidth, latency = float("inf"), 0.0
    if copies and len({n for n, _ in copies}) >= 2 and block_bytes > 0:
        xc = np.array([[1.0, n * block_bytes] for n, _ in copies])
        cf = _fit(xc, np.array([t for _, t in copies]), [[n] for n, _ in copies])
        latency, per_byte = cf.coef
        if per_byte > 0:
            bandwidth = 1.0 / per_byte
        else:  # timings too noisy for a slope: the largest copy's plain rate (a finite, honest lower bound)
            n, t = max(copies)
            bandwidth, latency = n * block_bytes / t, 0.0
        fits["copy"] = cf
    coef = fits["prefill"].coef
    token_costs: tuple[float, ...] = ()
    seq_costs: tuple[float, ...] = ()
    if shaped:
        tok = _fill_unmeasured(np.array(coef[:nt]), tb, x[:, :nt].any(axis=0)) + overhead
        seq = _fill_unmeasured(np.array(coef[nt + 1 : nt + 1 + ns]), sb, x[:, nt + 1 : nt + 1 + ns].any(axis=0)) + overhead
        p2, d1, m1, m2 = coef[nt], coef[nt + 1 + ns], coef[-2], coef[-1]
        p0, p1 = _line(tb, tok)
        d0, d2 = _line(sb, seq)
        token_costs, seq_costs = tuple(float(v) for v in tok), tuple(float(v) for v in seq)
        if not mixed:
            m1, m2 = d1, 0.0
        cost = FittedCostModel(p0, p1, p2, d0, d1, d2, block_bytes=block_bytes, swap_bandwidth=bandwidth,
                               swap_latency=latency, name=name)
    else:
        p0, p1, p2, d0, d1, d2, m1, m2 = coef
        if not mixed:  # nothing measured: decodes in a mixed step cost what they cost alone
            m1, m2 = d1, d2
        cost = FittedCostModel(p0 + overhead, p1, p2, d0 + overhead, d1, d2, block_bytes=block_bytes,
                               swap_bandwidth=bandwidth, swap_latency=latency, name=name)
    return CostFit(cost, fits, (float(m1), float(m2)), token_costs, seq_costs)


def _fill_unmeasured(costs: np.ndarray, buckets: tuple[int, ...], measured: np.ndarray) -> np.ndarray:
    """Buckets no point fell into get their cost interpolated (linearly in the bucket size, held flat past the
    ends) from the measured ones."""
    if measured.all():
        return costs
    if not measured.any():
        raise ValueError(f"no measured step fell into any of the buckets {buckets}")
    b = np.array(buckets, np.float64)
    return np.where(measured, costs, np.interp(b, b[measured], costs[measured]))


def _line(buckets: tuple[int, ...], costs: np.ndarray) -> tuple[float, float]:
    """Non-negative ``(intercept, slope)`` of the least-squares line through the bucket costs."""
    x = np.stack([np.ones(len(buckets)), np.array(buckets, np.float64)], axis=1)
    a, b = nnls_fit(x, costs, weights=1.0 / np.maximum(costs, 1e-12))
    return float(a), float(b)
