"""Cost models, KV capacity and profile files, against hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest

from eval.costmodels import (
    PRESETS,
    ProfileError,
    RooflineCostModel,
    calibrate,
    calibrated_fit,
    device_kv_blocks,
    host_kv_blocks,
    load_profile,
    opt13b_calibration,
    profile_dict,
    resolve_preset,
    save_profile,
)
from eval.costmodels.specs import A100_40GB, LLAMA3_8B, OPT_13B, ModelSpec
from schedulers.cost import FittedCostModel, default_cost_model

A100_MEM = 40536 * 2**20  # bytes the CUDA runtime reports for an A100-SXM4-40GB


def test_model_specs_match_published_sizes():
    # OPT-13B: 12.85B parameters, 800 KiB of KV per token (2 x 40 layers x 5120 x 2 bytes).
    assert OPT_13B.num_params == pytest.approx(12.85e9, rel=2e-3)
    assert OPT_13B.kv_bytes_per_token == 2 * 40 * 5120 * 2 == 800 * 1024
    # Llama-3-8B: 8.03B parameters, 128 KiB of KV per token (2 x 32 layers x 8 kv heads x 128 x 2 bytes).
    assert LLAMA3_8B.num_params == pytest.approx(8.03e9, rel=2e-3)
    assert LLAMA3_8B.kv_bytes_per_token == 128 * 1024


def test_model_spec_from_hf_config_and_errors():
    opt = ModelSpec.from_hf_config(
        dict(model_type="opt", hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, ffn_dim=20480,
             vocab_size=50272, max_position_embeddings=2048),
        name="opt-13b",
    )
    assert opt == OPT_13B
    llama = ModelSpec.from_hf_config(
        dict(model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
             num_hidden_layers=32, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192),
        name="llama-3-8b",
    )
    assert llama == LLAMA3_8B
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelSpec.from_hf_config(dict(model_type="llama", hidden_size=8, num_attention_heads=2,
                                      num_hidden_layers=1, vocab_size=10))
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelSpec("bad", 1, 8, 3, 2, 4, 16, 10)


def test_device_capacity_fastserve_rule_by_hand():
    # The artifact's FastServe server: floor((0.9 M - 0.01 M - weights) / block_bytes).
    weights = OPT_13B.num_params * 2
    expected = math.floor((0.9 * A100_MEM - 0.01 * A100_MEM - weights) / (16 * 819200))
    assert device_kv_blocks(OPT_13B, A100_40GB, rule="fastserve") == expected == 925


def test_device_capacity_vllm_rule_is_near_design_value():
    blocks = device_kv_blocks(OPT_13B, A100_40GB, rule="vllm")
    assert abs(blocks - 883) / 883 < 0.02, blocks
    # A bigger profiling batch leaves fewer blocks.
    assert device_kv_blocks(OPT_13B, A100_40GB, rule="vllm", max_tokens_per_batch=8192) < blocks


def test_capacity_errors():
    with pytest.raises(ValueError, match="sizing rule"):
        device_kv_blocks(OPT_13B, A100_40GB, rule="guess")
    big = ModelSpec("huge", 200, 12288, 96, 96, 128, 49152, 50272)
    with pytest.raises(ValueError, match=r"does not fit .*of weights per GPU and .* of activations"):
        device_kv_blocks(big, A100_40GB)
    with pytest.raises(ValueError, match=r"left for the KV cache hold no block of 10000000 tokens"):
        device_kv_blocks(OPT_13B, A100_40GB, block_size=10_000_000)
    with pytest.raises(ValueError, match="swap space"):
        host_kv_blocks(OPT_13B, -1)


def test_host_capacity_from_swap_space():
    block = 16 * 819200
    assert host_kv_blocks(OPT_13B, 56) == 56 * 2**30 // block == 4587
    assert host_kv_blocks(OPT_13B, 48) == 3932
    assert host_kv_blocks(OPT_13B, 4) == 327


def test_calibration_round_trip_reproduces_the_fit():
    fit = default_cost_model()
    again = calibrated_fit(OPT_13B, A100_40GB, calibrate(fit, OPT_13B, A100_40GB))
    for name in ("p0", "p1", "p2", "d0", "d1", "d2"):
        assert getattr(again, name) == pytest.approx(getattr(fit, name), rel=1e-12), name
    assert again.block_bytes == fit.block_bytes


def test_llama3_8b_coefficients_by_hand():
    fit = PRESETS["llama-3-8b-a100"].cost
    opt_w, llama_w = 12_850_790_400 * 2, 8_029_995_008 * 2
    # Dense params touched per token (layers + LM head): OPT 40*(4*5120^2 + 2*5120*20480) + 50272*5120.
    opt_dense = 40 * (4 * 5120**2 + 2 * 5120 * 20480) + 50272 * 5120
    llama_dense = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    assert fit.d0 == pytest.approx(19.93e-3 * llama_w / opt_w, rel=1e-3)
    assert fit.p0 == pytest.approx(18.10e-3 * llama_w / opt_w, rel=1e-3)
    assert fit.d1 == pytest.approx(6.27e-7 * 131072 / 819200, rel=1e-9)
    assert fit.p1 == pytest.approx(0.1019e-3 * llama_dense / opt_dense, rel=1e-9)
    assert fit.d2 == pytest.approx(0.0385e-3 * llama_dense / opt_dense, rel=1e-9)
    assert fit.p2 == pytest.approx(7.12e-9 * (32 * 128 * 32) / (40 * 128 * 40), rel=1e-9)
    assert fit.block_bytes == 16 * 131072


def test_tensor_parallel_divides_per_gpu_work_and_adds_allreduce():
    cal = opt13b_calibration()
    one = calibrated_fit(OPT_13B, A100_40GB, cal, tp=1)
    two = calibrated_fit(OPT_13B, A100_40GB, cal, tp=2)
    # 2 all-reduces x 40 layers, each moving 2*(tp-1)/tp * 5120 * 2 bytes per token at 300 GB/s.
    per_token = 80 * 1.0 * 5120 * 2 / 300e9
    assert two.p1 == pytest.approx(one.p1 / 2 + per_token, rel=1e-9)
    assert two.d1 == pytest.approx(one.d1 / 2, rel=1e-9)
    assert two.d0 == pytest.approx(one.d0 / 2 + 80 * 10e-6, rel=1e-9)
    assert two.block_bytes == one.block_bytes // 2


def test_ideal_roofline_by_hand():
    model = RooflineCostModel(OPT_13B, A100_40GB)
    # Batch-1 decode at context 1000 is memory-bound: weights + 1000 tokens of KV at 1555 GB/s.
    expected = (OPT_13B.num_params * 2 + 1000 * 819200) / 1555e9
    assert model.decode_time(1, 1000) == pytest.approx(expected, rel=1e-12)
    # A 2048-token prefill is compute-bound: dense FLOPs + causal attention over 2048^2/2 pairs.
    dense = 2 * (40 * (4 * 5120**2 + 2 * 5120 * 20480) + 50272 * 5120)
    flops = dense * 2048 + 4 * 40 * 128 * 40 * 2048**2 / 2
    assert model.prefill_time(2048) == pytest.approx(flops / 312e12, rel=1e-12)
    # The measured fit is slower than the ideal roofline everywhere.
    fit = default_cost_model()
    for n in (16, 256, 2048):
        assert fit.prefill_time(n) > model.prefill_time(n)
    assert fit.decode_time(16, 16 * 500) > model.decode_time(16, 16 * 500)
    assert model.step_time([], []) == 0.0
    assert model.swap_time(10) == pytest.approx(10 * 16 * 819200 / 25e9)


def test_resolve_preset_names_and_errors():
    assert resolve_preset("opt-13b-a100").cost == default_cost_model()
    assert resolve_preset("opt-13b-a100-vllmfit").cost.d0 == pytest.approx(23.48e-3)
    derived = resolve_preset("calibrated:llama-3-8b:a100-40gb").cost
    assert derived.d0 == pytest.approx(PRESETS["llama-3-8b-a100"].cost.d0)
    roof = resolve_preset("roofline:opt-13b:h100-80gb:2")
    assert isinstance(roof.cost, RooflineCostModel) and roof.tp == 2
    with pytest.raises(ValueError, match="unknown hardware preset 'nope'.*opt-13b-a100"):
        resolve_preset("nope")
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        resolve_preset("roofline:gpt5:a100-40gb")
    with pytest.raises(ValueError, match="tensor-parallel degree"):
        resolve_preset("roofline:opt-13b:a100-40gb:x")


def test_preset_pool_sizes():
    p = PRESETS["opt-13b-a100"]
    assert p.device_blocks("fastserve") == 925
    assert p.host_blocks(56) == 4587
    assert p.block_bytes == 16 * 819200


def test_profile_round_trip(tmp_path):
    path = tmp_path / "p.json"
    save_profile(PRESETS["opt-13b-a100"], path)
    loaded = load_profile(path)
    assert isinstance(loaded.cost, FittedCostModel)
    for name in ("p0", "p1", "p2", "d0", "d1", "d2"):
        assert getattr(loaded.cost, name) == pytest.approx(getattr(default_cost_model(), name), rel=1e-12)
    assert loaded.device_blocks("fastserve") == 925
    assert resolve_preset(str(path)).name == loaded.name


def test_profile_with_fixed_pool_and_errors(tmp_path):
    data = profile_dict(PRESETS["opt-13b-a100"])
    del data["model"], data["device"]
    data["num_device_blocks"] = 500
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(data))
    assert load_profile(path).device_blocks("vllm") == 500

    bad = dict(data, decode_ms=[1, 2])
    path.write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match=r"fixed\.json.*'decode_ms'"):
        load_profile(path)
    path.write_text(json.dumps(dict(data, swap={"bandwidth_bytes_per_s": 0})))
    with pytest.raises(ProfileError, match="bandwidth_bytes_per_s.*> 0"):
        load_profile(path)
    del data["num_device_blocks"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="num_device_blocks"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ProfileError, match="nested too deeply"):
        load_profile(path)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


def test_profile_shape_costs_round_trip_and_errors(tmp_path):
    # A profile with per-bucket costs: a decode of 3 requests runs in the 4-sequence bucket (42 ms) plus
    # 2e-3 ms per context token; a 40-token prefill in the 64-token bucket (70 ms) plus 1e-4 ms per token^2.
    data = profile_dict(PRESETS["opt-13b-a100"])
    data.update(num_device_blocks=100, mixed_decode_ms=[0.001, 0.5],
                shape_buckets={"tokens": [32, 64], "sequences": [1, 4]},
                shape_costs_ms={"tokens": [30.0, 70.0], "sequences": [25.0, 42.0]},
                prefill_ms=[1.0, 0.1, 1e-4], decode_ms=[1.0, 2e-3, 0.5])
    path = tmp_path / "shaped.json"
    path.write_text(json.dumps(data))
    cost = load_profile(path).cost
    assert cost.decode_time(3, 300) == pytest.approx(0.042 + 300 * 2e-6)
    assert cost.prefill_time(40) == pytest.approx(0.070 + 1e-7 * 1600)
    assert cost.step_time([(1, 0), (1, 0)], [10]) == pytest.approx(0.042 + (1 + 1 + 10) * 2e-6)  # all one-token rows
    again = tmp_path / "again.json"
    save_profile(load_profile(path), again)
    assert load_profile(again).cost == cost
    path.write_text(json.dumps(dict(data, shape_costs_ms={"tokens": [30.0], "sequences": [25.0, 42.0]})))
    with pytest.raises(ProfileError, match=r"shaped\.json.*shape_costs_ms\.tokens.*one number per"):
        load_profile(path)
    path.write_text(json.dumps(dict(data, shape_costs_ms={"tokens": [30.0, -1], "sequences": [25.0, 42.0]})))
    with pytest.raises(ProfileError, match=r"shape_costs_ms\.tokens.*>= 0"):
        load_profile(path)


def test_profile_that_cannot_price_a_step_is_named_at_load(tmp_path):
    """Found by probing ``jserve-eval run --cost``: a non-UTF-8 file gave a codec message without the file's name;
    all-zero coefficients loaded and then failed inside the run (fastserve: q0 must be > 0); coefficients near
    1e308 loaded and priced steps at inf seconds, which failed deep in the scheduler."""
    data = profile_dict(PRESETS["opt-13b-a100"])
    path = tmp_path / "p.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ProfileError, match=r"p\.json is not UTF-8 text"):
        load_profile(path)
    path.write_text(json.dumps(dict(data, prefill_ms=[0, 0, 0], decode_ms=[0, 0, 0])))
    with pytest.raises(ProfileError, match=r"p\.json: a one-request decode step costs 0\.0 s"):
        load_profile(path)
    path.write_text(json.dumps(dict(data, prefill_ms=[1e308, 1e308, 1e308])))
    with pytest.raises(ProfileError, match=r"p\.json: a 2048-token prefill costs inf s"):
        load_profile(path)


@pytest.mark.parametrize("config, message", [
    # Each escaped as a bare ZeroDivisionError, TypeError or AttributeError, or a message without the field.
    (dict(model_type="llama", hidden_size=64, num_attention_heads=0, num_hidden_layers=2, intermediate_size=10,
          vocab_size=10), r"model config field 'num_attention_heads' must be an integer >= 1, got 0"),
    (dict(model_type="opt", hidden_size=None, num_attention_heads=2), r"field 'hidden_size' must be an integer"),
    (dict(model_type="llama", hidden_size="x", num_attention_heads=2), r"field 'hidden_size' must be an integer"),
    (dict(model_type="llama", hidden_size=64.5, num_attention_heads=2), r"field 'hidden_size' must be an integer"),
    ([1], r"a model config must be a JSON object \(dict\), got list"),
])
def test_model_spec_from_hf_config_names_the_bad_field(config, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_hf_config(config)
