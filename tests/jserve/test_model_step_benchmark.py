"""benchmarks/model_step.py runs end to end on a tiny preset and reports consistent figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "model_step.py"


def test_model_step_benchmark_tiny(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("model_step_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    res = mod.main(["--preset", "tiny-llama", "--batches", "1,4", "--contexts", "32,64", "--prefill", "48",
                    "--reps", "2", "--copy-mib", "8", "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "out" / "model_step.json").read_text())
    assert saved == json.loads((tmp_path / "r.json").read_text())
    decodes = [r for r in res["results"] if r["kind"] == "decode"]
    assert [(r["batch"], r["context"]) for r in decodes] == [(1, 32), (4, 32), (1, 64), (4, 64)]
    kv_tok = 2 * 2 * 2 * 16 * 4  # layers x (K,V) x kv heads x head_dim x f32 bytes
    for r in decodes:
        assert r["kv_bytes_read"] == r["batch"] * r["context"] * kv_tok
        assert r["mbu"] > 0 and r["step_ms"] > 0
        expect = (r["weight_bytes"] + r["kv_bytes_read"]) / (r["step_ms"] / 1e3) / (res["copy_bandwidth_gbs"] * 1e9)
        assert abs(r["mbu"] - expect) < 1e-6 * expect
    assert res["weight_bytes"] == 4 * res["num_params"]
    assert res["trace_count"] == 5  # 4 decode shapes + 1 prefill: one compile each, none during timing
    again = mod.main(["--preset", "tiny-llama", "--batches", "1,4", "--contexts", "32,64", "--prefill", "48",
                      "--reps", "1", "--copy-mib", "8", "--table", "max"])
    assert again["trace_count"] == 3  # block tables padded to the longest context: one decode shape per batch


def _step_ops():
    spec = importlib.util.spec_from_file_location("step_ops_bench", BENCH.parent / "step_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_ops_groups_events_by_hlo_instruction():
    mod = _step_ops()
    hlo = "\n".join([
        '  %ffi_call.7 = f32[32,1536]{1,0} custom-call(%a, %b), custom_call_target="jserve_matmul_nt", api_version=4',
        "  %add_concatenate_fusion.3 = f32[32,9,64]{2,1,0} fusion(%c, %d), kind=kLoop, calls=%fused_computation.93",
        "  ROOT %tuple.1 = (f32[2]{0}) tuple(%e)",
    ])
    index = mod.instruction_index(hlo)
    assert index["ffi_call.7"] == ("custom-call", "f32[32,1536]", "jserve_matmul_nt")
    assert index["add_concatenate_fusion.3"] == ("fusion", "f32[32,9,64]", "")
    assert mod.group_key("ffi_call.7", index) == "jserve_matmul_nt -> f32[32,1536]"
    assert mod.group_key("add_concatenate_fusion.3", index) == "add_concatenate_fusion -> f32[32,9,64]"
    assert mod.group_key("cutlass_gemm.12", index) == "cutlass_gemm"  # not in the module: its name alone
    events = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "tf_XLAEigen"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "python"}},
        {"ph": "X", "name": "ffi_call.7", "pid": 1, "tid": 1, "dur": 3000.0},
        {"ph": "X", "name": "ffi_call.7", "pid": 1, "tid": 1, "dur": 1000.0},
        {"ph": "X", "name": "add_concatenate_fusion.3", "pid": 1, "tid": 1, "dur": 500.0},
        {"ph": "X", "name": "end: ffi_call.7", "pid": 1, "tid": 1, "dur": 9.0},  # bookkeeping: skipped
        {"ph": "X", "name": "ThunkExecutor::Execute", "pid": 1, "tid": 1, "dur": 9000.0},
        {"ph": "X", "name": "ffi_call.7", "pid": 1, "tid": 2, "dur": 7000.0},  # the Python thread: skipped
    ]
    groups = mod.op_groups(events, index, steps=2)
    assert groups == {"jserve_matmul_nt -> f32[32,1536]": {"ms": 2.0, "calls": 1.0},
                      "add_concatenate_fusion -> f32[32,9,64]": {"ms": 0.25, "calls": 0.5}}


def test_step_ops_traces_a_tiny_step(tmp_path):
    import kernels_cpu

    mod = _step_ops()
    res = mod.main(["--preset", "tiny-llama", "--batch", "2", "--context", "32", "--steps", "2",
                    "--json", str(tmp_path / "ops.json")])
    assert json.loads((tmp_path / "ops.json").read_text()) == json.loads(json.dumps(res))
    assert res["op_ms"] > 0 and res["groups"] and res["unprofiled_ms"] > 0
    calls = lambda target: sum(g["calls"] for k, g in res["groups"].items() if k.startswith(target + " "))
    if kernels_cpu.native_available():
        # tiny-llama: 2 layers x (q, k, v, o, gate, up, down) + the output head; attention once per layer
        assert calls("jserve_matmul_nt") == 15
        assert calls("jserve_paged_decode_attention") == 2
