"""Benchmark of one ``schedule()`` call per policy: ``python -m schedulers.bench [--json]``.

For each policy and each size ``RxW`` (default ``16x400`` and ``128x2000``) the benchmark builds a live
state with ``R`` requests running (``max_batch_size = R``, each already prefilled and decoding) and ``W``
more queued, then times ``schedule()`` over ``--steps`` consecutive iterations. Between timed calls an
untimed executor applies the plan (``on_step_end`` with the cost model's step time) and tops the live
population back up to ``R + W`` with new arrivals, so the state stays at its size while the policy evolves
naturally (preemptive policies start, offload and upload jobs as they would under overload).

Lengths are ShareGPT-like (log-normal prompts around 160 tokens and outputs around 340, capped to the
model length), from a fixed seed. ``--clock cpu`` times with the process CPU clock instead of the wall
clock: on a machine shared with other jobs, wall-clock p99 mostly measures the OS scheduler. The device pool holds ``R`` jobs of average size twice over (at least the
artifact's 883 blocks), the host pool ten times that; the cost model is ``cost.default_cost_model()``
(OPT-13B on an A100). Prints a table of median and p99 milliseconds, or with ``--json``
``{"<policy>": {"16x400": {"median_ms": .., "p99_ms": ..}, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time

from .config import SchedulerConfig
from .cost import default_cost_model, plan_compute_time
from .registry import POLICY_NAMES, make_scheduler
from .request import Request

DEFAULT_SIZES = ("16x400", "128x2000")


def _lengths(rng: random.Random, max_len: int) -> tuple[int, int]:
    prompt = min(max(int(rng.lognormvariate(math.log(110), 0.9)), 4), 1024)
    out = min(max(int(rng.lognormvariate(math.log(230), 0.9)), 4), max_len - prompt)
    return prompt, out


def _parse_size(text: str) -> tuple[int, int]:
    try:
        r, w = text.lower().split("x")
        r, w = int(r), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not RUNNINGxWAITING, e.g. 16x400") from None
    if r < 1 or w < 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: need at least 1 running and 0 waiting requests")
    return r, w


def bench_one(policy: str, running: int, waiting: int, steps: int, seed: int = 0, clock=time.perf_counter) -> list[float]:
    """Seconds taken by each of ``steps`` timed ``schedule()`` calls of ``policy`` at the given size.

    ``clock`` is ``time.perf_counter`` (wall time) or ``time.process_time`` (CPU time of this process, which
    leaves out the time other processes on a busy machine take from it)."""
    rng = random.Random(seed)
    cost = default_cost_model()
    avg_blocks = 32  # ~500 tokens of 16
    cfg = SchedulerConfig(
        max_batch_size=running,
        max_tokens_per_batch=max(2048, running),
        num_device_blocks=max(883, 2 * running * avg_blocks),
        num_host_blocks=20 * running * avg_blocks,
    )
    sched = make_scheduler(policy, cfg, cost)
    next_id = 0
    now = 0.0

    def arrive(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            p, o = _lengths(rng, cfg.max_model_len)
            sched.add(Request(next_id, p, o, arrival_time=now, oracle_output_len=o), now)
            next_id += 1

    def step(timed: bool) -> float:
        nonlocal now
        t0 = clock()
        plan = sched.schedule(now)
        dt = clock() - t0
        swapped = len(plan.swap_out) + len(plan.swap_in)
        sync = len(plan.sync_swap_out) + len(plan.sync_swap_in)
        elapsed = max(plan_compute_time(cost, plan), cost.swap_time(swapped)) + cost.swap_time(sync)
        elapsed = max(elapsed, 1e-3)
        sched.on_step_end(plan, now + elapsed, elapsed)
        now += elapsed
        return dt

    # Start R requests (they prefill and begin decoding), then queue W more.
    arrive(running)
    for _ in range(8):
        step(timed=False)
    arrive(waiting)
    for _ in range(5):
        step(timed=False)
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(steps):
            arrive(running + waiting - len(sched.requests))
            times.append(step(timed=True))
    finally:
        gc.enable()
    return times


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m schedulers.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated policy names")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated RUNNINGxWAITING sizes")
    ap.add_argument("--steps", type=int, default=300, help="timed schedule() calls per policy and size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (robust to other load on the machine)",
    )
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICY_NAMES:
            ap.error(f"unknown policy {p!r}; known: {', '.join(POLICY_NAMES)}")
    try:
        sizes = [(s.strip(), _parse_size(s.strip())) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    if not policies:
        ap.error("--policies needs at least one policy name")
    if not sizes:
        ap.error("--sizes needs at least one RUNNINGxWAITING size")
    out: dict[str, dict] = {}
    for p in policies:
        out[p] = {}
        for label, (r, w) in sizes:
            clock = time.perf_counter if args.clock == "wall" else time.process_time
            times = bench_one(p, r, w, args.steps, args.seed, clock)
            out[p][label] = {
                "median_ms": round(_percentile(times, 0.5) * 1e3, 4),
                "p99_ms": round(_percentile(times, 0.99) * 1e3, 4),
            }
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        head = f"{'policy':<15}" + "".join(f"{label + ' med/p99 ms':>26}" for label, _ in sizes)
        print(head)
        for p, row in out.items():
            print(f"{p:<15}" + "".join(f"{row[l]['median_ms']:>13.3f}{row[l]['p99_ms']:>13.3f}" for l, _ in sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
