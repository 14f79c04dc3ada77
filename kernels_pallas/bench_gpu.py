"""GPU check for the kernels of this package: one script, a few minutes on an H100/H200, every section in
its own try/except so one failure does not lose the rest.

    python -m kernels_pallas.bench_gpu            # on the GPU machine, from the repository root
    python -m kernels_pallas.bench_gpu --tiny     # anywhere: Pallas interpret mode at tiny sizes

Sections, in order: ``env`` (jax version, device); ``correctness`` (each kernel lowers and matches the
reference: relative error at a few shapes, plus JAX's shipped GPU paged kernel); ``copy`` (device-to-device
copy bandwidth, bytes read + written); ``decode`` (Llama-3-8B shapes: 32 q heads, 8 KV heads, head dim
128, page 16, bf16; batch x context grid; ms, GB/s of K+V+q+out, fraction of copy bandwidth; JAX's shipped
``paged_attention`` on the same inputs); ``prefill`` (one causal sequence of N tokens, TFLOP/s; cuDNN
attention on the same data as a yardstick); ``write`` (KV write: Pallas kernel vs XLA scatter, in place);
``sweep`` (a few decode/prefill configs, to pick defaults; last, so a tight ``--budget-s`` drops it
first). A compact table ends the output; with ``OUT`` set the results also go to ``$OUT/kernels.json``.

Timing: compile cache off; each measurement jits a ``fori_loop`` of ``inner`` back-to-back calls (so host
dispatch does not count), then takes the median of ``--reps`` timed runs, each ended by
``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from . import DecodeConfig, PrefillConfig, api, reference
from .kv_write import write_kv_xla

LLAMA = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--tiny", action="store_true", help="interpret mode at tiny sizes (runs on a CPU)")
    p.add_argument("--batches", type=ints, default=[16, 32, 64, 128, 256])
    p.add_argument("--contexts", type=ints, default=[1024, 2048, 4096])
    p.add_argument("--prefill-tokens", type=ints, default=[2048, 4096, 8192])
    p.add_argument("--sweep-shapes", default="32x2048,128x1024", help="decode batch x context for the sweep")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--decode-configs", default="",
                   help="sweep these DecodeConfigs instead of the built-in list: 'k=v,k=v;k=v' ('default' = defaults)")
    p.add_argument("--prefill-configs", default="", help="likewise for PrefillConfig")
    p.add_argument("--only", default="", help="run only these sections (comma-separated), e.g. correctness,sweep")
    p.add_argument("--no-jax-kernel", action="store_true", help="skip JAX's shipped paged_attention")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--copy-mib", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=225.0, help="skip remaining items past this time")
    a = p.parse_args(argv)
    if a.tiny:
        a.batches, a.contexts, a.prefill_tokens = [2, 3], [32, 64], [48]
        a.sweep_shapes, a.reps, a.copy_mib = "2x64", 2, 8
    a.sweep_shapes = [tuple(int(v) for v in s.split("x")) for s in a.sweep_shapes.split(",") if s]
    a.decode_configs = _parse_configs(a.decode_configs, DecodeConfig)
    a.prefill_configs = _parse_configs(a.prefill_configs, PrefillConfig)
    a.only = {x for x in a.only.split(",") if x}
    return a


def _parse_configs(text: str, cls) -> list:
    """'k=v,k=v;k=v' -> [cls(k=v, k=v), cls(k=v)]; 'default' is the class defaults; values are Python literals."""
    import ast

    configs = []
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        kwargs = {}
        if item != "default":
            for pair in item.split(","):
                key, _, value = pair.partition("=")
                kwargs[key.strip()] = ast.literal_eval(value.strip())
        configs.append(cls(**kwargs))
    return configs


class Bench:
    """Collects rows per section, keeps going past failures and watches the time budget."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.sections: dict[str, dict] = {}
        self.backend = "pallas" if jax.default_backend() == "gpu" and not args.tiny else "interpret"
        self.shape = dict(LLAMA, num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=8) if args.tiny else LLAMA

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def run(self, name, fn):
        if self.args.only and name != "env" and name not in self.args.only:
            return
        rows: list[dict] = []
        sec = self.sections[name] = {"rows": rows, "errors": []}
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            fn(rows, sec)
        except Exception as e:  # noqa: BLE001 - the point is to keep going
            sec["errors"].append(f"{type(e).__name__}: {e}")
            traceback.print_exc()
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"-- {name}: {sec['seconds']} s, {len(sec['errors'])} error(s)", flush=True)

    def item(self, sec, rows, label, fn):
        """Run one measurement; its failure becomes an error entry, not the end of the section."""
        if self.out_of_time():
            sec["errors"].append(f"{label}: skipped (time budget)")
            return
        try:
            row = fn()
            rows.append(row)
            elapsed = time.perf_counter() - self.start
            print(f"  [{elapsed:6.1f}s] " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        except Exception as e:  # noqa: BLE001
            msg = f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            sec["errors"].append(msg[:500])
            print("  FAILED " + msg[:500], flush=True)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def device_ms(step, carry, consts, *, reps: int, est_s: float, target_s: float = 2e-3) -> float:
    """Median milliseconds of one ``carry = step(carry, *consts)``, looped on device (carry is donated)."""
    inner = int(min(64, max(1, math.ceil(target_s / max(est_s, 1e-7)))))
    if jax.default_backend() != "gpu":
        inner = 1  # interpret mode: correctness of the script, not speed
    carry = jax.tree.map(jnp.copy, carry)  # the loop donates its carry; keep the caller's arrays alive

    def loop(c, *k):
        return jax.lax.fori_loop(0, inner, lambda i, x: step(x, *k), c)

    f = jax.jit(loop, donate_argnums=(0,))
    carry = jax.block_until_ready(f(carry, *consts))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(f(carry, *consts))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / inner * 1e3


def _feed(q, out):
    """Make the next call depend on this one without changing q (XLA does not fold ``x * 0`` for floats)."""
    return q + (out * 0).astype(q.dtype)


def _rel_err(out, ref) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def _paged_case(key, batch, *, num_q_heads, num_kv_heads, head_dim, page_size, pages_per_seq, dtype):
    """Random q ``[batch, hq, d]``, K/V pages (one spare) and distinct random pages per sequence."""
    kq, kk, kv, kp = jax.random.split(key, 4)
    num_pages = batch * pages_per_seq + 1
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = jax.random.normal(kk, shape, dtype)
    v = jax.random.normal(kv, shape, dtype)
    bt = jax.random.permutation(kp, num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    q = jax.random.normal(kq, (batch, num_q_heads, head_dim), dtype)
    return q, k, v, bt.astype(jnp.int32)


# ------------------------------------------------------------------------------------------- sections


def env(b: Bench, rows, sec):
    d = jax.devices()[0]
    row = dict(jax=jax.__version__, platform=d.platform, device=getattr(d, "device_kind", str(d)),
               backend=b.backend, date=time.strftime("%Y-%m-%d"))
    rows.append(row)
    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))


TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1.5e-2}  # GPU float32 dots are IEEE; bf16 rounds p and the output


def _f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


def _verdict(name, out, ref, dtype) -> dict:
    err = _rel_err(out, ref)
    finite = bool(jnp.isfinite(jnp.asarray(out, jnp.float32)).all())
    return dict(name=name, rel_err=err, tol=TOL[dtype], ok=bool(err < TOL[dtype] and finite))


def correctness(b: Bench, rows, sec):
    tiny = b.args.tiny
    f32, bf16 = jnp.float32, jnp.bfloat16
    if tiny:
        llama = dict(num_q_heads=8, num_kv_heads=2, head_dim=64)
    else:
        llama = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
    smol = dict(num_q_heads=6 if tiny else 9, num_kv_heads=2 if tiny else 3, head_dim=64)
    pages = 4 if tiny else 32
    key = jax.random.PRNGKey(0)
    decode_cases = [
        ("decode-llama-bf16", llama, 16, bf16, DecodeConfig()),
        ("decode-llama-bf16-splits", llama, 16, bf16, DecodeConfig(num_splits=4, block_kv=32)),
        ("decode-llama-bf16-masked", llama, 16, bf16, DecodeConfig(masked_loads=True, num_splits=2)),
        ("decode-smollm2-f32-page8", smol, 8, f32, DecodeConfig()),
    ]
    for name, heads, ps, dt, cfg in decode_cases:
        def one(name=name, heads=heads, ps=ps, dt=dt, cfg=cfg):
            q, k, v, bt = _paged_case(key, 5, page_size=ps, pages_per_seq=pages, dtype=dt, **heads)
            lens = jnp.array([1, ps, pages * ps, 0, 3 * ps // 2 + 1], jnp.int32)
            scale = heads["head_dim"] ** -0.5
            out = api.paged_decode_attention(q, k, v, bt, lens, scale=scale, backend=b.backend, config=cfg)
            ref = reference.paged_decode_attention_reference(*_f32(q, k, v), bt, lens, scale=scale)
            return _verdict(name, out, ref, dt)
        b.item(sec, rows, name, one)

    if not b.args.no_jax_kernel:
        def shipped():
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
            q, k, v, bt = _paged_case(key, 4, page_size=16, pages_per_seq=pages, dtype=bf16, **llama)
            lens = jnp.array([1, 16, pages * 16, 40], jnp.int32)
            scale = llama["head_dim"] ** -0.5
            interp = b.backend == "interpret"
            out = paged_attention(q * jnp.asarray(scale, bf16), k, v, bt, lens, k_splits=4, interpret=interp)
            ref = reference.paged_decode_attention_reference(*_f32(q, k, v), bt, lens, scale=scale)
            return _verdict("jax-shipped-paged_attention-bf16", out, ref, bf16)
        b.item(sec, rows, "jax-shipped", shipped)

    t_pad = 48 if tiny else 512
    ragged_cases = [
        ("ragged-llama-bf16", llama, 16, bf16, PrefillConfig()),
        ("ragged-llama-bf16-small-tiles", llama, 16, bf16, PrefillConfig(block_q=4, block_kv=32)),
        ("ragged-smollm2-f32-page8-unmasked", smol, 8, f32, PrefillConfig(masked_loads=False)),
    ]
    for name, heads, ps, dt, cfg in ragged_cases:
        def one(name=name, heads=heads, ps=ps, dt=dt, cfg=cfg):
            cap = pages * ps
            # prefill, chunked prefill on cached context, two decodes, an empty slot; then padding tokens
            q_lens = np.array([min(cap, 20 if tiny else 300), 9 if tiny else 100, 1, 1, 0], np.int32)
            seq_lens = jnp.array([q_lens[0], min(cap, q_lens[1] + 2 * ps + 3), ps, cap, 0], jnp.int32)
            qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
            _, k, v, bt = _paged_case(key, 5, page_size=ps, pages_per_seq=pages, dtype=dt, **heads)
            q = jax.random.normal(jax.random.PRNGKey(1), (t_pad, heads["num_q_heads"], heads["head_dim"]), dt)
            scale = heads["head_dim"] ** -0.5
            out = api.ragged_paged_attention(q, k, v, bt, seq_lens, qsl, scale=scale, backend=b.backend, config=cfg)
            ref = reference.ragged_paged_attention_reference(*_f32(q, k, v), bt, seq_lens, qsl, scale=scale)
            return _verdict(name, out, ref, dt)
        b.item(sec, rows, name, one)

    def write():
        _, k, v, _ = _paged_case(key, 4, page_size=16, pages_per_seq=pages, dtype=bf16, **llama)
        n = 64
        slots = jax.random.permutation(jax.random.PRNGKey(2), k.shape[1] * 16)[:n].astype(jnp.int32)
        slots = slots.at[::7].set(-1)
        nk = jax.random.normal(jax.random.PRNGKey(3), (n, llama["num_kv_heads"], llama["head_dim"]), bf16)
        want = reference.write_kv_reference(k, v, nk, nk * 2, slots)
        got = api.write_kv(k, v, nk, nk * 2, slots, backend=b.backend)
        got_xla = write_kv_xla(k, v, nk, nk * 2, slots)
        diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                   for g, w in zip((*got, *got_xla), want * 2))
        return dict(name="write_kv-pallas+xla", max_abs_diff=diff, ok=diff == 0.0)
    b.item(sec, rows, "write_kv", write)


def copy_bandwidth(b: Bench, rows, sec):
    n = b.args.copy_mib * 2**20 // 4
    x = jnp.zeros((n,), jnp.uint32)
    nbytes = 2 * n * 4  # read + written
    ms = device_ms(lambda c: c + jnp.uint32(1), x, (), reps=b.args.reps, est_s=nbytes / 2.5e12)
    row = dict(mib=b.args.copy_mib, ms=ms, gbps=nbytes / ms / 1e6)
    rows.append(row)
    sec["gbps"] = row["gbps"]
    print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))


