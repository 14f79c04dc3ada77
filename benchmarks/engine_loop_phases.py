"""Where one decode iteration of the engine loop spends its time, with async scheduling on and off.

The engine's decode step is timed three ways at each batch, in one process, modes alternated so drift hits
both alike, for each ``--skip-idle-work`` variant (``EngineConfig.skip_idle_work``: run-time branches that
skip sampling work no row needs, or none):

* **device-bound**: one prepared decode step launched ``--reps`` times back to back (each donates the KV pool
  to the next), then waited for once: the device's own time per step, with host dispatch hidden;
* **launch**: the host time of ``runner.launch`` alone (packing excluded): what dispatch costs the host; and
  the same with the step's input arrays already on the device (what their transfers add);
* **engine loop**: ``LLMEngine.step()`` in steady state (every request decoding, none finishing inside the
  window), with the host time of each phase of the loop: scheduling, packing, waiting for the sampled ids,
  dispatch, token handling (``_collect``), the scheduler's step end and retiring.

    python benchmarks/engine_loop_phases.py --preset llama-3-8b --dtype bfloat16 --skip-idle-work on,off
    python benchmarks/engine_loop_phases.py --tiny                                 # anywhere
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

import numpy as np


def instrument(engine, sink: dict) -> None:
    """Wrap the engine's loop phases so each call adds its host seconds to ``sink[name]``."""
    from jserve.engine import records

    def wrap(obj, attr, name):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sink[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)

    wrap(engine.scheduler, "schedule", "schedule")  # the engine replaces its scheduler only after an error
    wrap(engine.runner, "prepare", "pack")
    wrap(engine.runner, "launch", "dispatch")
    wrap(engine, "_collect", "collect")
    wrap(engine, "_close_iteration", "step_end")
    wrap(engine, "_finalize", "retire")
    read = getattr(records.InFlight.read, "untimed", records.InFlight.read)

    def timed_read(self):
        t0 = time.perf_counter()
        try:
            return read(self)
        finally:
            sink["wait_ids"] += time.perf_counter() - t0

    timed_read.untimed = read
    records.InFlight.read = timed_read


STEP_INPUTS = ("ids", "pos", "metadata", "sampling", "penalties", "feed")  # PreparedStep's host arrays


def back_to_back(runner, step, reps: int) -> tuple[float, float]:
    """Launch ``step`` ``reps`` times back to back (each donates the pool to the next), then wait once:
    (ms per step, median host ms of one launch)."""
    import jax

    t0 = time.perf_counter()
    launches = []
    for _ in range(reps):
        t1 = time.perf_counter()
        out = runner.launch(step)
        launches.append(time.perf_counter() - t1)
    jax.block_until_ready(out.tokens)
    return (time.perf_counter() - t0) / reps * 1e3, float(np.median(launches)) * 1e3


