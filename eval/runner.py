"""Run simulations: one (``execute_run``) or a sweep in parallel processes (``run_sweep``).

A ``RunSpec`` is one point of one curve: a system, a workload (dataset, request count, rate, arrival process,
transforms, seed) and the hardware preset. Figures share runs (Fig 12 and 13 read Fig 11's ShareGPT runs), so
a sweep deduplicates specs before running. Each run writes its artifact-format client log under
``<logs_root>/<log_group>/`` and returns a small picklable ``RunResult`` holding every metric any figure
needs; records stay in the worker. A run that raises is reported as a ``RunResult`` with ``error`` set and the
sweep goes on.

Parallelism: ``concurrent.futures.ProcessPoolExecutor`` (fork where available and JAX is not loaded, else
spawn), longest runs first, with a
tqdm progress bar on stderr. Engine-backed specs (``backend="engine"``) replay on the real engine instead
(``engine_spec_run``), one after another in this process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from .costmodels import resolve_preset
from .engine_backend import EngineOptions
from .experiments.figures import SLO_PAIRS, slo_metric
from .experiments.systems import SystemSpec, get_system, scheduler_config
from .simulator import CopyLink, simulate

BACKENDS = ("sim", "engine")


@dataclass(frozen=True)
class RunSpec:
    system: SystemSpec
    dataset: str
    num_requests: int
    rate: float
    batch_size: int = 16
    preset: str = "opt-13b-a100"
    arrival: str = "poisson"
    cv: float = 1.0
    io_ratio_scale: float = 1.0
    seed: int = 0
    dataset_path: str | None = None
    log_group: str = "opt-13b"
    log_batch_size: bool = False
    backend: str = "sim"  # "sim" or "engine" (replay on the real engine; see eval.engine_backend)
    engine: EngineOptions | None = None  # the engine backend's model, pools and cost profile
    device: str | None = None  # the simulator on a profiled device: rates scaled to it from ``preset`` (below)

    def log_name(self) -> str:
        from .artifact_log import log_filename

        return log_filename(
            self.system.label,
            self.dataset,
            self.num_requests,
            self.rate,
            self.batch_size if self.log_batch_size else None,
        )

    def workload_spec(self):
        from .workloads import WorkloadSpec

        return WorkloadSpec(
            dataset=self.dataset,
            num_requests=self.num_requests,
            rate=self.rate,
            arrival=self.arrival,
            cv=self.cv,
            dataset_path=self.dataset_path,
            io_ratio_scale=self.io_ratio_scale,
        )

    def describe(self) -> str:
        extra = []
        if self.batch_size != 16:
            extra.append(f"bs={self.batch_size}")
        if self.cv != 1.0:
            extra.append(f"cv={self.cv:g}")
        if self.io_ratio_scale != 1.0:
            extra.append(f"io x{self.io_ratio_scale:g}")
        tail = f" ({', '.join(extra)})" if extra else ""
        on = self.preset if self.device is None else f"{self.device} (rates scaled from {self.preset})"
        return f"{self.system.label} {self.dataset} n={self.num_requests} rate={self.rate:g} on {on}{tail}"

    def cost_estimate(self) -> float:
        """Relative cost used to start the longest runs first."""
        return self.num_requests * (3.0 if self.dataset == "sharegpt" else 1.0)


@dataclass
class RunResult:
    spec: RunSpec
    metrics: dict | None = None
    error: str | None = None
    wall_seconds: float = 0.0
    log_path: str | None = None
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def run_metrics(records) -> dict:
    """Every per-run number a figure or report reads: ``summarize`` + SLO attainments + time breakdown."""
    from .metrics import slo_attainment, summarize, time_breakdown

    m = summarize(records)
    for ttft, norm in SLO_PAIRS:
        m[slo_metric(ttft, norm)] = slo_attainment(records, ttft, norm)
    for k, v in time_breakdown(records).items():
        m[f"breakdown_{k}"] = v
    m["num_preemptions"] = sum(r.num_preemptions for r in records)
    return m


_ENGINES: dict = {}  # (EngineOptions, batch size) -> the warmed-up engine of this process
_RATE_SCALES: dict = {}  # (device key, batch size, preset, dataset, lengths) -> its rate scale (the latest only)


def simulate_spec(spec: RunSpec, *, record_requests: bool = False, check: bool = False):
    """Build the workload, scheduler, cost model and link of ``spec`` and simulate it. Returns the SimResult.

    With ``spec.device`` (a ``jserve profile`` file) this is the simulator's prediction of the engine backend's
    run on that device: the profile's prices, link, pools and limits, lengths fitted to its context and rates
    scaled from ``spec.preset`` to it (``device_workload``); ``stats`` carries the scale."""
    from schedulers import make_scheduler

    from .experiments.systems import device_scheduler_config
    from .workloads import make_workload

    if spec.device is None:
        preset = resolve_preset(spec.preset)
        workload = make_workload(spec.workload_spec(), spec.seed)
        config = scheduler_config(spec.system, preset, spec.dataset, batch_size=spec.batch_size)
        scheduler = make_scheduler(spec.system.policy, config, cost_model=preset.cost)
        return simulate(
            scheduler, workload, preset.cost, CopyLink.from_preset(preset), record_requests=record_requests, check=check
        )
    device = resolve_preset(spec.device)
    link = CopyLink.from_preset(device)
    on_device = lambda system: device_scheduler_config(  # noqa: E731
        system, device, spec.dataset, batch_size=spec.batch_size)
    workload, scale = device_workload(spec, ("sim", spec.device), lambda fcfs: on_device(get_system("fcfs")),
                                      device.cost, link, device.limits.max_model_len if device.limits else None)
    scheduler = make_scheduler(spec.system.policy, on_device(spec.system), cost_model=device.cost)
    sim = simulate(scheduler, workload, device.cost, link, record_requests=record_requests, check=check)
    sim.stats.update(rate_scale=scale, device_rate=spec.rate * scale, profile=spec.device)
    return sim


def device_workload(spec: RunSpec, device_key, device_config, device_cost, device_link,
                    max_model_len: int | None) -> tuple[list, float]:
    """``spec``'s workload as a device runs it: lengths fitted to ``max_model_len`` (None: kept) and arrival
    times divided by the rate scale, FCFS's simulated capacity on the device over that on ``spec.preset``
    (``eval.engine_backend``). ``device_config`` maps the preset's FCFS ``SchedulerConfig`` to the device's.
    The scale is computed once per device, preset and request lengths (a figure's rates share it)."""
    import dataclasses

    from .engine_backend import fcfs_capacity, fit_lengths, rate_scale
    from .workloads import make_workload

    preset = resolve_preset(spec.preset)
    wspec = spec.workload_spec()
    workload = make_workload(wspec, spec.seed)
    fitted = workload if max_model_len is None else fit_lengths(workload, max_model_len, wspec.max_total_len)
    key = (device_key, spec.batch_size, preset.name, spec.dataset, tuple((w.prompt_len, w.output_len) for w in workload))
    if key not in _RATE_SCALES:
        _RATE_SCALES.clear()
        fcfs = scheduler_config(get_system("fcfs"), preset, spec.dataset, batch_size=spec.batch_size)
        capacity = fcfs_capacity(fcfs, preset.cost, CopyLink.from_preset(preset), workload)
        try:
            on_device = fcfs_capacity(device_config(fcfs), device_cost, device_link, fitted)
        except ValueError as exc:  # e.g. pools too small for the workload's longest request
            raise ValueError(f"cannot scale the rates to the device: FCFS does not serve this workload there "
                             f"({exc})") from None
        _RATE_SCALES[key] = rate_scale(capacity, on_device)
    scale = _RATE_SCALES[key]
    return [dataclasses.replace(w, arrival_time=w.arrival_time / scale) for w in fitted], scale


def engine_spec_run(spec: RunSpec):
    """Replay ``spec``'s workload on the real engine: lengths fitted to the model's context, rates scaled from
    ``spec.preset`` to the engine's profile (``eval.engine_backend``). Returns (records, stop_reason, stats)."""
    from .costmodels import load_profile
    from .engine_backend import build_engine, engine_scheduler_config, replay, use_policy

    opts = spec.engine or EngineOptions()
    if opts.profile is None:
        raise ValueError("the engine backend needs the engine's cost profile: run `jserve profile --out P.json` "
                         "with the same engine settings and pass --cost P.json")
    device = load_profile(opts.profile)
    preset = resolve_preset(spec.preset)
    key = (opts, spec.batch_size)
    if key not in _ENGINES:
        _ENGINES.clear()  # one engine per process at a time
        _ENGINES[key] = build_engine(opts, spec.batch_size)
    engine = _ENGINES[key]
    # FCFS's simulated capacity on each side: a second or two per side for 2000 ShareGPT requests
    fitted, scale = device_workload(spec, key, lambda fcfs: engine_scheduler_config(engine, fcfs), device.cost,
                                    CopyLink.from_preset(device), engine.max_model_len)
    config = scheduler_config(spec.system, preset, spec.dataset, batch_size=spec.batch_size)
    use_policy(engine, spec.system.policy, config, device.cost)
    run = replay(engine, fitted, seed=spec.seed, id_prefix=(spec.system.label, spec.rate, spec.seed))
    stats = dict(run.stats, rate_scale=scale, device_rate=spec.rate * scale, profile=opts.profile)
    return run.records, run.stop_reason, stats


def _json_safe(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


def execute_run(spec: RunSpec, logs_root: str | Path | None) -> RunResult:
    """Simulate ``spec``, write its client log (when ``logs_root`` is given) and compute its metrics.
    Never raises: a failure comes back as ``RunResult.error``."""
    t0 = time.perf_counter()
    try:
        if spec.backend == "engine":
            records, stop_reason, stats = engine_spec_run(spec)
        elif spec.backend == "sim":
            sim = simulate_spec(spec)
            records, stop_reason, stats = sim.records, sim.stop_reason, sim.stats
        else:
            raise ValueError(f"unknown backend {spec.backend!r}; choose from {BACKENDS}")
        metrics = run_metrics(records)
        metrics["stop_reason"] = stop_reason
        log_path = None
        if logs_root is not None:
            from .artifact_log import RUN_KEY, write_client_log

            directory = Path(logs_root) / spec.log_group
            directory.mkdir(parents=True, exist_ok=True)
            log_path = directory / spec.log_name()
            header = {
                "system": spec.system.label,
                "policy": spec.system.policy,
                "overrides": dict(spec.system.overrides),
                "config_preset": spec.system.config_preset,
                "dataset": spec.dataset,
                "num_requests": spec.num_requests,
                "rate": spec.rate,
                "arrival": spec.arrival,
                "cv": spec.cv,
                "io_ratio_scale": spec.io_ratio_scale,
                "batch_size": spec.batch_size,
                "hardware": spec.preset,
                "seed": spec.seed,
                "dataset_path": spec.dataset_path,
                "device": spec.device,
                "backend": spec.backend,
                "stop_reason": stop_reason,
            }
            if spec.engine is not None:
                header["engine"] = {k: v for k, v in asdict(spec.engine).items()}
            extra = [
                RUN_KEY + json.dumps(header, default=str),
                f"jserve-{spec.backend}-stats: " + json.dumps(_json_safe(stats), default=str),
            ]
            write_client_log(log_path, records, extra_lines=extra)
        return RunResult(
            spec, metrics, None, time.perf_counter() - t0, str(log_path) if log_path else None, dict(stats)
        )
    except Exception as exc:  # a failed run is reported; the sweep continues
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
        return RunResult(spec, None, detail + where, time.perf_counter() - t0)


def _pool_context():
    """Fork (cheap start) unless JAX is loaded in this process: forking a multithreaded JAX runtime can
    deadlock the children, so then a fresh interpreter per worker ("spawn") is used instead."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "jax" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def run_sweep(
    specs: Iterable[RunSpec],
    logs_root: str | Path | None,
    *,
    jobs: int | None = None,
    progress: bool = True,
    desc: str = "simulating",
) -> dict[RunSpec, RunResult]:
    """Run every distinct spec (in ``jobs`` processes; 1 = in this process) and return results by spec."""
    unique = list(dict.fromkeys(specs))
    unique.sort(key=lambda s: -s.cost_estimate())
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(unique) or 1))
    if any(s.backend == "engine" for s in unique):
        jobs = 1  # engine runs are real-time and own the device: strictly one after another, in this process
    results: dict[RunSpec, RunResult] = {}
    bar = _progress(len(unique), desc, progress)
    try:
        if jobs == 1:
            for spec in unique:
                results[spec] = execute_run(spec, logs_root)
                _tick(bar, results[spec])
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=_pool_context()) as pool:
                futures = {pool.submit(execute_run, spec, logs_root): spec for spec in unique}
                for fut in as_completed(futures):
                    spec = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:  # the worker process itself died
                        res = RunResult(spec, None, f"worker failed: {exc!r}")
                    results[spec] = res
                    _tick(bar, res)
    finally:
        if bar is not None:
            bar.close()
    return results


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)


def _tick(bar, res: RunResult) -> None:
    """Count a finished run on the progress bar; a failed one is named on stderr, with or without the bar."""
    if not res.ok:
        message = f"FAILED {res.spec.describe()}: {res.error}"
        if bar is None:
            print(message, file=sys.stderr)
        else:
            bar.write(message, file=sys.stderr)
    if bar is not None:
        bar.update(1)


def result_row(res: RunResult) -> dict:
    """One flat CSV row for a run."""
    s = res.spec
    row = {
        "system": s.system.label,
        "policy": s.system.policy,
        "dataset": s.dataset,
        "num_requests": s.num_requests,
        "rate": s.rate,
        "batch_size": s.batch_size,
        "hardware": s.preset,
        "arrival": s.arrival,
        "cv": s.cv,
        "io_ratio_scale": s.io_ratio_scale,
        "seed": s.seed,
        "wall_seconds": round(res.wall_seconds, 3),
        "error": res.error or "",
        "log": res.log_path or "",
    }
    if res.metrics:
        row.update(res.metrics)
    for k in ("iterations", "swaps_out", "swaps_in", "drops", "bytes_out", "bytes_in", "peak_device_blocks", "peak_host_blocks"):
        row[f"sim_{k}"] = res.stats.get(k, "")
    return row


def spec_dict(spec: RunSpec) -> dict:
    d = asdict(spec)
    d["system"] = spec.system.label
    return d
