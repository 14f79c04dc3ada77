"""The eval engine backend: lengths and rate scaling by hand, and a real-time replay on a tiny engine that
returns simulator-shaped records."""

from __future__ import annotations

import pytest

from eval.engine_backend import EngineOptions, build_engine, fcfs_capacity, fit_lengths, rate_scale, replay, use_policy
from eval.records import WorkloadRequest
from schedulers.cost import FittedCostModel


def test_fit_lengths_scales_to_the_context():
    w = [WorkloadRequest(0, 1000, 1048, 0.0), WorkloadRequest(1, 3, 1, 0.5)]
    out = fit_lengths(w, 256, 2048)
    assert [(r.prompt_len, r.output_len) for r in out] == [(125, 131), (1, 1)]
    assert fit_lengths(w, 4096, 2048) == w


def test_rate_scale_is_the_ratio_of_simulated_fcfs_capacities_by_hand():
    from eval.simulator import CopyLink, workload_requests
    from schedulers import SchedulerConfig
    slow = FittedCostModel(0.02, 0.0, 0.0, 0.02, 0.0, 0.0)  # every step 20 ms
    fast = FittedCostModel(0.01, 0.0, 0.0, 0.01, 0.0, 0.0)  # every step 10 ms
    link = CopyLink(block_bytes=1, bandwidth=1e9)
    cfg = SchedulerConfig(max_batch_size=4, num_device_blocks=64, num_host_blocks=64)
    long = workload_requests([(8, 10, 0.0)] * 40)  # waves of 4 requests, 10 steps each
    short = workload_requests([(4, 5, 0.0)] * 40)  # waves of 4 requests, 5 steps each
    assert fcfs_capacity(cfg, slow, link, long) == pytest.approx(4 / (10 * 0.02))  # 20 req/s
    assert fcfs_capacity(cfg, fast, link, short) == pytest.approx(4 / (5 * 0.01))  # 80 req/s
    # half the batch: a wave of 2 requests takes as many steps, so half the requests a second
    assert fcfs_capacity(cfg.replace(max_batch_size=2), fast, link, short) == pytest.approx(40.0)
    assert rate_scale(20.0, 80.0) == pytest.approx(4.0)
    for bad in ((0.0, 1.0), (1.0, float("nan")), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="cannot scale rates"):
            rate_scale(*bad)


@pytest.fixture(scope="module")
def engine():
    opts = EngineOptions(model="tiny-llama", max_model_len=64, max_tokens_per_batch=64, num_device_blocks=20,
                         num_host_blocks=16, decode_buckets=(2, 4), token_buckets=(16, 64), swap_buckets=(4,))
    return build_engine(opts, 4)


def test_replay_returns_simulator_shaped_records(engine):
    cost = FittedCostModel(1e-3, 1e-5, 0.0, 1e-3, 0.0, 1e-4)
    use_policy(engine, "fcfs", None, cost)
    work = [WorkloadRequest(i, 5 + 3 * i, 4 + i, 0.01 * i) for i in range(6)]
    run = replay(engine, work, seed=1)
    assert run.stop_reason == "completed" and run.stats["compiles_during_run"] == 0
    assert [r.request_id for r in run.records] == list(range(6))
    for w, r in zip(work, run.records):
        assert r.finished and r.output_len == w.output_len and r.prompt_len == w.prompt_len
        assert r.arrival_time == w.arrival_time <= r.first_token_time <= r.finish_time
        assert r.executing_time > 0
        assert r.queued_time + r.swapping_time + r.executing_time == pytest.approx(r.latency, abs=1e-6)
    assert not engine.has_unfinished()


def test_replay_logs_each_step_beside_its_price(engine):
    # Prices by hand: a prefill step 1 ms + 0.01 ms per token, a decode step 2 ms + 0.1 ms per request,
    # a mixed step max(1, 2) ms + both per-item terms (FittedCostModel's form); no copies happen.
    cost = FittedCostModel(1e-3, 1e-5, 0.0, 2e-3, 0.0, 1e-4)
    use_policy(engine, "fcfs", None, cost)
    work = [WorkloadRequest(i, 6 + i, 3, 0.0 if i < 2 else 0.05) for i in range(3)]
    run = replay(engine, work, seed=3, id_prefix="priced", step_cost=cost)
    assert len(run.steps) == run.stats["compute_steps"] > 0
    assert sum(st.measured for st in run.steps) == pytest.approx(run.stats["busy_seconds"])
    kinds = {st.kind for st in run.steps}
    assert "decode" in kinds and kinds & {"prefill", "mixed"}
    for st in run.steps:
        base = {"prefill": 1e-3, "decode": 2e-3, "mixed": 2e-3}[st.kind]
        assert st.priced == pytest.approx(base + 1e-5 * st.prefill_tokens + 1e-4 * st.num_decodes)
        assert st.measured > 0 and st.start >= 0
    assert sum(st.prefill_tokens for st in run.steps) == sum(w.prompt_len for w in work)
    assert replay(engine, work[:1], id_prefix="unpriced").steps == []


