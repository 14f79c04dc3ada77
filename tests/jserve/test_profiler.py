"""The engine profiler: the fit recovers known coefficients, a tiny-model profile run writes a file the
simulator loads, and bad input gets clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from eval.costmodels import MixedStepCostModel, load_profile
from jserve.engine.profiler import ProfileGrid, fit_cost_model, nnls_fit

TRUE = dict(p0=2e-3, p1=1e-4, p2=3e-7, d0=1.5e-3, d1=5e-7, d2=2e-4, m1=4e-6, m2=8e-4)


def _synthetic(noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = TRUE
    jitter = lambda: 1 + noise * rng.standard_normal()  # noqa: E731
    prefill = [([n] * k, (t["p0"] + t["p1"] * k * n + t["p2"] * k * n * n) * jitter())
               for k in (1, 2, 4) for n in (5, 40, 90, 200) if k * n <= 256]
    decode = [([c] * b, (t["d0"] + t["d1"] * b * c + t["d2"] * b) * jitter()) for b in (1, 3, 8) for c in (10, 100, 250)]
    mixed = [([n], [c] * b, (t["p0"] + t["p1"] * n + t["p2"] * n * n + t["m1"] * b * c + t["m2"] * b) * jitter())
             for n in (8, 60) for b in (1, 5) for c in (20, 200)]
    copies = [(n, 1e-4 + n * 65536 / 4e9) for n in (4, 16, 64)]
    return prefill, decode, mixed, copies


def test_fit_recovers_known_coefficients():
    prefill, decode, mixed, copies = _synthetic()
    cost, fits, (m1, m2), *_ = fit_cost_model(prefill, decode, copies, mixed, block_bytes=65536, overhead=1e-4)
    got = dict(p0=cost.p0 - 1e-4, p1=cost.p1, p2=cost.p2, d0=cost.d0 - 1e-4, d1=cost.d1, d2=cost.d2, m1=m1, m2=m2)
    for k, v in TRUE.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    assert cost.swap_bandwidth == pytest.approx(4e9, rel=1e-6)
    assert cost.swap_latency == pytest.approx(1e-4, rel=1e-6)
    assert fits["prefill"].r2 == pytest.approx(1.0) and fits["decode"].max_rel_err < 1e-9


def test_fit_with_noise_stays_close():
    prefill, decode, mixed, copies = _synthetic(noise=0.02, seed=3)
    cost, fits, *_ = fit_cost_model(prefill, decode, copies, mixed, block_bytes=65536)
    assert cost.p1 == pytest.approx(TRUE["p1"], rel=0.15)
    assert cost.d2 == pytest.approx(TRUE["d2"], rel=0.15)
    assert fits["decode"].mean_abs_rel_err < 0.05


def test_nnls_clamps_negative_coefficients():
    # y = 2 + 0*x with a point that pulls the unconstrained slope negative.
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    y = np.array([3.0, 2.0, 1.0])
    coef = nnls_fit(x, y)
    assert coef[1] == 0.0 and coef[0] == pytest.approx(2.0)  # the best constant alone
    coef = nnls_fit(np.array([[1.0], [2.0]]), np.array([-1.0, -2.0]))
    assert coef.tolist() == [0.0]


def test_grid_validation_names_the_field():
    with pytest.raises(ValueError, match="ProfileGrid.prefill needs at least 3"):
        ProfileGrid(prefill=((1, 4),), decode=((1, 2),) * 3, copies=(4, 16))
    with pytest.raises(ValueError, match="ProfileGrid.repeats"):
        ProfileGrid(prefill=((1, 4),) * 3, decode=((1, 2),) * 3, copies=(4, 16), repeats=0)
    with pytest.raises(ValueError, match="need at least 3 prefill"):
        fit_cost_model([([1], 1.0)], [([1], 1.0)] * 3)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from jserve.cli import main

    out = tmp_path_factory.mktemp("prof") / "profile.json"
    rc = main(["profile", "--model", "tiny-llama", "--out", str(out), "--quick", "--max-model-len", "64",
               "--max-batch-size", "4", "--token-buckets", "16,64", "--decode-buckets", "2,4",
               "--num-device-blocks", "24", "--num-host-blocks", "16", "--swap-buckets", "4,16", "--repeats", "2"])
    assert rc == 0
    return out


def test_profile_run_writes_a_loadable_profile(tiny_profile):
    data = json.loads(tiny_profile.read_text())
    assert data["format"] == "jserve-cost-profile/1"
    assert data["num_device_blocks"] == 23  # the pool minus the engine's padding page
    assert data["swap"]["full_duplex"] is False and data["swap"]["bandwidth_bytes_per_s"] > 0
    assert data["block_bytes"] == 2 * 2 * 2 * 16 * 16 * 4  # K+V x layers x kv heads x page x head_dim x f32
    assert set(data["fit"]) >= {"prefill", "decode", "mixed", "copy"}
    assert "cpu" in data["provenance"] and data["engine"]["max_model_len"] == 64
    load = data["host_load_average_1min"]  # Linux reports one: recorded at both ends, with the CPU count
    assert load["start"] >= 0 and load["end"] >= 0 and load["cpus"] == os.cpu_count()
    assert f"host load average {load['start']:.2f} -> {load['end']:.2f} on {load['cpus']} CPUs" in data["provenance"]
    preset = load_profile(tiny_profile)
    assert isinstance(preset.cost, MixedStepCostModel)
    assert preset.fixed_device_blocks == 23
    assert preset.cost.decode_time(1, 10) > 0 and preset.cost.prefill_time(32) >= preset.cost.prefill_time(1)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["--model", "tiny-llama", "--max-batch-size", "0"], "--max-batch-size: expected a positive integer"),
    (["--model", "tiny-llama", "--decode-buckets", "a,b"], "--decode-buckets: expected a comma list"),
])
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, argv, needle):
    from jserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["profile", "--out", str(tmp_path / "p.json"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_out_directory_is_reported(tmp_path, capsys):
    from jserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["profile", "--model", "tiny-llama", "--out", str(tmp_path / "nope" / "p.json")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_fit_with_shape_buckets_recovers_padded_costs():
    # Steps priced on padded counts (token buckets 32/64, batch buckets 2/4/8): the bucket-aware fit recovers
    # the coefficients exactly, and the profile's cost model prices a new step the same way.
    from eval.costmodels.profile import MixedStepCostModel

    truth = MixedStepCostModel(2e-3, 1e-4, 1e-7, 1e-3, 1e-6, 3e-4, m1=2e-6, m2=5e-4,
                               token_buckets=(32, 64), seq_buckets=(2, 4, 8))
    prefill = [([n] * k, truth.step_time([(n, 0)] * k, [])) for k, n in [(1, 5), (1, 20), (1, 40), (2, 30), (1, 64)]]
    decode = [([c] * b, truth.step_time([], [c] * b)) for b, c in [(1, 10), (3, 50), (5, 100), (8, 30), (2, 200)]]
    mixed = [([n], [c] * b, truth.step_time([(n, 0)], [c] * b)) for n, b, c in [(10, 2, 40), (30, 4, 100), (50, 3, 20)]]
    cost, fits, (m1, m2), *_ = fit_cost_model(prefill, decode, (), mixed, token_buckets=(32, 64), seq_buckets=(2, 4, 8))
    np.testing.assert_allclose([cost.p0, cost.p1, cost.p2, cost.d0, cost.d1, cost.d2, m1, m2],
                               [2e-3, 1e-4, 1e-7, 1e-3, 1e-6, 3e-4, 2e-6, 5e-4], rtol=1e-6, atol=1e-12)
    assert truth.step_time([(5, 0)], []) == truth.step_time([(30, 0)], []) - 1e-7 * (900 - 25)  # same bucket
    assert truth.decode_time(3, 90) == pytest.approx(1e-3 + 90e-6 + 4 * 3e-4)  # 3 requests run as 4


def test_shape_priced_fit_recovers_per_bucket_costs():
    # Bucket costs that no line through the buckets gives (one decode 25 ms, two 42 ms: GEMV vs GEMM on a CPU),
    # plus length terms. The shape-priced fit recovers every bucket and term exactly; one-token prompts are
    # priced as the decode step the engine runs them in; the profile document prices new steps the same way.
    from eval.costmodels.profile import MixedStepCostModel, preset_from_dict
    from jserve.engine.profiler import ProfileResult

    truth = MixedStepCostModel(0.0, 0.0, 2e-7, 0.0, 3e-6, 0.0, m1=5e-6, m2=1e-3, token_buckets=(32, 64, 128),
                               seq_buckets=(1, 2, 4, 8), token_costs=(0.030, 0.070, 0.110),
                               seq_costs=(0.025, 0.042, 0.048, 0.055))
    prefill = [([n] * k, truth.step_time([(n, 0)] * k, [])) for k, n in
               [(1, 1), (4, 1), (1, 7), (1, 30), (1, 40), (2, 30), (1, 64), (1, 100), (4, 30)]]
    decode = [([c] * b, truth.step_time([], [c] * b)) for b, c in [(1, 10), (1, 90), (2, 50), (3, 100), (8, 30), (6, 7)]]
    mixed = [([n], [c] * b, truth.step_time([(n, 0)], [c] * b)) for n, b, c in [(10, 2, 40), (30, 4, 100), (50, 3, 20),
                                                                              (90, 5, 60), (1, 3, 9)]]
    copies = [(n, 1e-4 + n * 4096 / 4e9) for n in (4, 16)]
    fit = fit_cost_model(prefill, decode, copies, mixed, token_buckets=(32, 64, 128), seq_buckets=(1, 2, 4, 8),
                         overhead=1e-3, block_bytes=4096)
    np.testing.assert_allclose(fit.token_costs, [0.031, 0.071, 0.111], rtol=1e-6)
    np.testing.assert_allclose(fit.seq_costs, [0.026, 0.043, 0.049, 0.056], rtol=1e-6)
    np.testing.assert_allclose([fit.cost.p2, fit.cost.d1, *fit.mixed_decode], [2e-7, 3e-6, 5e-6, 1e-3], rtol=1e-6)
    assert fit.fits["prefill"].max_rel_err < 1e-6 and fit.fits["mixed"].max_rel_err < 1e-6
    assert prefill[1][1] == pytest.approx(0.048 + 4 * 3e-6)  # four one-token prompts: the decode[4] step
    result = ProfileResult(fit.cost, fit.fits, fit.mixed_decode, fit.token_costs, fit.seq_costs, 1e-3, 10, 16, 4096,
                           {}, {"token_buckets": [32, 64, 128], "decode_buckets": [1, 2, 4, 8], "model": "m"},
                           "cpu:x", "today", 1.0)
    cost = preset_from_dict(result.to_dict(), "p").cost
    assert cost.token_costs == pytest.approx((0.031, 0.071, 0.111)) and cost.seq_buckets == (1, 2, 4, 8)
    # A new step in each family, priced by the loaded profile as by the truth (plus the 1 ms overhead).
    assert cost.step_time([(20, 5)], [33, 70]) == pytest.approx(truth.step_time([(20, 5)], [33, 70]) + 1e-3)
    assert cost.decode_time(3, 300) == pytest.approx(0.049 + 300 * 3e-6)
    assert cost.prefill_time(100) == pytest.approx(0.111 + 2e-7 * 100**2)
    assert cost.prefill_time(200) == pytest.approx(0.111 * 200 / 128 + 2e-7 * 200**2)  # past the largest bucket


def test_interleaved_means_time_every_point_in_shuffled_rounds():
    import time

    from jserve.engine.profiler import interleaved_means

    calls = []

    def point(k, seconds):
        def fn():
            calls.append(k)
            time.sleep(seconds)
        return fn

    means = interleaved_means([point(0, 0.002), point(1, 0.006), point(2, 0.0)], repeats=4, warmup=1)
    assert [calls.count(k) for k in range(3)] == [9, 9, 9]  # one warm-up round + four rounds of two calls
    visits = calls[3::2]
    assert calls[4::2] == visits  # each timed call right after an untimed call of the same point
    rounds = [tuple(visits[i : i + 3]) for i in range(0, 12, 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds) and len(set(rounds)) > 1  # each round: all, reshuffled
    assert 0.002 <= means[0] < means[1] and 0.006 <= means[1] < 0.05 and means[2] < means[0]


def test_an_out_path_under_a_file_is_reported_before_profiling(tmp_path, capsys):
    from jserve.cli import main

    (tmp_path / "file").write_text("x")  # its "directory" exists but is a file: the save failed after profiling
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--model", "tiny-llama", "--out", str(tmp_path / "file" / "p.json"), "--quick",
              "--max-model-len", "64", "--max-batch-size", "2", "--decode-buckets", "2", "--token-buckets", "64"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is not a directory" in err and "Traceback" not in err, err


@pytest.mark.slow  # about 15 s on 2 cores: builds and compiles the engine the profile describes
def test_eval_engine_backend_replays_a_workload_at_rates_scaled_by_capacity(tiny_profile, tmp_path, capsys):
    from eval.cli import main

    stats = []
    for rate in ("1", "2"):  # one engine, one rate scale for both (the capacities do not depend on the rate)
        rc = main(["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", rate, "--num-requests", "6",
                   "--backend", "engine", "--cost", str(tiny_profile), "--model", "tiny-llama", "--max-model-len", "64",
                   "--num-device-blocks", "24", "--num-host-blocks", "16", "--out", str(tmp_path)])
        summary = json.loads(capsys.readouterr().out)
        assert rc == 0 and summary["num_finished"] == 6 and summary["stop_reason"] == "completed"
        line = next(x for x in open(summary["log"]) if x.startswith("jserve-engine-stats: "))
        stats.append(json.loads(line.split(": ", 1)[1]))
    a, b = stats
    assert a["compiles_during_run"] == b["compiles_during_run"] == 0
    # a tiny model on a CPU serves its 32x shorter requests far faster than OPT-13B on an A100 serves the
    # originals: the device runs the figure's rates many times over
    assert a["rate_scale"] == b["rate_scale"] > 10
    assert a["device_rate"] == pytest.approx(a["rate_scale"]) and b["device_rate"] == pytest.approx(2 * b["rate_scale"])


def test_busy_host_note_warns_above_half_the_cpus():
    from jserve.engine.profile_cli import busy_host_note

    assert busy_host_note((None, None), 2) is None  # no load average on this OS: nothing to say
    assert busy_host_note((0.4, 1.0), 2) is None  # at most half of 2 CPUs
    assert busy_host_note((0.4, 1.0), None) is None
    note = busy_host_note((1.5, 0.3), 2)  # busy at the start is enough
    assert "load average was 1.50 on 2 CPUs" in note and "quiet machine" in note
    assert "7.25 on 8 CPUs" in busy_host_note((None, 7.25), 8)
