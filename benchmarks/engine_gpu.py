"""Engine figures on the current device (a GPU for the real numbers; ``--tiny`` runs anywhere, e.g. a CPU):

* warm-up: executables compiled and the seconds it took;
* decode step time through the engine's runner (the compiled step the engine serves with: fused sampling,
  fixed-width block tables) at the given batches and context, and MBU = (weight bytes + KV bytes read) /
  step time / measured device copy bandwidth;
* prefill throughput (TFLOP/s) at the given token count against a measured bf16/f32 matmul rate;
* host<->device swap bandwidth through the engine's copy path (pages of all layers), and a decode step with
  overlapped copies issued beside it against one without, until it returns and until the copies are done
  (do the asynchronous transfers hide behind the step?): ``measure`` of ``benchmarks/engine_copies.py``;
* decode through the whole engine loop (``LLMEngine.step``: scheduler, packing, token reads and stop checks
  included), steady state at each batch, with async scheduling on and off, and the MBU that gives;
* one end-to-end engine run under memory pressure (swaps happen) that must produce the same greedy ids as
  ``jserve.models.greedy_generate``.

    python benchmarks/engine_gpu.py --preset llama-3-8b --dtype bfloat16 --json out.json
    python benchmarks/engine_gpu.py --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jserve.engine.profiler import median_time

from engine_copies import measure as measure_copies  # benchmarks/ is this script's directory


def copy_bandwidth(mib: int, reps: int) -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    n = mib * 2**20 // 4
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    t = median_time(lambda: f(x).block_until_ready(), reps, 1)
    return 2 * n * 4 / t


def matmul_rate(dtype, size: int, reps: int) -> float:
    a = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(2), (size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = median_time(lambda: f(a, b).block_until_ready(), reps, 1)
    return 2 * size**3 / t


def save(res: dict, path: str | None) -> None:
    """Write the figures so far (each section saves, so a run cut short by its time limit keeps them)."""
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny-llama at tiny sizes (CPU smoke run)")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--copy-pages", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.preset, a.dtype, a.batches, a.context, a.prefill, a.copy_pages, a.reps = "tiny-llama", "float32", "2,4", 32, 64, 4, 3

    from jserve.engine import EngineConfig, LLMEngine, SamplingParams
    from jserve.engine.runner import BatchRow
    from jserve.models import from_config, get_preset

    res: dict = {"device": str(jax.devices()[0]), "platform": jax.default_backend(), "jax": jax.__version__,
                 "preset": a.preset, "dtype": a.dtype, "date": time.strftime("%Y-%m-%d")}
    print(f"device {res['device']} jax {jax.__version__} preset {a.preset} {a.dtype}", flush=True)
    bw = copy_bandwidth(64 if a.tiny else 2048, a.reps)
    mm_dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    mm = matmul_rate(mm_dtype, 512 if a.tiny else 8192, a.reps)
    res.update(copy_bandwidth_Bps=bw, matmul_flops=mm)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; {a.dtype} matmul {mm / 1e12:.1f} TFLOP/s", flush=True)

    model = from_config(get_preset(a.preset, a.dtype))
    mc = model.config
    batches = [int(x) for x in a.batches.split(",")]
    page = 16
    ctx_pages = -(-(a.context + 1) // page)
    loop_steps = 8 if a.tiny else 40
    # The engine-loop runs' requests must not finish inside the timed window: fcfs admits about one prompt per
    # step once others decode beside it, so the first request has ~batch tokens when the last one starts.
    loop_new = 2 * max(batches) + loop_steps + 16
    max_len = max(a.context + loop_new + page, a.prefill + page)
    # Room for the engine-loop runs too: every request of the largest batch at its full length.
    num_pages = max(batches) * -(-max_len // page) + -(-a.prefill // page) + 2 * a.copy_pages + 2
    cfg = EngineConfig(scheduler="fcfs", max_batch_size=max(batches), max_tokens_per_batch=max(a.prefill, max(batches)),
                       max_model_len=max_len, num_device_blocks=num_pages, num_host_blocks=2 * a.copy_pages,
                       decode_buckets=tuple(batches), token_buckets=(max(a.prefill, max(batches)),),
                       swap_buckets=(a.copy_pages,), progress=False)
    t0 = time.perf_counter()
    engine = LLMEngine(model, cfg)
    runner = engine.runner
    res["warmup_s"] = time.perf_counter() - t0
    res["executables"] = len(runner.executable_keys())
    print(f"warm-up: {res['executables']} executables in {res['warmup_s']:.1f} s", flush=True)

    weight_bytes = model.weight_bytes
    kv_token_bytes = engine.kv.spec.page_bytes // page
    greedy = (SamplingParams(), 0, 0)
    rng = np.random.default_rng(0)
    res["decode"] = []
    for b in batches:
        rows = [BatchRow([int(rng.integers(mc.vocab_size))], a.context, list(range(i * ctx_pages, (i + 1) * ctx_pages)), greedy)
                for i in range(b)]
        t = median_time(lambda: runner.run(rows), a.reps, 1)
        kv_bytes = b * (a.context + 1) * kv_token_bytes
        mbu = (weight_bytes + kv_bytes) / t / bw  # bytes the step must read over the measured copy rate
        # Copies issued beside the step: out of pages the batch does not use, into other free pages.
        cp = measure_copies(engine, a.copy_pages, b, a.context, a.reps)
        row = dict(batch=b, context=a.context, step_ms=t * 1e3, mbu=mbu, copy_pages_each_way=a.copy_pages,
                   step_with_copies_ms=cp["step_with_copies_ms"],
                   step_with_copies_returns_ms=cp["step_with_copies_returns_ms"])
        res["decode"].append(row)
        res["swap"] = dict(pages=cp["pages"], bytes=cp["bytes"], out_GBps=cp["out_GBps"], in_GBps=cp["in_GBps"])
        print(f"decode B={b} ctx={a.context}: {t * 1e3:.2f} ms, MBU {mbu:.2f} (weights {weight_bytes / 1e9:.2f} GB + KV "
              f"{kv_bytes / 1e9:.2f} GB); with {a.copy_pages}+{a.copy_pages} copies issued beside it "
              f"{cp['step_with_copies_returns_ms']:.2f} ms until it returns, {cp['step_with_copies_ms']:.2f} ms until "
              "the copies are done", flush=True)
    sw = res["swap"]
    print(f"swap {sw['pages']} pages ({sw['bytes'] / 2**20:.0f} MiB): out {sw['out_GBps']:.1f} GB/s, in "
          f"{sw['in_GBps']:.1f} GB/s", flush=True)

    rows = [BatchRow(list(map(int, rng.integers(mc.vocab_size, size=a.prefill))), 0, list(range(-(-a.prefill // page))), greedy)]
    t = median_time(lambda: runner.run(rows), a.reps, 1)
    params = sum(int(x.size) for x in jax.tree.leaves(model.state))
    flops = 2 * params * a.prefill + 2 * mc.num_layers * mc.num_heads * mc.head_dim * a.prefill**2  # causal QK+PV
    res["prefill"] = dict(tokens=a.prefill, ms=t * 1e3, tflops=flops / t / 1e12, frac_of_matmul=flops / t / mm)
    print(f"prefill {a.prefill} tokens: {t * 1e3:.1f} ms, {flops / t / 1e12:.1f} TFLOP/s = {flops / t / mm:.2f} of matmul", flush=True)
    save(res, a.json)

    # Decode through LLMEngine.step(): requests of context-length prompts are prefilled, then the loop is timed
    # over steady-state decode iterations (every request decoding). The step time includes whatever host work
    # the loop does not hide behind the device.
    # The engine built above serves these runs (the runner and copy figures left its scheduler idle, and fcfs
    # never swaps); async scheduling is switched between runs, with nothing in flight, so no second warm-up.
    save(res, a.json)
    res["engine_loop"] = []
    eng = engine
    for b in batches:
        for pipelined in (False, True):
            assert not eng.has_unfinished()
            eng.async_scheduling = pipelined
            sp = SamplingParams(max_tokens=loop_new, ignore_eos=True)
            outs = [eng.add_request(list(map(int, rng.integers(3, mc.vocab_size, size=a.context))), sp) for _ in range(b)]
            while not all(o.token_ids for o in outs):  # prefill everything
                eng.step()
            eng.step()
            t0 = time.perf_counter()
            for _ in range(loop_steps):
                eng.step()
            t = (time.perf_counter() - t0) / loop_steps
            finished = sum(o.finished for o in outs)  # must be 0: the batch stayed whole
            for o in outs:
                eng.abort(o.request_id)
            eng.run_until_done()
            ctx_mid = a.context + loop_steps // 2
            mbu = (weight_bytes + b * ctx_mid * kv_token_bytes) / t / bw
            res["engine_loop"].append(dict(batch=b, context=a.context, async_scheduling=pipelined, step_ms=t * 1e3, mbu=mbu,
                                           finished_in_window=finished))
            print(f"engine loop decode B={b} ctx~{ctx_mid} async_scheduling={pipelined}: {t * 1e3:.2f} ms/step, MBU {mbu:.2f}"
                  f" ({finished} finished inside the window)", flush=True)

    save(res, a.json)

    # End to end under memory pressure: the same greedy ids as jserve.models.greedy_generate (its own roomy
    # paged loop, no scheduler), with swaps happening.
    from jserve.models import greedy_generate

    prompts = [list(map(int, rng.integers(3, mc.vocab_size, size=int(n)))) for n in rng.integers(20, 200 if not a.tiny else 40, size=6)]
    new_tokens = 32
    reference = greedy_generate(model, prompts, new_tokens)
    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    bucket = 256 if not a.tiny else 64
    tight = LLMEngine(model, EngineConfig(
        scheduler="fastserve", num_device_blocks=20 if not a.tiny else 12, num_host_blocks=64, max_batch_size=4,
        max_tokens_per_batch=bucket, max_model_len=bucket + new_tokens, decode_buckets=(4,), token_buckets=(bucket,),
        swap_buckets=(8,), progress=False))
    outs = [tight.add_request(pr, sp, request_id=i) for i, pr in enumerate(prompts)]
    while tight.has_unfinished():
        tight.step()
    same = [o.token_ids for o in outs] == reference
    agree = [next((j for j, (x, y) in enumerate(zip(o.token_ids, r)) if x != y), len(r)) for o, r in zip(outs, reference)]
    res["pressure"] = dict(identical=same, agreeing_prefix=agree, blocks_out=tight.stats["blocks_out"], drops=tight.stats["drops"],
                           compiles_after_warmup=tight.stats["compiles_after_warmup"])
    print(f"memory pressure: identical={same} (agreeing prefix per request {agree} of {new_tokens}) swapped-out pages={tight.stats['blocks_out']} drops={tight.stats['drops']} "
          f"compiles after warm-up={tight.stats['compiles_after_warmup']}", flush=True)
    save(res, a.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
