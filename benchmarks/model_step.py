"""Model-step benchmark: time jserve's jitted iteration step on the current device.

Builds a preset with dummy weights (made on the device), measures the device's copy bandwidth (a large
device-to-device copy: bytes read + written per second), then times

* decode steps (one token per sequence, ``decode_only`` kernel) for each batch size x context length, and
* prefill steps (one sequence of N prompt tokens, ragged kernel),

and prints step time, tokens/s and MBU = (weight bytes + KV bytes read) / step time / copy bandwidth.
Compiles are bounded: one per (batch, context) decode shape and one per prefill length.

    python benchmarks/model_step.py                       # smollm2-135m float32, CPU-sized grid
    python benchmarks/model_step.py --preset llama-3-8b --dtype bfloat16   # GPU: full grid
    python benchmarks/model_step.py --json out.json       # also written to $OUT/model_step.json if $OUT is set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jserve.models import SeqChunk, build_step, from_config, get_preset  # noqa: E402


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes moved (read + write) per second by an on-device elementwise copy of ``nbytes``."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * nbytes / best


def time_step(model, chunks, page_size, caches, reps, pages_per_seq=None):
    """(compile+first-run seconds, median step seconds, caches) for one fixed-shape step."""
    s = build_step(chunks, page_size, pages_per_seq=pages_per_seq)
    t0 = time.perf_counter()
    logits, caches = model.step(s.input_ids, s.positions, caches, s.metadata)
    logits.block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        logits, caches = model.step(s.input_ids, s.positions, caches, s.metadata)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), caches


def main(argv: list[str] | None = None) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on GPU)")
    ap.add_argument("--batches", default="1,16,64" if on_gpu else "1,16")
    ap.add_argument("--contexts", default="512,2048" if on_gpu else "512")
    ap.add_argument("--prefill", default="512,2048" if on_gpu else "512")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5 if on_gpu else 3)
    ap.add_argument("--backend", default=None, help="kernels_pallas backend (default: platform choice)")
    ap.add_argument("--copy-mib", type=int, default=1024 if on_gpu else 256)
    ap.add_argument("--table", choices=["max", "exact"], default="max" if on_gpu else "exact",
                    help="block-table width for decode: 'max' = longest context (one compile per batch size, as "
                    "an engine buckets it; the Pallas kernel stops at each sequence's length), 'exact' = per context")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    batches = [int(b) for b in args.batches.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    prefills = [int(p) for p in args.prefill.split(",") if p]
    ps = args.page_size

    cfg = get_preset(args.preset, dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), preset {cfg.name} {dtype}, "
          f"backend {args.backend or 'default'}", flush=True)
    bw = copy_bandwidth(args.copy_mib << 20)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read+write, {args.copy_mib} MiB)", flush=True)

    t0 = time.perf_counter()
    model = from_config(cfg, backend=args.backend)
    jax.block_until_ready(model.state)
    init_s = time.perf_counter() - t0
    wbytes = model.weight_bytes
    print(f"dummy init: {init_s:.2f} s, {model.num_params / 1e9:.3f} B params, {wbytes / 2**30:.2f} GiB", flush=True)

    max_tokens = max([b * c for b in batches for c in contexts] + prefills)
    num_pages = -(-max_tokens // ps) + 1
    caches = model.allocate_kv_caches(num_pages, ps)
    kv_tok = cfg.kv_bytes_per_token()
    print(f"KV pool: {num_pages} pages x {ps} tokens, {num_pages * ps * kv_tok / 2**30:.2f} GiB", flush=True)

    results = []
    print(f"{'kind':8} {'batch':>5} {'ctx/len':>7} {'compile s':>9} {'step ms':>9} {'tok/s':>10} {'MBU':>6}")
    for c in contexts:
        m = -(-c // ps)
        for b in batches:
            if b * m > num_pages:
                continue
            chunks = [SeqChunk([7], c - 1, list(range(i * m, (i + 1) * m))) for i in range(b)]
            width = -(-max(contexts) // ps) if args.table == "max" else m
            first, step, caches = time_step(model, chunks, ps, caches, args.reps, width)
            kv_read = b * c * kv_tok
            mbu = (wbytes + kv_read) / step / bw
            rec = dict(kind="decode", batch=b, context=c, compile_s=first, step_ms=step * 1e3,
                       tokens_per_s=b / step, weight_bytes=wbytes, kv_bytes_read=kv_read, mbu=mbu)
            results.append(rec)
            print(f"{'decode':8} {b:5d} {c:7d} {first:9.2f} {step * 1e3:9.2f} {b / step:10.1f} {mbu:6.2f}", flush=True)
    for n in prefills:
        chunks = [SeqChunk(list(np.arange(n) % cfg.vocab_size), 0, list(range(-(-n // ps))))]
        first, step, caches = time_step(model, chunks, ps, caches, args.reps)
        flops = 2 * model.num_params * n
        rec = dict(kind="prefill", batch=1, context=n, compile_s=first, step_ms=step * 1e3, tokens_per_s=n / step,
                   tflops=flops / step / 1e12, weight_bytes=wbytes)
        results.append(rec)
        print(f"{'prefill':8} {1:5d} {n:7d} {first:9.2f} {step * 1e3:9.2f} {n / step:10.1f}      "
              f"({flops / step / 1e12:.1f} TFLOP/s matmul)", flush=True)

    out = dict(device=device.device_kind, platform=jax.default_backend(), preset=cfg.name, dtype=dtype,
               backend=args.backend, table=args.table, copy_bandwidth_gbs=bw / 1e9, init_s=init_s, num_params=model.num_params,
               weight_bytes=wbytes, page_size=ps, trace_count=model.trace_count, results=results)
    targets = [args.json] if args.json else []
    if os.environ.get("OUT"):
        targets.append(str(Path(os.environ["OUT"]) / "model_step.json"))
    for t in targets:
        Path(t).parent.mkdir(parents=True, exist_ok=True)
        Path(t).write_text(json.dumps(out, indent=2))
        print(f"wrote {t}")
    return out


if __name__ == "__main__":
    main()
