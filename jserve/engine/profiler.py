"""The engine profiler: measure an engine's iteration costs on this device and fit the simulator's cost form.

Flow (``profile_engine``):

1. Take a built ``LLMEngine`` and time its own ``ModelRunner`` (the same precompiled bucket executables it
   serves with, so padding a step up to its bucket is part of what is measured) on a grid
   (``ProfileGrid``): prefill steps of ``k`` prompts of ``l`` tokens (one and several prompts), decode steps
   of ``B`` sequences at context ``c``, mixed steps (a prompt plus decodes), and standalone swap copies of
   ``n`` blocks in each direction. Each point is the mean of ``repeats`` timed calls after ``warmup``
   untimed ones, measured in interleaved rounds (``interleaved_means``: every round times every point once,
   in a fresh random order, right after an untimed call of the same point), so background load that comes
   and goes weighs on all points alike.
2. Measure the engine's per-iteration overhead outside the runner (the policy's ``schedule`` and
   ``on_step_end``, packing of the step's rows, bookkeeping) by driving the engine itself over a short burst
   of requests and subtracting the runner's time from each ``step()``'s. The median is added to every
   step's base cost, since the simulator charges a step only its cost-model time.
3. Fit the cost form (``jserve.engine.profile_fit``): with the engine's buckets, a measured base cost per
   compiled shape plus terms in the real lengths; copies ``latency + n * block_bytes / bandwidth``. R^2 and
   the relative error of every point are reported.
4. ``ProfileResult.to_dict()`` is a ``jserve-cost-profile/1`` document (``eval.costmodels.profile``) with
   the engine's usable device block count, block bytes, the measured swap bandwidth, ``full_duplex: false``
   and provenance (device, date, model, engine settings), plus the raw points and fit diagnostics.

The profiler writes into the engine's KV pools (pages are reused freely: only the timing matters), so
profile an engine that serves no requests, or build a fresh one (``jserve profile`` does).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from schedulers.cost import FittedCostModel

from .profile_fit import CostFit, FitResult, fit_cost_model, nnls_fit
from .runner import BatchRow
from .sampling import SamplingParams

__all__ = ["ProfileGrid", "FitResult", "CostFit", "ProfileResult", "default_grid", "nnls_fit", "fit_cost_model",
           "profile_engine", "interleaved_means", "median_time", "PROFILE_FORMAT"]

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
    ranges (not only at bucket edges), so the fit sees the padding to buckets as it occurs in service, and
    every compiled bucket size is itself a point (each bucket's cost is measured, see ``profile_fit``)."""
    c = engine.runner.config
    max_prompt = min(c.max_tokens_per_batch, engine.max_model_len - 1)
    lens = sorted(set(_spread(1, max_prompt, 6 if quick else 12)) | {b for b in c.token_buckets if b <= max_prompt})
    prefill = [(1, n) for n in lens]
    for k in ((2, 4) if quick else (2, 3, 4, 8)):
        k = min(k, c.max_batch_size)
        if k < 2:
            continue
        for n in _spread(1, max_prompt // k, 3 if quick else 5):
            prefill.append((k, n))
    batches = sorted(set(_spread(1, c.max_batch_size, 4 if quick else 8)) | set(c.decode_buckets))
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
        warmup=1,
        overhead_requests=min(2 * c.max_batch_size, 8 if quick else 32),
    )


# ---------------------------------------------------------------------------------------------------- timing


