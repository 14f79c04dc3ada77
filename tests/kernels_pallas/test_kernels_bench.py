"""The GPU check script runs end to end as a script in interpret mode (``--tiny``): every section
completes without errors, the correctness checks pass and the JSON report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 30-50 s on 2 CPU cores
def test_bench_gpu_tiny_runs_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kernels_pallas.bench_gpu", "--tiny"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "================ summary" in proc.stdout
    report = json.loads((tmp_path / "kernels.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"env", "correctness", "copy", "decode", "prefill", "write", "sweep"}
    for name, sec in sections.items():
        assert sec["errors"] == [], (name, sec["errors"])
    assert all(row["ok"] for row in sections["correctness"]["rows"])
    assert len(sections["correctness"]["rows"]) == 9  # 4 decode, JAX's kernel, 3 ragged, KV write
    decode_rows = sections["decode"]["rows"]
    assert len(decode_rows) == 4 and all(r["ms"] > 0 and "jax_ms" in r for r in decode_rows)
    assert sections["prefill"]["rows"][0]["tflops"] > 0
    assert {"pallas_us", "xla_us"} <= set(sections["write"]["rows"][0])
