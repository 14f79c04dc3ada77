"""The engine profiler: measure an engine's iteration costs on this device and fit the simulator's cost form.

Flow (``profile_engine``):

1. Take a built ``LLMEngine`` and time its own ``ModelRunner`` (the same precompiled bucket executables it
   serves with, so padding a step up to its bucket is part of what is measured) on a grid
   (``ProfileGrid``): prefill steps of ``k`` prompts of ``l`` tokens (one and several prompts), decode steps
   of ``B`` sequences at context ``c``, and standalone swap copies of ``n`` blocks in each direction. Each
   point is the median of ``repeats`` timed calls after ``warmup`` untimed ones.
2. Measure the engine's per-iteration overhead outside the runner (the policy's ``schedule`` and
   ``on_step_end``, packing of the step's rows, bookkeeping) by driving the engine itself over a short burst
   of requests and subtracting the runner's time from each ``step()``'s. The median is added to both fitted
   constants (``p0`` and ``d0``), since the simulator charges a step only its cost-model time.
3. Fit ``schedulers.cost.FittedCostModel``'s form by non-negative least squares on *relative* error (each
   point weighted by 1/time, so short decode steps count as much as long prefills):
   prefill ``p0 + p1 * sum(l) + p2 * sum(l^2)``, decode ``d0 + d1 * sum(c) + d2 * B``; copies
   ``latency + n * block_bytes / bandwidth``. R^2 and the relative error of every point are reported.
4. ``ProfileResult.to_dict()`` is a ``jserve-cost-profile/1`` document (``eval.costmodels.profile``) with
   the engine's usable device block count, block bytes, the measured swap bandwidth, ``full_duplex: false``
   and provenance (device, date, model, engine settings), plus the raw points and fit diagnostics.

The profiler writes into the engine's KV pools (pages are reused freely: only the timing matters), so
profile an engine that serves no requests, or build a fresh one (``jserve profile`` does).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from schedulers.cost import FittedCostModel

from .runner import BatchRow
from .sampling import SamplingParams

__all__ = ["ProfileGrid", "FitResult", "ProfileResult", "default_grid", "nnls_fit", "fit_cost_model",
           "profile_engine", "PROFILE_FORMAT"]

PROFILE_FORMAT = "jserve-cost-profile/1"  # the format eval.costmodels.profile reads


@dataclasses.dataclass(frozen=True)
class ProfileGrid:
    """Which steps to time. ``prefill``: (num_prompts, prompt_len); ``decode``: (batch_size, context);
    ``copies``: blocks per standalone copy (each direction)."""

    prefill: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int], ...]
    copies: tuple[int, ...]
    mixed: tuple[tuple[int, int, int, int], ...] = ()  # (num_prompts, prompt_len, num_decodes, decode_context)
    repeats: int = 5
    warmup: int = 2
    overhead_requests: int = 0  # requests in the overhead burst (0: skip the overhead measurement)

    def __post_init__(self) -> None:
        for name in ("repeats", "warmup", "overhead_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "repeats" else 0):
                raise ValueError(f"ProfileGrid.{name} must be an int >= {1 if name == 'repeats' else 0}, got {v!r}")
        for name, pts in (("prefill", self.prefill), ("decode", self.decode)):
            if len(pts) < 3:
                raise ValueError(f"ProfileGrid.{name} needs at least 3 points to fit 3 coefficients, got {len(pts)}")
            for p in pts:
                if len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in p):
                    raise ValueError(f"ProfileGrid.{name} points must be pairs of ints >= 1, got {p!r}")
        for p in self.mixed:
            if len(p) != 4 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in p):
                raise ValueError(f"ProfileGrid.mixed points must be 4 ints >= 1, got {p!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.copies):
            raise ValueError(f"ProfileGrid.copies must be ints >= 1, got {self.copies!r}")


def _spread(low: int, high: int, n: int) -> list[int]:
    """``n`` distinct ints spread evenly over ``[low, high]`` (fewer if the range is short)."""
    if high <= low:
        return [low]
    return sorted({int(round(x)) for x in np.linspace(low, high, n)})


def default_grid(engine, quick: bool = False) -> ProfileGrid:
    """A grid sized from the engine's limits. Prompt lengths and batch sizes are spread evenly over their
    ranges (not only at bucket edges), so the fit sees the padding to buckets as it occurs in service."""
    c = engine.runner.config
    max_prompt = min(c.max_tokens_per_batch, engine.max_model_len - 1)
    lens = _spread(1, max_prompt, 6 if quick else 12)
    prefill = [(1, n) for n in lens]
    for k in ((2, 4) if quick else (2, 3, 4, 8)):
        k = min(k, c.max_batch_size)
        if k < 2:
            continue
        for n in _spread(1, max_prompt // k, 3 if quick else 5):
            prefill.append((k, n))
    batches = _spread(1, c.max_batch_size, 4 if quick else 8)
    contexts = _spread(2, engine.max_model_len - 1, 2 if quick else 4)
    decode = [(b, ctx) for b in batches for ctx in contexts]
    mixed = []
    if c.max_batch_size >= 2:
        for n in _spread(1, max_prompt // 2, 3 if quick else 5):
            for k in _spread(1, c.max_batch_size - 1, 2 if quick else 3):
                for ctx in _spread(2, engine.max_model_len - 1, 2):
                    if n + k <= c.max_tokens_per_batch:
                        mixed.append((1, n, k, ctx))
    copies = tuple(b for b in c.swap_buckets if b <= engine.kv.num_host_pages)
    return ProfileGrid(
        prefill=tuple(dict.fromkeys(prefill)),
        decode=tuple(decode),
        copies=copies,
        mixed=tuple(mixed),
        repeats=3 if quick else 5,
        warmup=1 if quick else 2,
        overhead_requests=min(2 * c.max_batch_size, 8 if quick else 32),
    )


# ---------------------------------------------------------------------------------------------------- fitting


def nnls_fit(
    x: np.ndarray,  # [n_points, n_coef] design matrix
    y: np.ndarray,  # [n_points] measured times
    weights: np.ndarray | None = None,  # [n_points] per-point weights (multiply the residuals)
) -> np.ndarray:  # [n_coef] coefficients, all >= 0
    """Weighted non-negative least squares for a handful of coefficients: the best of the unconstrained
    least-squares solutions on every subset of coefficients that comes out non-negative (the NNLS optimum is
    one of them, with its own support)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"nnls_fit: x must be [n, k] and y [n], got {x.shape} and {y.shape}")
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
    xw, yw = x * w[:, None], y * w
    k = x.shape[1]
    best, best_err = np.zeros(k), float(np.sum(yw**2))
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(xw[:, cols], yw, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(k)
            full[cols] = coef
            err = float(np.sum((yw - xw @ full) ** 2))
            if err < best_err - 1e-18:
                best, best_err = full, err
    return best


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One fitted family (prefill, decode or copy): coefficients (seconds units), R^2, per-point errors."""

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


def _prefill_features(lens_ctx: Sequence[tuple[int, int]]) -> list[float]:
    """[sum n, sum (n^2 + 2 n c)] of chunks (n new tokens after c cached), as ``FittedCostModel.step_time``."""
    return [float(sum(n for n, _ in lens_ctx)), float(sum(n * n + 2 * n * c for n, c in lens_ctx))]


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
) -> tuple[FittedCostModel, dict[str, FitResult], tuple[float, float]]:
    """Fit the DistServe form to measured steps, all kinds at once, with the simulator's own pricing of each:
    a prefill step ``p0 + p1*sum(l) + p2*sum(l^2)``, a decode step ``d0 + d1*sum(c) + d2*B``, a mixed step
    (prompts and decodes together) the prefill terms plus the decode terms over one constant (taken as ``p0``;
    the fit reports whether ``p0 >= d0`` holds, as the simulator's ``max(p0, d0)`` then agrees). Relative
    errors are minimized, so short and long steps count alike. ``overhead`` (seconds per iteration spent
    outside the runner) is added to ``p0`` and ``d0`` after the fit. Copies fit ``latency + n * block_bytes
    / bandwidth`` (they need ``block_bytes`` > 0 and two sizes; without them the bandwidth is infinite).

    Mixed steps get their own decode terms ``(m1, m2)`` (per context token and per request of a decode that
    rides in a step with prefill work), returned third: on a CPU the ragged kernel that runs mixed steps
    prices a decode very differently from the decode kernel. Without mixed points they equal ``(d1, d2)``.
    With ``token_buckets`` / ``seq_buckets`` (the engine's compiled shapes) the per-token and per-request
    features are the padded counts the engine computes, as ``eval.costmodels.profile.MixedStepCostModel``
    prices them (decodes riding in a mixed step count in its padded tokens).
    Returns ``(cost, fits, (m1, m2))``; ``fits`` has the per-kind diagnostics ("prefill", "decode", "mixed",
    "copy"), all from one joint fit."""
    tb, sb = tuple(sorted(token_buckets)), tuple(sorted(seq_buckets))

    def pad(n: int, buckets: tuple[int, ...]) -> float:
        return float(next((b for b in buckets if b >= n), n))
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"need at least 3 prefill and 3 decode points, got {len(prefill)} and {len(decode)}")
    rows, times, labels, groups = [], [], [], []
    # Columns: p0, p1, p2, d0, d1, d2, m1, m2 (m: decodes riding in a step with prefill work).
    for ls, t in prefill:
        tokens, attention = _prefill_features([(n, 0) for n in ls])
        rows.append([1.0, pad(int(tokens), tb), attention, 0.0, 0.0, 0.0, 0.0, 0.0])
        times.append(t), labels.append(list(ls)), groups.append("prefill")
    for cs, t in decode:
        rows.append([0.0, 0.0, 0.0, 1.0, float(sum(cs)), pad(len(cs), sb), 0.0, 0.0])
        times.append(t), labels.append([len(cs), sum(cs)]), groups.append("decode")
    for ls, cs, t in mixed:
        tokens, attention = _prefill_features([(n, 0) for n in ls])
        linear = pad(int(tokens) + len(cs), tb) if tb else tokens
        rows.append([1.0, linear, attention, 0.0, 0.0, 0.0, float(sum(cs)), float(len(cs))])
        times.append(t), labels.append([list(ls), len(cs), sum(cs)]), groups.append("mixed")
    fits = _fit(np.array(rows), np.array(times), labels, groups)
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
    p0, p1, p2, d0, d1, d2, m1, m2 = fits["prefill"].coef
    if not mixed:  # nothing measured: decodes in a mixed step cost what they cost alone
        m1, m2 = d1, d2
    cost = FittedCostModel(p0 + overhead, p1, p2, d0 + overhead, d1, d2, block_bytes=block_bytes,
                           swap_bandwidth=bandwidth, swap_latency=latency, name=name)
    return cost, fits, (m1, m2)


# ---------------------------------------------------------------------------------------------------- timing


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``fn`` must block)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class _Pages:
    """Hands out device page ids for timing rows (reused cyclically; the padding page is never used)."""

    def __init__(self, num_usable: int, page_size: int):
        self.n = num_usable
        self.ps = page_size
        self.next = 0

    def take(self, tokens: int) -> list[int]:
        need = -(-tokens // self.ps)
        out = [(self.next + i) % self.n for i in range(need)]
        self.next = (self.next + need) % self.n
        return out


_PARAMS = SamplingParams(max_tokens=1, ignore_eos=True)


def _rows(lengths: Sequence[int], starts: Sequence[int], pages: _Pages, vocab: int) -> list[BatchRow]:
    rng = np.random.default_rng(len(lengths) * 7919 + sum(lengths))
    rows = []
    for n, s in zip(lengths, starts):
        ids = rng.integers(0, vocab, n).tolist()
        rows.append(BatchRow(ids, s, pages.take(s + n), (_PARAMS, 0, 0)))
    return rows


def _block(kv) -> None:
    jax.block_until_ready((kv.device, kv.host))


def measure_overhead(engine, num_requests: int, prompt_len: int, output_len: int) -> float:
    """Median seconds per ``engine.step()`` spent outside ``runner.run``/``runner.copy``, over a burst of
    ``num_requests`` requests (the engine must be idle; it is idle again afterwards)."""
    if engine.has_unfinished():
        raise ValueError("measure_overhead needs an idle engine (it has unfinished requests)")
    runner = engine.runner
    inside = [0.0]
    orig_run, orig_copy = runner.run, runner.copy

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0
        return wrapper

    runner.run, runner.copy = timed(orig_run), timed(orig_copy)
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    gaps = []
    try:
        for i in range(num_requests):
            engine.add_request(rng.integers(0, vocab, prompt_len).tolist(),
                               SamplingParams(max_tokens=output_len, ignore_eos=True), request_id=("profile", i))
        while engine.has_unfinished():
            inside[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            gaps.append(time.perf_counter() - t0 - inside[0])
    finally:
        del runner.run, runner.copy  # drop the instance wrappers: the class methods show through again
    return statistics.median(gaps) if gaps else 0.0


@dataclasses.dataclass
class ProfileResult:
    """What ``profile_engine`` measured and fitted."""

    cost: FittedCostModel
    fits: dict[str, FitResult]
    mixed_decode: tuple[float, float]  # (m1 s/context token, m2 s/request) of decodes in mixed steps
    overhead_s: float
    num_device_blocks: int  # usable device blocks (the engine's pool minus its padding page)
    block_size: int
    block_bytes: int
    copy_rates: dict[str, float]  # bytes/s per direction ("out", "in") from the largest copy
    engine_settings: dict
    device: str
    date: str
    seconds: float

    def to_dict(self) -> dict:
        """The ``jserve-cost-profile/1`` document."""
        c = self.cost
        return {
            "format": PROFILE_FORMAT,
            "name": self.cost.name,
            "prefill_ms": [c.p0 * 1e3, c.p1 * 1e3, c.p2 * 1e3],
            "decode_ms": [c.d0 * 1e3, c.d1 * 1e3, c.d2 * 1e3],
            "mixed_decode_ms": [self.mixed_decode[0] * 1e3, self.mixed_decode[1] * 1e3],
            # The engine's compiled shapes: the per-token / per-request terms are paid on padded counts.
            "shape_buckets": {"tokens": list(self.engine_settings["token_buckets"]),
                              "sequences": list(self.engine_settings["decode_buckets"])},
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "swap": {"bandwidth_bytes_per_s": c.swap_bandwidth, "latency_s": c.swap_latency, "full_duplex": False},
            "num_device_blocks": self.num_device_blocks,
            "tp": 1,
            "provenance": (f"jserve profile on {self.device}, {self.date}; model {self.engine_settings['model']}; "
                           f"per-step engine overhead {self.overhead_s * 1e3:.3f} ms added to p0 and d0"),
            "engine": self.engine_settings,
            "overhead_ms": self.overhead_s * 1e3,
            "copy_rates_bytes_per_s": self.copy_rates,
            "fit": {k: f.summary() for k, f in self.fits.items()},
            "profile_seconds": self.seconds,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def engine_settings(engine) -> dict:
    cfg = engine.config
    rc = engine.runner.config
    mc = engine.model.config
    return {
        "model": getattr(engine.model, "source", "") or mc.name,
        "dtype": mc.dtype,
        "scheduler": cfg.scheduler,
        "page_size": rc.page_size,
        "max_batch_size": rc.max_batch_size,
        "max_tokens_per_batch": rc.max_tokens_per_batch,
        "max_model_len": engine.max_model_len,
        "num_device_blocks": engine.kv.num_device_pages,
        "num_host_blocks": engine.kv.num_host_pages,
        "decode_buckets": list(rc.decode_buckets),
        "token_buckets": list(rc.token_buckets),
        "copy_buckets": list(rc.copy_buckets),
        "swap_buckets": list(rc.swap_buckets),
    }


def profile_engine(engine, grid: ProfileGrid | None = None, *, name: str | None = None,
                   progress: Callable[[str], None] | None = None) -> ProfileResult:
    """Time ``engine``'s runner on ``grid`` (default: ``default_grid(engine)``) and fit the cost form."""
    t_start = time.perf_counter()
    grid = grid or default_grid(engine)
    runner, kv = engine.runner, engine.kv
    c = runner.config
    say = progress or (lambda _msg: None)
    if engine.has_unfinished():
        raise ValueError("profile_engine needs an idle engine (it has unfinished requests)")
    usable = kv.num_device_pages - 1
    max_prompt = min(c.max_tokens_per_batch, engine.max_model_len - 1)
    pages = _Pages(usable, c.page_size)
    vocab = engine.model.config.vocab_size
    for k, n in grid.prefill:
        if k > c.max_batch_size or k * n > c.max_tokens_per_batch or n > max_prompt:
            raise ValueError(f"prefill point ({k} prompts x {n} tokens) does not fit the engine (max_batch_size="
                             f"{c.max_batch_size}, max_tokens_per_batch={c.max_tokens_per_batch}, "
                             f"max_model_len={engine.max_model_len})")
    for k, n, b, ctx in grid.mixed:
        if k + b > c.max_batch_size or k * n + b > c.max_tokens_per_batch or n > max_prompt or ctx >= engine.max_model_len:
            raise ValueError(f"mixed point ({k} prompts x {n} tokens + {b} decodes at context {ctx}) does not fit the "
                             f"engine (max_batch_size={c.max_batch_size}, max_tokens_per_batch="
                             f"{c.max_tokens_per_batch}, max_model_len={engine.max_model_len})")
    for b, ctx in grid.decode:
        if b > c.max_batch_size or ctx >= engine.max_model_len:
            raise ValueError(f"decode point (batch {b}, context {ctx}) does not fit the engine (max_batch_size="
                             f"{c.max_batch_size}, max_model_len={engine.max_model_len})")
    if len(set(grid.copies)) < 2:
        raise ValueError(f"measuring swap bandwidth needs two or more copy sizes, got {grid.copies!r} (give the "
                         f"engine a host pool, num_host_blocks >= 2, and two or more swap_buckets)")
    if max(grid.copies) > kv.num_host_pages:
        raise ValueError(f"copy size {max(grid.copies)} exceeds the engine's {kv.num_host_pages} host blocks")

    prefill_pts = []
    for k, n in grid.prefill:
        rows = _rows([n] * k, [0] * k, pages, vocab)
        prefill_pts.append(([n] * k, median_time(lambda: runner.run(rows), grid.repeats, grid.warmup)))
    say(f"prefill: {len(prefill_pts)} points")
    decode_pts = []
    for b, ctx in grid.decode:
        rows = _rows([1] * b, [ctx - 1] * b, pages, vocab)
        decode_pts.append(([ctx] * b, median_time(lambda: runner.run(rows), grid.repeats, grid.warmup)))
    say(f"decode: {len(decode_pts)} points")
    mixed_pts = []
    for k, n, b, ctx in grid.mixed:
        rows = _rows([n] * k + [1] * b, [0] * k + [ctx - 1] * b, pages, vocab)
        mixed_pts.append(([n] * k, [ctx] * b, median_time(lambda: runner.run(rows), grid.repeats, grid.warmup)))
    say(f"mixed: {len(mixed_pts)} points")
    copy_pts, rates = [], {}
    for direction in ("out", "in"):
        for n in grid.copies:
            pairs = [(i % usable, i) for i in range(n)] if direction == "out" else [(i, i % usable) for i in range(n)]

            def go(pairs=pairs, direction=direction):
                runner.copy(direction, pairs)
                _block(kv)

            t = median_time(go, grid.repeats, grid.warmup)
            copy_pts.append((n, t))
            if n == max(grid.copies):
                rates[direction] = n * kv.spec.page_bytes / t
    say(f"copies: {len(copy_pts)} points")
    overhead = 0.0
    if grid.overhead_requests:
        overhead = measure_overhead(engine, grid.overhead_requests, max(1, min(16, max_prompt // 2)), 8)
        say(f"engine overhead: {overhead * 1e3:.3f} ms per step")
    settings = engine_settings(engine)
    device = jax.devices()[0]
    device_name = f"{device.platform}:{getattr(device, 'device_kind', '')}"
    label = name or f"{engine.model.config.name}/{device_name}"
    cost, fits, mixed_decode = fit_cost_model(prefill_pts, decode_pts, copy_pts, mixed_pts, block_bytes=kv.spec.page_bytes,
                                overhead=overhead, name=label, token_buckets=c.token_buckets,
                                seq_buckets=c.decode_buckets)
    return ProfileResult(
        cost=cost,
        fits=fits,
        mixed_decode=mixed_decode,
        overhead_s=overhead,
        num_device_blocks=usable,
        block_size=c.page_size,
        block_bytes=kv.spec.page_bytes,
        copy_rates=rates,
        engine_settings=settings,
        device=device_name,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - t_start,
    )
