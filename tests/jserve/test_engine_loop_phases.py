"""benchmarks/engine_loop_phases.py: its HLO summary counts a hand-written module's ENTRY ops, and a tiny CPU
run (one variant, one round) reports every phase with no compile after warm-up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_loop_phases.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("engine_loop_phases_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(f32[4]{0} %p)
}

ENTRY %main.1 (a: f32[4], b: bf16[8,16]) -> (f32[4], s32[]) {
  %a = f32[4]{0} parameter(0)
  %b = bf16[8,16]{1,0} parameter(1)
  %f = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused
  %g = (bf16[8,8]{1,0}, s8[64]{0}) custom-call(bf16[8,16]{1,0} %b, bf16[8,16]{1,0} %b), custom_call_target="__cublas$gemm"
  %t = f32[4]{0} custom-call(f32[4]{0} %f), custom_call_target="__gpu$xla.gpu.triton", backend_config={"x": 1}
  %c = (f32[4]{0}, s32[]) call(f32[4]{0} %t), to_apply=%command_buffer
  ROOT %r = (f32[4]{0}, s32[]) tuple(f32[4]{0} %t, s32[] %c)
}
"""


def test_entry_ops_counts_the_entry_computation_only():
    ops = load_bench().entry_ops(HLO)
    assert ops == {"parameter": 2, "fusion": 1, "custom-call:__cublas$gemm": 1, "custom-call:__gpu$xla.gpu.triton": 1,
                   "call": 1, "tuple": 1}  # the fused computation's negate is not an ENTRY op


def test_tiny_run_reports_every_phase(tmp_path):
    out = tmp_path / "phases.json"
    assert load_bench().main(["--tiny", "--skip-idle-work", "off", "--rounds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["batch"], r["async_scheduling"]) for r in rows] == [(2, False), (2, True), (4, False), (4, True)]
    for r in rows:
        assert r["compiles"] == 0 and r["finished_in_window"] == 0 and r["step_ms"] > 0
        assert r["num_inputs"] > 10 and r["launch_resident_inputs_ms"] > 0
        assert {"schedule", "pack", "dispatch", "collect"} <= set(r["phases_ms"])
    assert set(res["entry_ops"]) == {"off/B2", "off/B4"} and res["entry_ops"]["off/B2"]["fusion"] > 10
