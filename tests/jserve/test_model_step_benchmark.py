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
