"""Where one compiled model step spends its time, op by op: a profiler trace matched to the optimized HLO.

Builds a preset with dummy weights, compiles one decode step (``--batch`` sequences at ``--context``) or one
prefill (``--prefill N`` tokens), runs it a few times under ``jax.profiler``, and groups the trace's op
events by what they are in the compiled module: a custom call by its target and output shape (the native
CPU matmuls, decode attention, Pallas kernels), any other op by its name without XLA's numeric suffix
(``add_concatenate_fusion``, ``wrapped_scatter``) and its output shape. Prints per group the milliseconds
and calls per step, largest first, then the op events' total beside the step's time with and without the
profiler.

    python benchmarks/step_ops.py                                  # smollm2-135m float32, batch 32, context 128
    python benchmarks/step_ops.py --prefill 256 --top 15
    python benchmarks/step_ops.py --preset tiny-llama --batch 2 --context 32 --json ops.json

Reading it: on XLA:CPU the ops of a decode step run one after another, and a native kernel's event is its
wall time with both threads working in it, so the column sums to about the step. This is how the RoPE
tables were found (docs/models.md, "RoPE tables once per step"). Two cautions, both measured on CPU: the
profiler inflates ``ynn_fusion`` ops (XLA handing a reduction or a dot to XNNPACK) several times over, so
time those without it; and in a prefill, XNNPACK's dots record events on several threads at once, so the
total can exceed the step. On a GPU the events are its kernels; names that match no HLO instruction
(cuBLAS, runtime events) are grouped by name alone.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# trace events that are the executor's or the runtime's bookkeeping, not ops of the module
SKIP = re.compile(r"^(end: |Thunk|Threadpool|\$|Pjit|CommonPjRt|ParseArguments|Handle inputs|DevicePut|"
                  r"AllocateOutputBuffers|ExecuteHelper)")


def instruction_index(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """Instruction name -> (opcode, output shape, custom-call target or "") for every computation's lines."""
    index = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[\d,]*\})? ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        index[name] = (op, shape, target.group(1) if target else "")
    return index


def group_key(event_name: str, index: dict) -> str:
    """The group an op event belongs to (see the module docstring)."""
    base = re.sub(r"\.\d+$", "", event_name)
    info = index.get(event_name)
    if info is None:
        return base
    _, shape, target = info
    return f"{target or base} -> {shape}"


def op_groups(trace_events: list, index: dict, steps: int) -> dict[str, dict]:
    """Per group: ms and calls per step, summed over the trace's complete ("X") events outside Python."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace_events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    groups: dict = collections.defaultdict(lambda: {"ms": 0.0, "calls": 0.0})
    for e in trace_events:
        if e.get("ph") != "X" or threads.get((e["pid"], e["tid"])) == "python" or SKIP.match(e["name"]):
            continue
        g = groups[group_key(e["name"], index)]
        g["ms"] += e.get("dur", 0.0) / 1e3 / steps
        g["calls"] += 1 / steps
    return dict(groups)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32, help="decode sequences (ignored with --prefill)")
    p.add_argument("--context", type=int, default=128, help="decode context length")
    p.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    p.add_argument("--steps", type=int, default=5, help="traced steps (after 3 untraced)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--top", type=int, default=25, help="groups printed")
    p.add_argument("--json", default=None, help="write every group here too")
    a = p.parse_args(argv)
    for name in ("batch", "context", "steps", "page_size", "top"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.prefill < 0:
        p.error("--prefill must be 0 (decode) or a token count")

    import jax

    from jserve.models import SeqChunk, build_step, from_config, get_preset

    cfg = get_preset(a.preset, a.dtype)
    model = from_config(cfg)
    ps = a.page_size
    if a.prefill:
        m = -(-a.prefill // ps)
        chunks = [SeqChunk(list(np.arange(a.prefill) % cfg.vocab_size), 0, list(range(m)))]
        what = f"prefill of {a.prefill} tokens"
        num_pages = m + 1
    else:
        m = -(-a.context // ps)
        chunks = [SeqChunk([7], a.context - 1, list(range(i * m, (i + 1) * m))) for i in range(a.batch)]
        what = f"decode, batch {a.batch}, context {a.context}"
        num_pages = a.batch * m + 1
    s = build_step(chunks, ps, pages_per_seq=m)
    caches = model.allocate_kv_caches(num_pages, ps)
    hlo = model._step.lower(model.state, s.input_ids, s.positions, caches, s.metadata).compile().as_text()
    plain = []
    for i in range(3 + a.steps):  # warm-up, then the same steps timed without the profiler
        t0 = time.perf_counter()
        out, caches = model.step(s.input_ids, s.positions, caches, s.metadata)
        out.block_until_ready()
        if i >= 3:
            plain.append(time.perf_counter() - t0)
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        try:
            for _ in range(a.steps):
                t0 = time.perf_counter()
                out, caches = model.step(s.input_ids, s.positions, caches, s.metadata)
                out.block_until_ready()
                walls.append(time.perf_counter() - t0)
        finally:
            jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))
        if not files:
            raise SystemExit("step_ops: the profiler wrote no trace (perfetto export unavailable?)")
        with gzip.open(files[-1]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    groups = op_groups(events, instruction_index(hlo), a.steps)
    total = sum(g["ms"] for g in groups.values())
    wall = float(np.median(walls)) * 1e3
    plain_ms = float(np.median(plain)) * 1e3
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, {cfg.name} {a.dtype}: "
          f"{what}; step {plain_ms:.2f} ms without the profiler, {wall:.2f} ms under it (medians of {a.steps}); "
          f"op events {total:.2f} ms/step")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  group")
    for key, g in sorted(groups.items(), key=lambda kv: -kv[1]["ms"])[: a.top]:
        print(f"{g['ms']:9.3f} {g['ms'] / total if total else 0:6.1%} {g['calls']:6.1f}  {key}")
    res = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
           "preset": cfg.name, "dtype": a.dtype, "what": what, "steps": a.steps, "wall_ms": wall, "unprofiled_ms": plain_ms,
           "op_ms": total, "groups": groups}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