def interleaved_means(fns: Sequence[Callable[[], object]], repeats: int, warmup: int, seed: int = 0) -> list[float]:
    """Mean wall time of each of ``fns`` (each must block) over ``repeats`` rounds, after ``warmup`` untimed
    rounds. Every round visits each function once, in a fresh random order, and there calls it twice, timing
    the second call: a drift in background load then spreads over all points alike instead of biasing the
    ones measured while it lasted, while each timed call still follows a call of its own shape, as a step in
    service mostly follows a step like it (a decode after a decode), not an unrelated one. The mean (not the
    median) is what a run's total time adds up."""
    rng = np.random.default_rng(seed)
    order = np.arange(len(fns))
    for _ in range(warmup):
        for i in order:
            fns[i]()
    total = np.zeros(len(fns))
    for _ in range(repeats):
        rng.shuffle(order)
        for i in order:
            fns[i]()
            t0 = time.perf_counter()
            fns[i]()
            total[i] += time.perf_counter() - t0
    return (total / repeats).tolist()


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
    """Median seconds per ``engine.step()`` spent outside what the profile's step timings already hold,
    over a burst of ``num_requests`` requests (the engine must be idle; it is idle again afterwards). A
    profiled step is ``runner.run`` (packing the inputs, ``prepare``; the step, ``launch``; and the wait), so
    ``prepare``, ``launch`` (waited for) and copies are all subtracted: what is left is the iteration's other
    host work (policy, rows, tokens, bookkeeping). With async scheduling the engine overlaps host work with
    the device."""
    if engine.has_unfinished():
        raise ValueError("measure_overhead needs an idle engine (it has unfinished requests)")
    runner = engine.runner
    inside = [0.0]
    orig_prepare, orig_launch, orig_copy = runner.prepare, runner.launch, runner.copy

    def timed(fn, wait: bool):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
                return jax.block_until_ready(out) if wait else out
            finally:
                inside[0] += time.perf_counter() - t0
        return wrapper

    runner.prepare = timed(orig_prepare, False)
    runner.launch, runner.copy = timed(orig_launch, True), timed(orig_copy, True)
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
        del runner.prepare, runner.launch, runner.copy  # the instance wrappers off: the class methods show through
    return statistics.median(gaps) if gaps else 0.0


