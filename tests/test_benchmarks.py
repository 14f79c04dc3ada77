"""The GPU benchmark script stays runnable: a device session gets one call, so ``benchmarks/engine_gpu.py`` must
work when it comes. ``--tiny`` runs every section on the CPU; its memory-pressure section must reproduce the
unpressured greedy ids with swaps and no compile after warm-up. ``benchmarks/sim_fidelity.py`` (which the
GPU check script runs too) runs a tiny table end to end."""

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


@pytest.mark.slow  # about 11 s on 2 cores: a tiny engine, profiled, two short replays beside the simulator
def test_sim_fidelity_runs_tiny(tmp_path):
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, "benchmarks/sim_fidelity.py", "--model", "tiny-llama", "--max-model-len", "64",
           "--batch-size", "4", "--num-requests", "12", "--loads", "0.5", "--policies", "fcfs,vllm", "--quick",
           "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "capacity" in run.stdout and "worst |relative error|" in run.stdout, run.stdout
    data = json.loads(out.read_text())
    assert data["capacity_rps"] > 0 and data["closed_form_capacity_rps"] > 0
    rows = data["rows"]
    assert [(r["policy"], r["load"]) for r in rows] == [("fcfs", 0.5), ("vllm", 0.5)]
    for r in rows:
        assert r["rate"] == pytest.approx(0.5 * data["capacity_rps"])
        assert 0 < r["busy"] <= 1 and r["engine_stats"]["compiles_during_run"] == 0
        assert r["engine"]["num_finished"] == r["sim"]["num_finished"] == r["sim_at_run_speed"]["num_finished"] == 12
        steps = r["step_prices"]["all"]  # the run's speed: its steps' measured time over their price
        assert r["run_speed"] == pytest.approx(steps["measured_s"] / steps["priced_s"])
    assert "err@run" in run.stdout and "at each run's own step speeds" in run.stdout
    bad = subprocess.run([sys.executable, "benchmarks/sim_fidelity.py", "--loads", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--loads must be > 0" in bad.stderr


def test_run_speed_clock_scales_each_step_kind():
    """The fidelity benchmark's diagnostic clock: prefill steps twice as slow, decodes as profiled."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sim_fidelity import RunSpeedClock
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from eval.records import WorkloadRequest
    from eval.simulator import CopyLink, simulate
    from schedulers import SchedulerConfig, make_scheduler
    from schedulers.cost import FittedCostModel

    cost = FittedCostModel.from_ms(prefill_ms=(10.0, 0.0, 0.0), decode_ms=(5.0, 0.0, 0.0), block_bytes=1,
                                   swap_bandwidth=1e9)
    work = [WorkloadRequest(0, 8, 4, 0.0)]  # one 10 ms prefill step (its first token), three 5 ms decode steps
    finish = []
    for factors in ({"all": 1.0}, {"all": 2.0}, {"all": 1.0, "prefill": 2.0}, {"all": 3.0, "decode": 2.0}):
        res = simulate(make_scheduler("fcfs", SchedulerConfig(), cost), work, RunSpeedClock(cost, factors),
                       CopyLink(block_bytes=1, bandwidth=1e9))
        finish.append(res.records[0].finish_time)
    assert finish == pytest.approx([0.025, 0.050, 0.035, 0.060])