def test_replay_under_memory_pressure_finishes_everything(engine):
    # 19 usable blocks of 16 tokens; four 60-token requests need 16 blocks at the end: fastserve's MLFQ keeps
    # started jobs' KV and must swap; every request still finishes with all its tokens.
    cost = FittedCostModel(1e-3, 1e-5, 0.0, 1e-3, 0.0, 1e-4, block_bytes=1024, swap_bandwidth=1e9)
    use_policy(engine, "fastserve", None, cost)
    work = [WorkloadRequest(i, 20, 40, 0.0) for i in range(6)]
    run = replay(engine, work, seed=2, id_prefix="pressure")
    assert all(r.finished and r.output_len == 40 for r in run.records)
    assert engine.scheduler.config.max_batch_size == 4


def test_replay_refuses_a_busy_engine(engine):
    engine.add_request([1, 2, 3], {"max_tokens": 2, "ignore_eos": True}, request_id="busy")
    try:
        with pytest.raises(RuntimeError, match="unfinished"):
            replay(engine, [WorkloadRequest(0, 3, 2, 0.0)])
        with pytest.raises(RuntimeError, match="unfinished"):
            use_policy(engine, "fcfs")
    finally:
        engine.run_until_done()


def test_cli_engine_backend_needs_a_profile(tmp_path, capsys):
    from eval.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "2",
              "--out", str(tmp_path), "--backend", "engine"])
    assert exc.value.code == 2 and "needs the engine's cost profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "2",
              "--out", str(tmp_path), "--cost", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "cannot read cost profile" in capsys.readouterr().err


def _profile(tmp_path, name="P", price=1.0, **fields):
    """The OPT-13B/A100 preset as a profile file, every step price times ``price`` and the link as much slower."""
    import json

    from eval.costmodels import resolve_preset
    from eval.costmodels.profile import profile_dict

    data = profile_dict(resolve_preset("opt-13b-a100"))
    data["prefill_ms"] = [v * price for v in data["prefill_ms"]]
    data["decode_ms"] = [v * price for v in data["decode_ms"]]
    data["swap"]["bandwidth_bytes_per_s"] /= price
    data.update(fields)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_simulator_on_a_profiled_device_scales_rates_like_the_engine_backend(tmp_path):
    """``RunSpec(device=P)`` (``--cost P`` with the simulator) is the simulator's stand-in for the engine backend:
    rates scaled from the figure's preset to the device. Checked by hand: on a profile of the preset itself the
    run is the plain run exactly; on a device whose every step and copy takes twice as long, FCFS's capacity
    halves, so arrivals come at half the rate, and every time of the run doubles."""
    import dataclasses

    from eval.experiments.systems import get_system
    from eval.runner import RunSpec, run_metrics, simulate_spec

    plain = RunSpec(get_system("fcfs"), "sharegpt", 60, 3.0)
    base = simulate_spec(plain)
    same = simulate_spec(dataclasses.replace(plain, device=_profile(tmp_path, "same")))
    assert same.stats["rate_scale"] == 1.0
    assert [(r.arrival_time, r.finish_time) for r in same.records] == [(r.arrival_time, r.finish_time)
                                                                        for r in base.records]
    slow = simulate_spec(dataclasses.replace(plain, device=_profile(tmp_path, "slow", price=2.0)))
    assert slow.stats["rate_scale"] == pytest.approx(0.5, rel=1e-9)
    assert slow.stats["device_rate"] == pytest.approx(1.5, rel=1e-9)
    for r, b in zip(slow.records, base.records):
        assert (r.prompt_len, r.output_len) == (b.prompt_len, b.output_len)
        assert (r.arrival_time, r.first_token_time, r.finish_time) == pytest.approx(
            (2 * b.arrival_time, 2 * b.first_token_time, 2 * b.finish_time), rel=1e-9)
    m, mb = run_metrics(slow.records), run_metrics(base.records)
    assert m["mean_norm_latency"] == pytest.approx(2 * mb["mean_norm_latency"], rel=1e-9)


def test_the_profiled_engines_limits_fit_the_lengths_and_cap_the_batch(tmp_path):
    """A profile written by ``jserve profile`` records its engine's limits; the simulated device runs with them,
    as the engine backend does on the engine: lengths fitted to its context, its batch and host pool."""
    import dataclasses

    from eval.costmodels import load_profile
    from eval.experiments.systems import device_scheduler_config, get_system
    from eval.runner import RunSpec, simulate_spec
    from eval.workloads import make_workload

    limits = {"max_model_len": 512, "max_batch_size": 8, "max_tokens_per_batch": 512, "num_host_blocks": 0}
    path = _profile(tmp_path, engine=dict(limits, model="ignored", decode_buckets=[1, 8]))
    config = device_scheduler_config(get_system("vllm"), load_profile(path), "sharegpt", batch_size=16)
    assert (config.max_model_len, config.max_batch_size, config.max_tokens_per_batch, config.num_host_blocks) == (
        512, 8, 512, 0)
    plain = RunSpec(get_system("vllm"), "sharegpt", 40, 2.0)
    run = simulate_spec(dataclasses.replace(plain, device=path), check=True)
    fitted = fit_lengths(make_workload(plain.workload_spec(), plain.seed), 512, 2048)
    assert [(r.prompt_len, r.output_len) for r in run.records] == [(w.prompt_len, w.output_len) for w in fitted]
    assert all(r.finish_time is not None for r in run.records) and run.stats["rate_scale"] > 0
