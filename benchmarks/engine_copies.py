"""Host-offload copy figures through the engine's own copy path (``ModelRunner.copy`` / ``ModelRunner.run``):

* swap-out and swap-in bandwidth: ``n`` pages of every layer (K and V) per direction, timed until the
  destination is ready (bytes moved / seconds);
* a decode step's time alone, and with ``n`` + ``n`` pages of overlapped copies issued beside it (pages the
  batch does not touch, as the scheduler guarantees): both until the step *returns* (the sampled ids are
  read: what the engine loop waits for; the copies may still be in flight) and until *everything* is done
  (ids, device pool and host pages ready). If the copies hide behind the step, the last two figures stay
  close to the step alone.

    python benchmarks/engine_copies.py                       # smollm2-135m float32 (dummy weights), CPU-sized
    python benchmarks/engine_copies.py --preset llama-3-8b --dtype bfloat16 --pages 32 --batch 16 --context 1024

``benchmarks/engine_gpu.py`` reports the same figures with ``measure`` from here. Prints one line per figure
and, with ``--json PATH``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from jserve.engine.profiler import median_time


def measure(engine, pages: int, batch: int, context: int, reps: int) -> dict:
    """The copy figures of ``engine`` (idle; its device pool must hold ``batch`` contexts plus ``2 * pages``)."""
    from jserve.engine.runner import BatchRow
    from jserve.engine.sampling import SamplingParams

    runner, kv = engine.runner, engine.kv
    page = runner.config.page_size
    ctx_pages = -(-(context + 1) // page)
    if batch * ctx_pages + 2 * pages > kv.num_device_pages - 1 or 2 * pages > kv.num_host_pages:
        raise ValueError(f"the engine's pools ({kv.num_device_pages} device, {kv.num_host_pages} host pages) are too "
                         f"small for batch {batch} at context {context} plus {pages} + {pages} copied pages")
    nbytes = pages * kv.spec.page_bytes

    def ready():
        jax.block_until_ready((kv.device, kv.host))

    out_pairs = [(j, j) for j in range(pages)]  # device pages 0.. -> host pages 0..
    in_pairs = [(j, pages + j) for j in range(pages)]  # host pages 0.. -> device pages pages..

    def out():
        runner.copy("out", out_pairs)
        ready()

    def inn():
        runner.copy("in", in_pairs)
        ready()

    t_out = median_time(out, reps, 1)
    t_in = median_time(inn, reps, 1)

    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    greedy = (SamplingParams(), 0, 0)
    first = 2 * pages  # the batch's pages start after the copied ones
    rows = [BatchRow([int(rng.integers(vocab))], context, list(range(first + i * ctx_pages, first + (i + 1) * ctx_pages)),
                     greedy) for i in range(batch)]
    # While the step computes: device pages 0.. go out to host pages pages.. (fresh ids), host pages 0.. come in
    # to device pages pages.. (neither set is read or written by the batch).
    step_outs = [(j, pages + j) for j in range(pages)]
    step_ins = [(j, pages + j) for j in range(pages)]

    alone, returns, done = [], [], []
    for i in range(reps + 1):  # alternately without and with copies (machine load hits both alike); 0: warm-up
        t0 = time.perf_counter()
        runner.run(rows)
        ready()
        t1 = time.perf_counter()
        runner.run(rows, step_outs, step_ins)  # returns once the sampled ids are read
        t2 = time.perf_counter()
        ready()
        t3 = time.perf_counter()
        if i:
            alone.append(t1 - t0)
            returns.append(t2 - t1)
            done.append(t3 - t1)
    return dict(pages=pages, bytes=nbytes, out_s=t_out, in_s=t_in, out_GBps=nbytes / t_out / 1e9,
                in_GBps=nbytes / t_in / 1e9, batch=batch, context=context, step_ms=float(np.median(alone)) * 1e3,
                step_with_copies_ms=float(np.median(done)) * 1e3, step_with_copies_returns_ms=float(np.median(returns)) * 1e3,
                copies_alone_ms=(t_out + t_in) * 1e3)


def report(r: dict) -> str:
    return (f"swap {r['pages']} pages ({r['bytes'] / 2**20:.1f} MiB): out {r['out_GBps']:.2f} GB/s "
            f"({r['out_s'] * 1e3:.1f} ms), in {r['in_GBps']:.2f} GB/s ({r['in_s'] * 1e3:.1f} ms)\n"
            f"decode B={r['batch']} ctx={r['context']}: {r['step_ms']:.2f} ms alone; with {r['pages']}+{r['pages']} copies "
            f"issued beside it {r['step_with_copies_returns_ms']:.2f} ms until it returns, {r['step_with_copies_ms']:.2f} ms "
            f"until everything is done (the copies alone {r['copies_alone_ms']:.1f} ms)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--pages", type=int, default=32, help="pages per copy direction")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from jserve.engine import EngineConfig, LLMEngine
    from jserve.models import from_config, get_preset

    model = from_config(get_preset(a.preset, a.dtype))
    page = 16
    ctx_pages = -(-(a.context + 1) // page)
    cfg = EngineConfig(scheduler="fcfs", max_batch_size=a.batch, max_tokens_per_batch=max(64, a.batch),
                       max_model_len=a.context + 64, num_device_blocks=a.batch * ctx_pages + 2 * a.pages + 1,
                       num_host_blocks=2 * a.pages, decode_buckets=(a.batch,), token_buckets=(max(64, a.batch),),
                       swap_buckets=(a.pages,), progress=False)
    t0 = time.perf_counter()
    engine = LLMEngine(model, cfg)
    warm = time.perf_counter() - t0
    print(f"device {jax.devices()[0]} jax {jax.__version__} {a.preset} {a.dtype}; page {engine.kv.spec.page_bytes} B; "
          f"warm-up {warm:.1f} s", flush=True)
    r = measure(engine, a.pages, a.batch, a.context, a.reps)
    r.update(device=str(jax.devices()[0]), preset=a.preset, dtype=a.dtype, date=time.strftime("%Y-%m-%d"))
    print(report(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
