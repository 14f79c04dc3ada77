"""Engine start-up with and without the persistent compilation cache (``--compile-cache``).

Each measurement is a fresh Python process that loads the model and builds ``jserve.LLM`` with the
engine's defaults (or the sizes given), and reports the warm-up (compiling, or loading, every executable)
and the whole process time:

* ``no cache``: the cache is off;
* ``filling``: an empty cache folder (compiles, then writes each executable);
* ``cached``: the same folder again (loads what ``filling`` wrote).

    python benchmarks/startup_cache.py                          # SmolLM2, LLM() defaults
    python benchmarks/startup_cache.py --max-batch-size 1 --token-buckets 16 --decode-buckets 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
opts = json.loads(sys.argv[1])
cache = opts.pop("compile_cache")
model_src = opts.pop("model")
if cache:
    from jserve.compile_cache import enable_compile_cache
    enable_compile_cache(cache)
from jserve import LLM
from jserve.models import load, smollm2_gguf_path
model = load(model_src or smollm2_gguf_path())
llm = LLM(model, progress=False, **opts)
print(json.dumps({"executables": len(llm.engine.runner.executable_keys()),
                  "warmup_s": llm.stats["compile_seconds"], "process_s": time.perf_counter() - t0}))
"""


def measure(opts: dict, cache: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**opts, "compile_cache": cache})], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"startup_cache: the child process failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from jserve.cli import int_list, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="what jserve.models.load takes (default: embedded SmolLM2)")
    p.add_argument("--max-batch-size", type=positive_int, default=None)
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--decode-buckets", type=int_list, default=None)
    p.add_argument("--token-buckets", type=int_list, default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    opts = {"model": a.model}
    for name in ("max_batch_size", "max_model_len", "decode_buckets", "token_buckets"):
        if getattr(a, name) is not None:
            opts[name] = getattr(a, name)
    if "token_buckets" in opts and "max_tokens_per_batch" not in opts:
        opts["max_tokens_per_batch"] = max(opts["token_buckets"])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="jserve-startup-") as folder:
        for name, cache in (("no cache", None), ("filling", folder), ("cached", folder)):
            rows[name] = r = measure(opts, cache)
            print(f"{name:9s} {r['executables']:3d} executables  warm-up {r['warmup_s']:6.1f} s  "
                  f"process {r['process_s']:6.1f} s", flush=True)
    print(f"warm-up speed-up with the cache: {rows['no cache']['warmup_s'] / rows['cached']['warmup_s']:.1f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
