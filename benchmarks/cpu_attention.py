"""CPU decode attention: jserve's native kernel (the ``cpu`` backend) beside the ``xla`` backend's page-chunk
loops, on SmolLM2's attention shapes (9 query heads over 3 KV heads of 64, pages of 16 tokens), one layer.

Every sequence of the batch has the same context; block tables are as wide as the engine's
(``--max-model-len / 16`` columns), and each sequence's pages are its own. Prints the median milliseconds of
``--reps`` calls per (batch, context) and the K/V bytes read per second by the native kernel.

    python benchmarks/cpu_attention.py                          # batch 1, 8, 32 x context 100, 1000
    python benchmarks/cpu_attention.py --batches 32 --contexts 100 --reps 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels_cpu  # noqa: E402
from jserve.engine.profiler import median_time  # noqa: E402
from kernels_pallas import paged_decode_attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def time_case(batch: int, context: int, width: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    per_seq = -(-context // PAGE)
    num_pages = 1 + batch * per_seq
    shape = (KV_HEADS, num_pages, PAGE, HEAD_DIM)
    k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    q = jnp.asarray(rng.standard_normal((batch, Q_HEADS, HEAD_DIM), dtype=np.float32))
    tables = np.zeros((batch, width), np.int32)
    tables[:, :per_seq] = np.arange(1, num_pages).reshape(batch, per_seq)
    tables, lengths = jnp.asarray(tables), jnp.full((batch,), context, jnp.int32)
    row = dict(batch=batch, context=context)
    for backend in ("cpu", "xla"):
        f = jax.jit(lambda *a, b=backend: paged_decode_attention(*a, scale=HEAD_DIM**-0.5, backend=b))
        row[f"{backend}_ms"] = median_time(lambda: f(q, k, v, tables, lengths).block_until_ready(), reps,
                                           warmup=2) * 1e3
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 4
    row["cpu_kv_gbs"] = kv_bytes / row["cpu_ms"] / 1e6
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="100,1000")
    ap.add_argument("--max-model-len", type=int, default=2048, help="table width = this / 16")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    try:
        batches = [int(x) for x in a.batches.split(",") if x]
        contexts = [int(x) for x in a.contexts.split(",") if x]
    except ValueError:
        ap.error("--batches and --contexts must be comma-separated integers")
    width = -(-a.max_model_len // PAGE)
    if not batches or not contexts or min(batches) < 1 or min(contexts) < 1 or max(contexts) > width * PAGE:
        ap.error(f"batches must be >= 1 and contexts within 1..{width * PAGE} (--max-model-len)")
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    if not kernels_cpu.native_available():
        print(f"native kernels unavailable ({kernels_cpu.build.unavailable_reason()}): both columns run xla")
    print(f"{'batch':>5} {'context':>7} {'native ms':>10} {'xla ms':>8} {'speed-up':>8} {'native KV GB/s':>15}")
    rows = []
    for b in batches:
        for c in contexts:
            r = time_case(b, c, width, a.reps)
            rows.append(r)
            print(f"{b:5d} {c:7d} {r['cpu_ms']:10.3f} {r['xla_ms']:8.3f} {r['xla_ms'] / r['cpu_ms']:8.2f} "
                  f"{r['cpu_kv_gbs']:15.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
