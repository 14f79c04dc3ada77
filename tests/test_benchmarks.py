"""The GPU benchmark script stays runnable: a device session gets one call, so ``benchmarks/engine_gpu.py`` must
work when it comes. ``--tiny`` runs every section on the CPU; its memory-pressure section must reproduce the
unpressured greedy ids with swaps and no compile after warm-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_engine_gpu_script_runs_tiny_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "benchmarks/engine_gpu.py", "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for section in ("warm-up:", "decode B=", "swap ", "prefill ", "engine loop decode", "memory pressure:"):
        assert section in out, f"section {section!r} missing from:\n{out}"
    pressure = re.search(r"memory pressure: identical=(\w+).*swapped-out pages=(\d+).*compiles after warm-up=(\d+)",
                         out)
    assert pressure, out
    identical, swapped, compiles = pressure.groups()
    assert identical == "True" and int(swapped) > 0 and int(compiles) == 0, pressure.group(0)