def decode(b: Bench, rows, sec):
    s = b.shape
    dtype = jnp.bfloat16
    max_pages = max(b.args.batches) * max(b.args.contexts) // s["page_size"] + 1
    key = jax.random.PRNGKey(1)
    kk, kv = jax.random.split(key)
    shape = (s["num_kv_heads"], max_pages, s["page_size"], s["head_dim"])
    k_pages, v_pages = jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)
    copy_gbps = b.sections.get("copy", {}).get("gbps")
    scale = s["head_dim"] ** -0.5
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_kernel
    except Exception as e:  # noqa: BLE001
        jax_kernel = None
        sec["errors"].append(f"jax shipped kernel unavailable: {e}")
    for ctx in b.args.contexts:
        for batch in b.args.batches:
            def one(batch=batch, ctx=ctx):
                m = ctx // s["page_size"]
                bt = jax.random.permutation(jax.random.PRNGKey(batch + ctx), max_pages)[: batch * m]
                bt = bt.reshape(batch, m).astype(jnp.int32)
                lens = jnp.full((batch,), ctx, jnp.int32)
                q = jax.random.normal(jax.random.PRNGKey(7), (batch, s["num_q_heads"], s["head_dim"]), dtype)
                kv_bytes = 2 * batch * ctx * s["num_kv_heads"] * s["head_dim"] * 2
                nbytes = kv_bytes + 2 * q.size * 2
                est = nbytes / 2.5e12

                def ours(qq, kp, vp, t, ln):
                    return _feed(qq, api.paged_decode_attention(qq, kp, vp, t, ln, scale=scale, backend=b.backend))

                ms = device_ms(ours, q, (k_pages, v_pages, bt, lens), reps=b.args.reps, est_s=est)
                row = dict(batch=batch, ctx=ctx, ms=ms, gbps=nbytes / ms / 1e6)
                if copy_gbps:
                    row["frac_copy"] = row["gbps"] / copy_gbps
                if jax_kernel is not None and not b.args.no_jax_kernel:
                    interp = b.backend == "interpret"

                    def theirs(qq, kp, vp, t, ln):
                        return _feed(qq, jax_kernel(qq, kp, vp, t, ln, k_splits=min(16, m), interpret=interp))

                    try:
                        jms = device_ms(theirs, q * jnp.asarray(scale, dtype), (k_pages, v_pages, bt, lens),
                                        reps=b.args.reps, est_s=est)
                        row.update(jax_ms=jms, jax_gbps=nbytes / jms / 1e6, speedup=jms / ms)
                    except Exception as e:  # noqa: BLE001
                        row["jax_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                return row
            b.item(sec, rows, f"decode B={batch} ctx={ctx}", one)


def sweep(b: Bench, rows, sec):
    s = b.shape
    dtype = jnp.bfloat16
    scale = s["head_dim"] ** -0.5
    configs = b.args.decode_configs or [
        DecodeConfig(), DecodeConfig(num_warps=8), DecodeConfig(block_kv=64), DecodeConfig(block_kv=256),
        DecodeConfig(num_stages=3), DecodeConfig(masked_loads=False), DecodeConfig(target_programs=2048),
        DecodeConfig(num_splits=1)]
    if b.args.tiny:
        configs = configs[:2]
    for batch, ctx in b.args.sweep_shapes:
        m = ctx // s["page_size"]
        q, k, v, bt = _paged_case(jax.random.PRNGKey(3), batch, pages_per_seq=m, dtype=dtype, **s)
        lens = jnp.full((batch,), ctx, jnp.int32)
        nbytes = 2 * batch * ctx * s["num_kv_heads"] * s["head_dim"] * 2 + 2 * q.size * 2
        for cfg in configs:
            def one(cfg=cfg, batch=batch, ctx=ctx, q=q, k=k, v=v, bt=bt, lens=lens, nbytes=nbytes):
                def step(qq, kp, vp, t, ln):
                    out = api.paged_decode_attention(qq, kp, vp, t, ln, scale=scale, backend=b.backend, config=cfg)
                    return _feed(qq, out)
                ms = device_ms(step, q, (k, v, bt, lens), reps=b.args.reps, est_s=nbytes / 2.5e12)
                return dict(kernel="decode", shape=f"{batch}x{ctx}", config=_cfg_str(cfg, DecodeConfig()), ms=ms,
                            gbps=nbytes / ms / 1e6)
            b.item(sec, rows, f"sweep decode {batch}x{ctx} {cfg}", one)
    n = max(min(b.args.prefill_tokens), 48 if b.args.tiny else 4096)
    pcfgs = b.args.prefill_configs or [
        PrefillConfig(), PrefillConfig(num_warps=4), PrefillConfig(block_kv=32), PrefillConfig(max_rows=64),
        PrefillConfig(num_stages=3), PrefillConfig(masked_loads=False)]
    for cfg in pcfgs[: 2 if b.args.tiny else None]:
        b.item(sec, rows, f"sweep prefill {n} {cfg}", lambda cfg=cfg: dict(
            kernel="prefill", shape=str(n), config=_cfg_str(cfg, PrefillConfig()), **_prefill_time(b, n, cfg)))


def _cfg_str(cfg, default) -> str:
    diff = {k: v for k, v in vars(cfg).items() if getattr(default, k) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "default"


def _prefill_inputs(b: Bench, n: int):
    s = b.shape
    dtype = jnp.bfloat16
    ps, m = s["page_size"], -(-n // s["page_size"])
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(n), 3)
    q = jax.random.normal(kq, (n, s["num_q_heads"], s["head_dim"]), dtype)
    k = jax.random.normal(kk, (n, s["num_kv_heads"], s["head_dim"]), dtype)
    v = jax.random.normal(kv, (n, s["num_kv_heads"], s["head_dim"]), dtype)
    pages = jax.random.permutation(jax.random.PRNGKey(5), m + 1)[:m].astype(jnp.int32)
    pos = jnp.arange(n)
    slots = (pages[pos // ps] * ps + pos % ps).astype(jnp.int32)
    empty = jnp.zeros((s["num_kv_heads"], m + 1, ps, s["head_dim"]), dtype)
    k_pages, v_pages = reference.write_kv_reference(empty, empty, k, v, slots)
    meta = (pages[None, :], jnp.array([n], jnp.int32), jnp.array([0, n], jnp.int32))
    flops = 4 * s["head_dim"] * s["num_q_heads"] * n * (n + 1) / 2
    return q, k, v, k_pages, v_pages, meta, flops


def _prefill_time(b: Bench, n: int, cfg: PrefillConfig) -> dict:
    q, _, _, k_pages, v_pages, meta, flops = _prefill_inputs(b, n)
    scale = b.shape["head_dim"] ** -0.5

    def step(qq, kp, vp, bt, sl, qsl):
        out = api.ragged_paged_attention(qq, kp, vp, bt, sl, qsl, scale=scale, backend=b.backend, config=cfg)
        return _feed(qq, out)

    ms = device_ms(step, q, (k_pages, v_pages, *meta), reps=b.args.reps, est_s=flops / 3e14)
    return dict(ms=ms, tflops=flops / ms / 1e9)


def prefill(b: Bench, rows, sec):
    scale = b.shape["head_dim"] ** -0.5
    for n in b.args.prefill_tokens:
        def one(n=n):
            row = dict(tokens=n, **_prefill_time(b, n, PrefillConfig()))
            if jax.default_backend() == "gpu":
                q, k, v, k_pages, v_pages, meta, flops = _prefill_inputs(b, n)
                try:
                    def cudnn(qq, kk, vv):
                        return jax.nn.dot_product_attention(qq[None], kk[None], vv[None], scale=scale, is_causal=True,
                                                            implementation="cudnn")[0]
                    ms = device_ms(lambda qq, kk, vv: _feed(qq, cudnn(qq, kk, vv)), q, (k, v), reps=b.args.reps,
                                   est_s=flops / 3e14)
                    ours = api.ragged_paged_attention(q, k_pages, v_pages, *meta, scale=scale, backend=b.backend)
                    row.update(cudnn_ms=ms, cudnn_tflops=flops / ms / 1e9,
                               rel_err_vs_cudnn=_rel_err(ours, jax.jit(cudnn)(q, k, v)))
                except Exception as e:  # noqa: BLE001
                    row["cudnn_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return row
        b.item(sec, rows, f"prefill {n}", one)


def write(b: Bench, rows, sec):
    s = b.shape
    dtype = jnp.bfloat16
    num_pages = 64 if b.args.tiny else 16384  # 16384 pages of Llama-3-8B: 2 x 0.5 GiB
    shape = (s["num_kv_heads"], num_pages, s["page_size"], s["head_dim"])
    for n in ([16] if b.args.tiny else [256, 8192]):
        def one(n=n):
            k = jax.random.normal(jax.random.PRNGKey(n), (n, s["num_kv_heads"], s["head_dim"]), dtype)
            slots = jax.random.permutation(jax.random.PRNGKey(9), num_pages * s["page_size"])[:n].astype(jnp.int32)
            nbytes = 2 * 2 * k.size * 2  # K and V, read + written
            row = dict(tokens=n)
            for name, fn in (("pallas", lambda kp, vp, kk, sl: api.write_kv(kp, vp, kk, kk, sl, backend=b.backend)),
                             ("xla", lambda kp, vp, kk, sl: write_kv_xla(kp, vp, kk, kk, sl))):
                cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                ms = device_ms(lambda c, kk, sl, fn=fn: fn(c[0], c[1], kk, sl), cache, (k, slots), reps=b.args.reps,
                               est_s=1e-5)
                row[f"{name}_us"] = ms * 1e3
                row[f"{name}_gbps"] = nbytes / ms / 1e6
            return row
        b.item(sec, rows, f"write {n}", one)


def summary(b: Bench) -> None:
    print("\n================ summary ================")
    for name, sec in b.sections.items():
        print(f"[{name}] {sec.get('seconds')} s" + (f", errors: {len(sec['errors'])}" if sec["errors"] else ""))
        for row in sec["rows"]:
            print("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        for e in sec["errors"]:
            print("  ! " + e)
    print(f"total {time.perf_counter() - b.start:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jax.config.update("jax_enable_compilation_cache", False)  # every compile is paid, as on a fresh machine
    except Exception as e:  # noqa: BLE001 - the flag's name is not part of JAX's stable API
        print(f"could not turn the compilation cache off: {e}")
    b = Bench(args)
    b.run("env", lambda r, s: env(b, r, s))
    b.run("correctness", lambda r, s: correctness(b, r, s))
    b.run("copy", lambda r, s: copy_bandwidth(b, r, s))
    b.run("decode", lambda r, s: decode(b, r, s))
    b.run("prefill", lambda r, s: prefill(b, r, s))
    b.run("write", lambda r, s: write(b, r, s))
    if not args.no_sweep:  # last: the optional part is what a tight budget loses
        b.run("sweep", lambda r, s: sweep(b, r, s))
    summary(b)
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = os.path.join(out_dir, "kernels.json")
        with open(path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "sections": b.sections}, f, indent=1, default=str)
        print(f"wrote {path}")
    failed = any(not r.get("ok", True) for r in b.sections.get("correctness", {}).get("rows", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