@dataclasses.dataclass
class ProfileResult:
    """What ``profile_engine`` measured and fitted."""

    cost: FittedCostModel
    fits: dict[str, FitResult]
    mixed_decode: tuple[float, float]  # (m1 s/context token, m2 s/request) of decodes in mixed steps
    token_costs: tuple[float, ...]  # seconds of a step with prefill work per token bucket (shape-priced)
    seq_costs: tuple[float, ...]  # seconds of a decode-only step per sequence bucket (shape-priced)
    overhead_s: float
    num_device_blocks: int  # usable device blocks (the engine's pool minus its padding page)
    block_size: int
    block_bytes: int
    copy_rates: dict[str, float]  # bytes/s per direction ("out", "in") from the largest copy
    engine_settings: dict
    device: str
    date: str
    seconds: float
    # the host's 1-minute load average when the profile started and ended (None where the OS has none):
    # other processes' work moves step times, so a profile taken on a busy machine prices steps too high
    load_average: tuple[float | None, float | None] = (None, None)
    cpus: int | None = dataclasses.field(default_factory=os.cpu_count)  # the host's CPU count, beside its load

    def to_dict(self) -> dict:
        """The ``jserve-cost-profile/1`` document."""
        c = self.cost
        load_start, load_end = self.load_average
        cpus = self.cpus
        return {
            "format": PROFILE_FORMAT,
            "name": self.cost.name,
            "prefill_ms": [c.p0 * 1e3, c.p1 * 1e3, c.p2 * 1e3],
            "decode_ms": [c.d0 * 1e3, c.d1 * 1e3, c.d2 * 1e3],
            "mixed_decode_ms": [self.mixed_decode[0] * 1e3, self.mixed_decode[1] * 1e3],
            # The engine's compiled shapes: the per-token / per-request terms are paid on padded counts.
            "shape_buckets": {"tokens": list(self.engine_settings["token_buckets"]),
                              "sequences": list(self.engine_settings["decode_buckets"])},
            # What a step costs in each compiled shape (overhead included); the linear terms above are the
            # line through these and only price steps when a reader ignores them.
            "shape_costs_ms": {"tokens": [t * 1e3 for t in self.token_costs],
                               "sequences": [t * 1e3 for t in self.seq_costs]},
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "swap": {"bandwidth_bytes_per_s": c.swap_bandwidth, "latency_s": c.swap_latency, "full_duplex": False},
            "num_device_blocks": self.num_device_blocks,
            "tp": 1,
            "provenance": (f"jserve profile on {self.device}, {self.date}; model {self.engine_settings['model']}; "
                           f"per-step engine overhead {self.overhead_s * 1e3:.3f} ms added to p0 and d0"
                           + ("" if None in self.load_average else
                              f"; host load average {load_start:.2f} -> {load_end:.2f} on {cpus} CPUs")),
            "engine": self.engine_settings,
            "overhead_ms": self.overhead_s * 1e3,
            "copy_rates_bytes_per_s": self.copy_rates,
            "host_load_average_1min": {"start": load_start, "end": load_end, "cpus": cpus},
            "fit": {k: f.summary() for k, f in self.fits.items()},
            "profile_seconds": self.seconds,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def host_load_average() -> float | None:
    """The host's 1-minute load average, or None where the OS does not report one."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


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
        "swap_buckets": list(rc.swap_buckets),
    }


def profile_engine(engine, grid: ProfileGrid | None = None, *, name: str | None = None,
                   progress: Callable[[str], None] | None = None) -> ProfileResult:
    """Time ``engine``'s runner on ``grid`` (default: ``default_grid(engine)``) and fit the cost form."""
    t_start = time.perf_counter()
    load_start = host_load_average()
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

    # Every point's rows are built first; then all points (steps and copies) are timed in interleaved rounds.
    steps = [("prefill", [n] * k, [], _rows([n] * k, [0] * k, pages, vocab)) for k, n in grid.prefill]
    steps += [("decode", [], [ctx] * b, _rows([1] * b, [ctx - 1] * b, pages, vocab)) for b, ctx in grid.decode]
    steps += [("mixed", [n] * k, [ctx] * b, _rows([n] * k + [1] * b, [0] * k + [ctx - 1] * b, pages, vocab))
              for k, n, b, ctx in grid.mixed]
    fns: list[Callable[[], object]] = [lambda rows=rows: runner.run(rows) for *_, rows in steps]
    copy_keys = [(d, n) for d in ("out", "in") for n in grid.copies]
    for direction, n in copy_keys:
        pairs = [(i % usable, i) for i in range(n)] if direction == "out" else [(i, i % usable) for i in range(n)]

        def go(pairs=pairs, direction=direction):
            runner.copy(direction, pairs)
            _block(kv)

        fns.append(go)
    say(f"timing {len(steps)} steps and {len(copy_keys)} copies, {grid.repeats} interleaved rounds")
    times = interleaved_means(fns, grid.repeats, grid.warmup)
    prefill_pts, decode_pts, mixed_pts = [], [], []
    for (kind, lens, ctxs, _), t in zip(steps, times):
        if kind == "prefill":
            prefill_pts.append((lens, t))
        elif kind == "decode":
            decode_pts.append((ctxs, t))
        else:
            mixed_pts.append((lens, ctxs, t))
    copy_pts, rates = [], {}
    for (direction, n), t in zip(copy_keys, times[len(steps):]):
        copy_pts.append((n, t))
        if n == max(grid.copies):
            rates[direction] = n * kv.spec.page_bytes / t
    overhead = 0.0
    if grid.overhead_requests:
        overhead = measure_overhead(engine, grid.overhead_requests, max(1, min(16, max_prompt // 2)), 8)
        say(f"engine overhead: {overhead * 1e3:.3f} ms per step")
    settings = engine_settings(engine)
    device = jax.devices()[0]
    device_name = f"{device.platform}:{getattr(device, 'device_kind', '')}"
    label = name or f"{engine.model.config.name}/{device_name}"
    fit = fit_cost_model(prefill_pts, decode_pts, copy_pts, mixed_pts, block_bytes=kv.spec.page_bytes,
                         overhead=overhead, name=label, token_buckets=c.token_buckets, seq_buckets=c.decode_buckets)
    return ProfileResult(
        cost=fit.cost,
        fits=fit.fits,
        mixed_decode=fit.mixed_decode,
        token_costs=fit.token_costs,
        seq_costs=fit.seq_costs,
        overhead_s=overhead,
        num_device_blocks=usable,
        block_size=c.page_size,
        block_bytes=kv.spec.page_bytes,
        copy_rates=rates,
        engine_settings=settings,
        device=device_name,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=time.perf_counter() - t_start,
        load_average=(load_start, host_load_average()),
    )