def entry_ops(hlo_text: str) -> dict[str, int]:
    """Op counts of an optimized HLO module's ENTRY computation (what the host launches one by one, unless
    XLA wrapped runs of them into command buffers: ``call`` ops to ``command_buffer`` computations), with
    custom calls split by target (cuBLAS GEMMs, Triton / Pallas kernels)."""
    counts: dict[str, int] = collections.Counter()
    entry = hlo_text[hlo_text.find("ENTRY"):]
    for line in entry.splitlines()[1:]:
        if line.strip() == "}":
            break
        rhs = line.split(" = ", 1)[-1]
        m = re.search(r"\s([a-z][\w-]*)\(", " " + rhs)  # types hold no "word(": the first is the opcode
        if not m:
            continue
        op = m.group(1)
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', line)
            op += ":" + (t.group(1) if t else "?")
        counts[op] += 1
    return dict(counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny-llama at tiny sizes (CPU smoke run)")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="timed engine-loop iterations per run")
    p.add_argument("--rounds", type=int, default=2, help="alternating sync/async runs per batch")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-idle-work", default="default",
                   help="comma-separated variants of EngineConfig.skip_idle_work: on, off, default (by platform)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.preset, a.dtype, a.batches, a.context, a.steps, a.reps = "tiny-llama", "float32", "2,4", 32, 8, 5

    import jax

    from jserve.engine import EngineConfig, LLMEngine, SamplingParams
    from jserve.engine.runner import BatchRow
    from jserve.models import from_config, get_preset

    model = from_config(get_preset(a.preset, a.dtype))
    mc = model.config
    batches = [int(x) for x in a.batches.split(",")]
    page, budget = 16, 2048 if not a.tiny else 64
    # Long enough that no request finishes inside the timed window: fcfs admits about one prompt per step
    # once others decode beside it, so the first request has decoded ~batch tokens when the last starts.
    max_new = 2 * max(batches) + a.steps + 16
    max_len = a.context + max_new + page
    num_pages = max(batches) * -(-max_len // page) + 2
    base = EngineConfig(scheduler="fcfs", max_batch_size=max(batches), max_tokens_per_batch=budget, max_model_len=max_len,
                       num_device_blocks=num_pages, num_host_blocks=4, decode_buckets=tuple(batches),
                       token_buckets=(budget,), swap_buckets=(2,), progress=False)
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "preset": a.preset, "dtype": a.dtype,
           "date": time.strftime("%Y-%m-%d"), "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": [],
           "entry_ops": {}}
    rng = np.random.default_rng(0)
    greedy = (SamplingParams(), 0, 0)
    for variant in a.skip_idle_work.split(","):
        skip = {"on": True, "off": False, "default": None}[variant]
        t0 = time.perf_counter()
        engine = LLMEngine(model, dataclasses.replace(base, skip_idle_work=skip))
        runner = engine.runner
        print(f"device {jax.devices()[0]} jax {jax.__version__} {a.preset} {a.dtype}; skip_idle_work="
              f"{runner.skip_idle_work}; warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        sink: dict = collections.defaultdict(float)
        instrument(engine, sink)
        for b in batches:
            ctx_pages = -(-(a.context + 1) // page)
            rows = [BatchRow([int(rng.integers(mc.vocab_size))], a.context,
                             list(range(i * ctx_pages, (i + 1) * ctx_pages)), greedy) for i in range(b)]
            step = runner.prepare(rows)
            for _ in range(2):
                jax.block_until_ready(runner.launch(step).tokens)
            device_ms, launch_ms = back_to_back(runner, step, a.reps)
            # the same launch with the step's ~25 input arrays already on the device: what their host->device
            # transfers (one per array) add to a launch
            on_device = dataclasses.replace(step, **{f: jax.device_put(getattr(step, f)) for f in STEP_INPUTS})
            jax.block_until_ready(runner.launch(on_device).tokens)
            _, resident_ms = back_to_back(runner, on_device, a.reps)
            n_inputs = len(jax.tree.leaves([getattr(step, f) for f in STEP_INPUTS]))
            print(f"B={b}: device-bound {device_ms:.2f} ms/step; launch (host) {launch_ms:.2f} ms, "
                  f"{resident_ms:.2f} ms with its {n_inputs} inputs already on the device", flush=True)
            try:  # what the host launches per step
                ops = entry_ops(runner._get(("decode", b)).as_text())
                res["entry_ops"][f"{variant}/B{b}"] = ops
                top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
                print(f"B={b}: {sum(ops.values())} ENTRY ops: " + ", ".join(f"{k} {v}" for k, v in top), flush=True)
            except Exception as e:  # the summary is a diagnostic; never lose the timings to it
                print(f"B={b}: no HLO summary ({type(e).__name__}: {e})", flush=True)
            for rnd in range(a.rounds):
                for pipelined in (False, True):
                    engine.async_scheduling = pipelined
                    sp = SamplingParams(max_tokens=max_new, ignore_eos=True)
                    outs = [engine.add_request(list(map(int, rng.integers(3, mc.vocab_size, size=a.context))), sp)
                            for _ in range(b)]
                    while not all(o.token_ids for o in outs):
                        engine.step()
                    engine.step()
                    compiles = engine._watch.count
                    sink.clear()
                    t0 = time.perf_counter()
                    for _ in range(a.steps):
                        engine.step()
                    wall = (time.perf_counter() - t0) / a.steps * 1e3
                    finished = sum(o.finished for o in outs)
                    phases = {k: v / a.steps * 1e3 for k, v in sink.items()}
                    for o in outs:
                        engine.abort(o.request_id)
                    engine.run_until_done()
                    row = dict(skip_idle_work=runner.skip_idle_work, batch=b, context=a.context,
                               async_scheduling=pipelined, round=rnd, step_ms=wall, device_bound_ms=device_ms,
                               launch_ms=launch_ms, launch_resident_inputs_ms=resident_ms, num_inputs=n_inputs,
                               finished_in_window=finished,
                               compiles=engine._watch.count - compiles, phases_ms=phases)
                    res["rows"].append(row)
                    ph = " ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items()))
                    print(f"B={b} async={pipelined!s:5} round {rnd}: {wall:.2f} ms/step (device-bound {device_ms:.2f});"
                          f" host ms/step: {ph}; finished in window {finished}; compiles {row['compiles']}", flush=True)
        del engine, runner
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
