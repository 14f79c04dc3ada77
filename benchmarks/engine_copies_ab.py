"""Before/after of the host-offload copy path: the runner and KV cache of an older commit (default ``ae6915d``:
one pinned host pool per layer with host-side scatter/gather, copies optionally fused into the step) against
the current ones, built side by side in one process and timed in alternation, round by round, so that machine
load hits both alike. Per variant: swap-out and swap-in bandwidth (``runner.copy`` until ready), a decode
step alone, and with ``n`` + ``n`` copies issued beside it until it returns and until everything is ready.

    python benchmarks/engine_copies_ab.py [--commit ae6915d] [--pages 32] [--rounds 15]

The old modules are read with ``git show COMMIT:jserve/engine/{kv_cache,runner}.py`` into a temporary
package (their relative import of ``.sampling`` points at the current ``jserve.engine.sampling``).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_old(commit: str, into: Path):
    """The old ``kv_cache`` and ``runner`` modules of ``commit`` as package ``copies_before``."""
    pkg = into / "copies_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("kv_cache", "runner"):
        text = subprocess.run(["git", "show", f"{commit}:jserve/engine/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(text.replace("from .sampling import", "from jserve.engine.sampling import"))
    sys.path.insert(0, str(into))
    return importlib.import_module("copies_before.kv_cache"), importlib.import_module("copies_before.runner")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commit", default="ae6915d")
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--pages", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)

    from jserve.engine import kv_cache as new_kv, runner as new_rn
    from jserve.engine.sampling import SamplingParams
    from jserve.models import from_config, get_preset

    tmp = tempfile.TemporaryDirectory()
    old_kv, old_rn = load_old(a.commit, Path(tmp.name))
    c = get_preset(a.preset, "float32")
    page = 16
    ctx_pages = -(-(a.context + 1) // page)
    num_device, num_host = a.batch * ctx_pages + 2 * a.pages + 1, 2 * a.pages
    variants = {}
    for name, kvm, rnm, extra in [("before", old_kv, old_rn, {"copy_buckets": (0,)}),
                                  ("before, fused", old_kv, old_rn, {"copy_buckets": (0, a.pages)}),
                                  ("after", new_kv, new_rn, {})]:
        model = from_config(c)  # one model each: the runners keep their jitted functions on the model object
        kv = kvm.KVCache(kvm.KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, page, c.dtype), num_device, num_host)
        runner = rnm.ModelRunner(model, kv, rnm.RunnerConfig(
            page_size=page, max_batch_size=a.batch, max_tokens_per_batch=64, max_model_len=a.context + 64,
            decode_buckets=(a.batch,), token_buckets=(64,), swap_buckets=(a.pages,), **extra))
        runner.warmup(progress=False)
        variants[name] = (runner, kv, rnm)
    nbytes = a.pages * new_kv.KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, page, c.dtype).page_bytes
    rng = np.random.default_rng(0)
    tokens = [int(rng.integers(c.vocab_size)) for _ in range(a.batch)]
    first = 2 * a.pages
    outs = [(j, j) for j in range(a.pages)]
    ins = [(j, a.pages + j) for j in range(a.pages)]
    beside = [(j, a.pages + j) for j in range(a.pages)]  # pages the batch does not touch, both directions
    keys = ("out", "in", "step", "returns", "done")
    times = {n: {k: [] for k in keys} for n in variants}
    for rnd in range(a.rounds + 1):  # round 0 warms up
        for name, (runner, kv, rnm) in variants.items():
            rows = [rnm.BatchRow([tokens[i]], a.context, list(range(first + i * ctx_pages, first + (i + 1) * ctx_pages)),
                                 (SamplingParams(), 0, 0)) for i in range(a.batch)]

            def ready(kv=kv):
                jax.block_until_ready((kv.device, kv.host))

            ready()
            t = [time.perf_counter()]
            runner.copy("out", outs)
            ready()
            t.append(time.perf_counter())
            runner.copy("in", ins)
            ready()
            t.append(time.perf_counter())
            runner.run(rows)
            ready()
            t.append(time.perf_counter())
            runner.run(rows, beside, beside)
            t.append(time.perf_counter())
            ready()
            t.append(time.perf_counter())
            if rnd:
                for k, v in zip(keys, (t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[5] - t[3])):
                    times[name][k].append(v)
    print(f"device {jax.devices()[0]} jax {jax.__version__} {a.preset} float32; {a.pages} pages = {nbytes / 2**20:.1f} MiB "
          f"per direction; decode batch {a.batch} at context {a.context}; medians of {a.rounds} rounds")
    for name, d in times.items():
        m = {k: statistics.median(v) for k, v in d.items()}
        print(f"{name:14s} out {nbytes / m['out'] / 1e9:.2f} GB/s  in {nbytes / m['in'] / 1e9:.2f} GB/s  step "
              f"{m['step'] * 1e3:.1f} ms  + copies: returns {m['returns'] * 1e3:.1f} ms, all done {m['done'] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
