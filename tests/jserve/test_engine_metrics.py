"""Serving metrics (``jserve.engine.metrics``): histograms and counters against hand-computed values, the
Prometheus text format checked line by line, and an engine run whose metrics must equal what its outputs
say (token counts, finish reasons, latencies) and what its scheduler held."""

from __future__ import annotations

import math
import re

import pytest

from jserve.engine.metrics import EngineMetrics, Histogram
from jserve.engine.outputs import RequestMetrics, RequestOutput

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {family name: [(labels, value)]}, asserting the format: every sample's family was
    declared by # HELP and # TYPE before it, names carry the family's name (histograms: _bucket, _sum,
    _count), label values are quoted, values parse as floats."""
    families: dict[str, str] = {}
    samples: dict[str, list] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in families
            families[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, line
        name = m["name"]
        fam = next(f for f in families if name == f or (families[f] == "histogram" and name in
                                                          (f + "_bucket", f + "_sum", f + "_count")))
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        samples.setdefault(name, []).append((labels, float(m["value"])))
        assert fam
    return samples


def test_histogram_buckets_hand_computed():
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.5, 7.0):
        h.observe(v)
    assert h.counts == [2, 1, 0, 1] and h.sum == 10.0 and h.count == 4
    assert h.lines("x") == ['x_bucket{le="1.0"} 2', 'x_bucket{le="2.0"} 3', 'x_bucket{le="5.0"} 3',
                            'x_bucket{le="+Inf"} 4', "x_sum 10.0", "x_count 4"]
    with pytest.raises(ValueError, match="increase strictly"):
        Histogram((1.0, 1.0))


def output(reason, n_prompt, n_out, arrival, scheduled, first, finish, preemptions=0):
    return RequestOutput(request_id=0, prompt=None, prompt_token_ids=list(range(n_prompt)),
                         token_ids=list(range(n_out)), finish_reason=reason,
                         metrics=RequestMetrics(arrival, scheduled, first, finish, preemptions))


def test_counters_histograms_and_text_hand_computed():
    m = EngineMetrics()
    m.observe_finished(output("length", 5, 4, 1.0, 1.5, 2.0, 5.0, preemptions=2))  # latency 4, ttft 1
    m.observe_finished(output("stop", 3, 1, 0.0, 0.25, 0.5, 0.5))  # latency 0.5, one token: no TPOT
    m.observe_finished(output("abort", 7, 2, 0.0, 0.1, 0.2, 9.0))  # counted, no latencies
    m.observe_finished(output("error", 0, 0, 0.0, None, None, 0.0))
    m.set_gauges(running=3, waiting=4, device_used=10, device_total=40, host_used=0, host_total=0)
    snap = m.snapshot({"steps": 7})
    assert snap["finished"] == {"stop": 1, "length": 1, "abort": 1, "error": 1}
    assert (snap["prompt_tokens"], snap["generation_tokens"], snap["preemptions"]) == (15, 7, 2)
    h = snap["histograms"]
    assert h["e2e_request_latency_seconds"]["count"] == 2 and h["e2e_request_latency_seconds"]["sum"] == 4.5
    assert h["time_to_first_token_seconds"]["sum"] == 1.5 and h["request_queue_time_seconds"]["sum"] == 0.75
    assert h["time_per_output_token_seconds"]["count"] == 1 and h["time_per_output_token_seconds"]["sum"] == 1.0
    assert h["normalized_latency_seconds"]["sum"] == 4 / 4 + 0.5 / 1
    s = parse(m.render({"steps": 7, "compiles_after_warmup": 0, "unknown": 3}, labels={"model_name": 'a"b'}))
    assert {lab["finished_reason"]: v for lab, v in s["jserve:request_success_total"]} == \
        {"stop": 1, "length": 1, "abort": 1, "error": 1}
    assert all(lab["model_name"] == 'a\\"b' for v in s.values() for lab, _ in v)  # escaped, on every sample
    assert s["jserve:kv_cache_usage_perc"][0][1] == 0.25 and s["jserve:host_kv_cache_usage_perc"][0][1] == 0.0
    assert s["jserve:num_requests_waiting"][0][1] == 4 and s["jserve:iterations_total"][0][1] == 7
    assert s["jserve:compiles_after_warmup"][0][1] == 0 and not any("unknown" in k for k in s)
    buckets = s["jserve:e2e_request_latency_seconds_bucket"]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0]["le"] == "+Inf" and values[-1] == 2
    le = [float(lab["le"]) for lab, _ in buckets]
    assert le == sorted(le) and math.isinf(le[-1])
    assert sum(1 for x in (0.5, 4.0) if x <= 0.5) == dict((lab["le"], v) for lab, v in buckets)["0.5"]


def test_an_engine_run_agrees_with_its_outputs(tiny):
    """Six requests (one refused, one aborted mid-run) on a 4-row engine: the
    metrics equal what the outputs say, the gauges what the scheduler held mid-run and nothing at the end."""
    from jserve.engine import LLM, SamplingParams

    llm = LLM(tiny, scheduler="fcfs", max_batch_size=4, max_tokens_per_batch=64, max_model_len=128,
              decode_buckets=(4,), token_buckets=(64,), swap_buckets=(8,), progress=False, num_device_blocks=64,
              num_host_blocks=8)
    eng = llm.engine
    prompts = [[5 + i] * (3 + 2 * i) for i in range(5)]
    outs = [eng.add_request(p, SamplingParams(max_tokens=6 + i, ignore_eos=True)) for i, p in enumerate(prompts)]
    refused = eng.add_request([], SamplingParams(max_tokens=3))
    assert refused.finish_reason == "error"
    eng.step()
    g = eng.metrics.snapshot()["gauges"]
    assert (g["num_requests_running"], g["num_requests_waiting"]) == (4, 1)  # 4 rows, the fifth queued
    used = eng.scheduler.blocks.num_used_device_blocks
    assert used > 0 and g["kv_cache_usage_perc"] == used / eng.scheduler.blocks.num_usable_device_blocks
    eng.step()
    assert eng.abort(outs[1].request_id)
    eng.run_until_done()
    snap = eng.metrics.snapshot(eng.stats)
    done = [o for o in outs if o.finish_reason in ("stop", "length")]
    assert snap["finished"] == {"stop": 0, "length": 4, "abort": 1, "error": 1}
    assert snap["prompt_tokens"] == sum(len(p) for p in prompts)
    assert snap["generation_tokens"] == sum(len(o.token_ids) for o in outs)
    h = snap["histograms"]
    assert h["e2e_request_latency_seconds"]["count"] == 4
    assert h["e2e_request_latency_seconds"]["sum"] == pytest.approx(sum(o.metrics.latency for o in done))
    assert h["time_to_first_token_seconds"]["sum"] == pytest.approx(sum(o.metrics.ttft for o in done))
    assert h["normalized_latency_seconds"]["sum"] == pytest.approx(
        sum(o.metrics.latency / len(o.token_ids) for o in done))
    assert snap["gauges"] == {"num_requests_running": 0.0, "num_requests_waiting": 0.0,
                              "kv_cache_usage_perc": 0.0, "host_kv_cache_usage_perc": 0.0}
    s = parse(eng.metrics.render(eng.stats))
    assert s["jserve:generation_tokens_total"][0][1] == snap["generation_tokens"]
    assert s["jserve:iterations_total"][0][1] == eng.stats["steps"] > 0


def test_an_interrupted_step_counts_each_request_once(tiny):
    """Async scheduling: a request stopped by a stop id comes back finished while the scheduler still holds
    it; when the next step is interrupted, the engine aborts the live ones. The stopped one stays counted
    once, as "stop" (it was counted twice, once more as an abort of nothing)."""
    from jserve.engine import LLM, SamplingParams

    llm = LLM(tiny, scheduler="fcfs", max_batch_size=4, max_tokens_per_batch=64, max_model_len=128,
              decode_buckets=(4,), token_buckets=(64,), swap_buckets=(8,), progress=False, num_device_blocks=64,
              num_host_blocks=8, async_scheduling=True)
    eng = llm.engine
    first = llm.generate([[7] * 9], SamplingParams(max_tokens=2))[0].token_ids[0]
    before = eng.metrics.snapshot()["finished"]
    stopper = eng.add_request([7] * 9, SamplingParams(max_tokens=20, stop_token_ids=[first]))
    other = eng.add_request([9] * 9, SamplingParams(max_tokens=20, ignore_eos=True))
    while not stopper.finished:
        eng.step()
    assert stopper.finish_reason == "stop" and stopper.request_id in eng._seqs  # the scheduler holds it still

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    eng.runner.launch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.step()
    finally:
        del eng.runner.launch
    after = eng.metrics.snapshot()["finished"]
    assert other.finish_reason == "abort" and stopper.finish_reason == "stop"
    assert {k: after[k] - before[k] for k in after} == {"stop": 1, "length": 0, "abort": 1, "error": 0}
    assert eng.metrics.snapshot()["gauges"]["num_requests_running"] == 0
