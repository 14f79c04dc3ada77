"""CPU matmul floor: what XLA:CPU and torch reach on SmolLM2's layer shapes, and the machine's memory bandwidth.

The engine's CPU decode speed is bounded by its matmuls (docs/models.md, "CPU speed"). This script measures
that bound apart from the engine, on the same shapes, so the figures in the docs can be re-made:

* memory read bandwidth (a ``jnp.sum`` over 512 MiB) and copy bandwidth;
* a chain of 30 SmolLM2 MLP blocks (gate/up 576 -> 1536, down 1536 -> 576, weights ``[out, in]``, 318 MB in
  all, so they stream from memory as in a real step) at M = 1, 8, 32 rows, float32, three ways: XLA's dot
  (``jit``), jserve's native kernel (``kernels_cpu.matmul_nt``, what the models run on a CPU) and torch
  (``F.linear``): milliseconds, GFLOP/s and weight bytes streamed per second;
* one M x 576 x 1536 product in float32 and bfloat16 for each library (8 independent weight matrices, cache
  resident): does the library have a faster bfloat16 path on this CPU (AMX / AVX512-BF16)?

    python benchmarks/cpu_matmul.py                 # prints a table
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/cpu_matmul.py   # try an XLA flag
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

LAYERS = 30
HIDDEN, FFN = 576, 1536


def _median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls after one untimed call (``fn`` must block)."""
    return median_time(fn, reps, warmup=1) * 1e3


def memory_bandwidth(reps: int) -> tuple[float, float]:
    """(read GB/s, read+write GB/s) over a 512 MiB float32 array."""
    x = jnp.ones((512 << 20) // 4, jnp.float32)
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda a: a * 1.0001)
    t_read = _median_ms(lambda: read(x).block_until_ready(), reps) / 1e3
    t_copy = _median_ms(lambda: copy(x).block_until_ready(), reps) / 1e3
    return x.nbytes / t_read / 1e9, 2 * x.nbytes / t_copy / 1e9


def mlp_chain(rows_list, reps: int, threads: int) -> list[dict]:
    """30 MLP blocks in sequence, XLA's dot and the native kernel beside torch, float32."""
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    mats = [tuple(rng.standard_normal(s, dtype=np.float32) * 0.03 for s in ((FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)))
            for _ in range(LAYERS)]
    jw = [tuple(jnp.asarray(w) for w in t) for t in mats]
    tw = [tuple(torch.from_numpy(w) for w in t) for t in mats]

    def chain(mm):
        @jax.jit
        def run(x, weights):
            for g, u, d in weights:
                x = x + mm(jax.nn.silu(mm(x, g)) * mm(x, u), d)
            return x

        return run

    jax_chain = chain(lambda a, w: a @ w.T)
    native_chain = chain(kernels_cpu.matmul_nt) if kernels_cpu.native_available() else None

    def torch_chain(x):
        lin = torch.nn.functional.linear
        with torch.inference_mode():
            for g, u, d in tw:
                x = x + lin(torch.nn.functional.silu(lin(x, g)) * lin(x, u), d)
        return x

    weight_bytes = sum(w.nbytes for t in mats for w in t)
    out = []
    for m in rows_list:
        x = rng.standard_normal((m, HIDDEN), dtype=np.float32)
        xj, xt = jnp.asarray(x), torch.from_numpy(x)
        times = {"jax": _median_ms(lambda: jax_chain(xj, jw).block_until_ready(), reps)}
        if native_chain is not None:
            times["native"] = _median_ms(lambda: native_chain(xj, jw).block_until_ready(), reps)
        times["torch"] = _median_ms(lambda: torch_chain(xt), reps)
        flops = 2 * m * weight_bytes / 4
        row = dict(rows=m)
        for name, t in times.items():
            row.update({f"{name}_ms": t, f"{name}_gflops": flops / t / 1e6, f"{name}_weight_gbs": weight_bytes / t / 1e6})
        out.append(row)
    return out


def dtype_rates(rows_list, reps: int) -> list[dict]:
    """One M x 576 x 1536 product over 8 cache-resident weight matrices, float32 vs bfloat16, each library."""
    import torch

    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((FFN, HIDDEN), dtype=np.float32) * 0.03 for _ in range(8)]
    out = []
    for m in rows_list:
        x = rng.standard_normal((m, HIDDEN), dtype=np.float32)
        row = dict(rows=m)
        for name, jdt, tdt in (("f32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
            jw = [jnp.asarray(w, jdt) for w in mats]
            xj = jnp.asarray(x, jdt)
            f = jax.jit(lambda a, ws: [jnp.dot(a, w.T, preferred_element_type=jnp.float32) for w in ws])
            row[f"jax_{name}_ms"] = _median_ms(lambda: jax.block_until_ready(f(xj, jw)), reps)
            tw = [torch.from_numpy(w).to(tdt) for w in mats]
            xt = torch.from_numpy(x).to(tdt)
            with torch.inference_mode():
                row[f"torch_{name}_ms"] = _median_ms(lambda: [torch.nn.functional.linear(xt, w) for w in tw], reps)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32", help="comma-separated M (sequences in a decode step)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
    a = ap.parse_args(argv)
    try:
        rows = [int(r) for r in a.rows.split(",") if r]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {a.rows!r}")
    if not rows or min(rows) < 1:
        ap.error(f"--rows must name at least one positive row count, got {a.rows!r}")
    if a.reps < 1:
        ap.error(f"--reps must be at least 1, got {a.reps}")

    rd, cp = memory_bandwidth(min(a.reps, 5))
    print(f"memory: read {rd:.1f} GB/s, copy (read+write) {cp:.1f} GB/s", flush=True)
    chain = mlp_chain(rows, a.reps, a.threads)
    print(f"\n{LAYERS} MLP blocks, float32 ({FFN}x{HIDDEN} x3 per block, weights streamed from memory)")
    if not kernels_cpu.native_available():
        print(f"(no native column: {kernels_cpu.build.unavailable_reason()})")
    names = [n for n in ("jax", "native", "torch") if f"{n}_ms" in chain[0]]
    print(f"{'rows':>4} " + " ".join(f"{n + ' ms':>10} {'GF/s':>6} {'GB/s':>6}" for n in names))
    for r in chain:
        print(f"{r['rows']:4d} " + " ".join(
            f"{r[n + '_ms']:10.1f} {r[n + '_gflops']:6.0f} {r[n + '_weight_gbs']:6.1f}" for n in names), flush=True)
    rates = dtype_rates(rows, a.reps)
    print(f"\n8 x (M x {HIDDEN} x {FFN}) products, cache resident, ms (float32 / bfloat16)")
    for r in rates:
        print(f"M={r['rows']:3d}  jax {r['jax_f32_ms']:6.2f} / {r['jax_bf16_ms']:6.2f}   "
              f"torch {r['torch_f32_ms']:6.2f} / {r['torch_bf16_ms']:6.2f}", flush=True)
    return dict(memory_read_gbs=rd, memory_copy_gbs=cp, chain=chain, dtype_rates=rates)


if __name__ == "__main__":
    main()
