"""Artifact-format client logs: names, round trips, and the artifact's own parsing rules as the reference.

``artifact_*`` helpers below re-state, independently, what LLMServe/FastServe's plotting scripts do with a log
directory (benchmarks/artifact-evaluation/overall/lib.py and fig11/fig13/fig14): they are the compatibility
contract our files must meet.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.artifact_log import (format_rate, log_filename, parse_log_filename, read_client_log,
                               records_from_client_log, write_client_log)
from eval.metrics import summarize
from eval.records import RequestRecord


def artifact_name_fields(file: str, file_prefix: str, bs_suffix: bool) -> tuple:
    stripped = file[len(file_prefix) + len("-"):-len("-client-log")]
    parts = stripped.split("-")
    if bs_suffix:
        n, rate, _ = parts
    else:
        n, rate = parts
    return int(n), float(rate)


def artifact_read(path) -> list[dict]:
    with open(path) as f:
        for line in f.readlines():
            if line.startswith("[("):
                out = []
                for item in eval(line.strip()):  # noqa: S307 - mirrors the artifact's reader on our own file
                    prompt_len, output_len, _lat, start, end = item[:5]
                    first = item[5] if len(item) == 6 else start
                    out.append({"ttft": first - start, "tpot": (end - start) / output_len})
                return out
    return []


def records():
    return [
        RequestRecord(0, 12, 4, 0.0, 0.5, 2.5, queued_time=0.2, swapping_time=0.1, executing_time=2.2),
        RequestRecord(1, 30, 10, np.float64(0.25), np.float64(0.75), np.float64(1.75), num_preemptions=2),
        RequestRecord(2, 7, 3, 1.0, 1.5, None),  # unfinished
        RequestRecord(3, 900, 5, 1.5, None, None, rejected_reason="too long"),
        RequestRecord(4, 5, 2, 2.0, 2.1, 2.2, executing_time=0.2),
    ]


@pytest.mark.parametrize("rate, text", [(1.0, "1"), (1, "1"), (0.1, "0.1"), (1.75, "1.75"), (10.0, "10"),
                                        (1e-5, "0.00001"), (np.float64(2.25), "2.25")])
def test_rates_print_like_the_artifacts_shell_values(rate, text):
    assert format_rate(rate) == text


def test_log_filenames_are_the_artifacts_and_its_scripts_parse_them():
    name = log_filename("fastserve", "sharegpt", 400, 2.25)
    assert name == "exp-fastserve-sharegpt-400-2.25-client-log"
    assert artifact_name_fields(name, "exp-fastserve-sharegpt", False) == (400, 2.25)
    bs = log_filename("vllm", "sharegpt", 700, 4, batch_size=64)
    assert bs == "exp-vllm-sharegpt-700-4-bs=64-client-log" and bs.endswith("bs=64-client-log")
    assert artifact_name_fields(bs, "exp-vllm-sharegpt", True) == (700, 4.0)
    dashed = log_filename("fixed-priority", "synthetic", 100, 0.5)
    assert artifact_name_fields(dashed, "exp-fixed-priority-synthetic", False) == (100, 0.5)
    parsed = parse_log_filename("/some/dir/" + bs)
    assert (parsed.system, parsed.dataset, parsed.num_requests, parsed.rate, parsed.batch_size) == \
        ("vllm", "sharegpt", 700, 4.0, 64)
    assert parse_log_filename(dashed).system == "fixed-priority"


@pytest.mark.parametrize("args, message", [
    (("fast serve", "sharegpt", 1, 1.0), "system"),
    (("a/b", "sharegpt", 1, 1.0), "system"),
    (("fastserve", "share-gpt", 1, 1.0), "dataset"),
    (("fastserve", "sharegpt", 0, 1.0), "n must be"),
    (("fastserve", "sharegpt", 1, 0.0), "rate"),
    (("fastserve", "sharegpt", 1, float("nan")), "rate"),
])
def test_bad_log_name_parts(args, message):
    with pytest.raises(ValueError, match=message):
        log_filename(*args)


def test_bad_batch_size_and_foreign_names():
    with pytest.raises(ValueError, match="batch_size"):
        log_filename("fastserve", "sharegpt", 1, 1.0, batch_size=0)
    with pytest.raises(ValueError, match="not a client log name"):
        parse_log_filename("exp-fastserve-sharegpt-1-1.log")
    with pytest.raises(ValueError, match="cannot read"):
        parse_log_filename("exp-fastserve-sharegpt-x-1-client-log")
    # Names log_filename never writes were parsed: a NaN or inf rate, a zero batch size or request count.
    for bad in ("exp-fastserve-sharegpt-400-nan-client-log", "exp-fastserve-sharegpt-400-inf-client-log",
                "exp-fastserve-sharegpt-400-0-client-log", "exp-fastserve-sharegpt-0-1-client-log",
                "exp-fastserve-sharegpt-400-1-bs=0-client-log"):
        with pytest.raises(ValueError, match="n, rate and batch size must be > 0 and finite"):
            parse_log_filename(bad)


def test_round_trip_and_artifact_reader_agree_with_our_metrics(tmp_path):
    path = tmp_path / log_filename("fastserve", "sharegpt", 5, 1.0)
    write_client_log(path, records(), extra_lines=["seed=0 backend=sim"])
    text = path.read_text()
    assert "np.float64" not in text and "seed=0 backend=sim" in text
    tuples = read_client_log(path)
    # Finished requests only, in finish order (the artifact's client appends on completion).
    assert tuples[0] == (30, 10, 1.5, 0.25, 1.75, 0.75)
    assert [t[:2] for t in tuples] == [(30, 10), (5, 2), (12, 4)]  # finish times 1.75, 2.2, 2.5
    for t in tuples:
        assert len(t) == 6 and t[2] == pytest.approx(t[4] - t[3])
    # What the artifact's scripts compute from our file equals our own finished-only metrics.
    art = artifact_read(path)
    finished = [r for r in records() if r.finished]
    assert np.mean([a["tpot"] for a in art]) == pytest.approx(summarize(finished)["mean_norm_latency"])
    assert sorted(a["ttft"] for a in art) == pytest.approx(sorted(r.ttft for r in finished))


def test_records_round_trip_including_unfinished_and_breakdown(tmp_path):
    path = tmp_path / "exp-fcfs-alpaca-5-2-client-log"
    write_client_log(path, records())
    back = records_from_client_log(path)
    orig = records()
    assert [r.request_id for r in back] == [0, 1, 2, 3, 4]
    for a, b in zip(back, orig):
        assert (a.prompt_len, a.output_len, a.arrival_time, a.first_token_time, a.finish_time) == \
            (b.prompt_len, b.output_len, float(b.arrival_time), b.first_token_time, b.finish_time)
        assert (a.queued_time, a.swapping_time, a.executing_time, a.num_preemptions, a.rejected_reason) == \
            (b.queued_time, b.swapping_time, b.executing_time, b.num_preemptions, b.rejected_reason)
    s = summarize(back)
    assert (s["num_finished"], s["num_unfinished"], s["num_rejected"]) == (3, 1, 1) and math.isinf(
        s["mean_norm_latency"])


def test_reads_the_artifacts_own_5_and_6_tuple_logs(tmp_path):
    path = tmp_path / "exp-vllm-sharegpt-2-1-client-log"
    path.write_text("Namespace(backend='vllm')\nTotal time: 3.00 s\n"
                    "[(10, 4, 2.0, 1700000000.0, 1700000002.0), (8, 2, 1.0, 1700000001.0, 1700000002.0)]\n"
                    "Average latency: 1.50 s\n")
    recs = records_from_client_log(path)
    assert [r.request_id for r in recs] == [0, 1]
    assert recs[0].normalized_latency == pytest.approx(0.5) and recs[0].ttft == 0.0  # 5-tuple: ttft = 0
    six = tmp_path / "six"
    six.write_text("[(10, 4, 2.0, 5.0, 7.0, 5.5)]\n")
    assert records_from_client_log(six)[0].ttft == pytest.approx(0.5)


def test_all_unfinished_run_writes_an_empty_result_line(tmp_path):
    path = tmp_path / "log"
    write_client_log(path, [RequestRecord(0, 5, 5, 0.0)])
    assert read_client_log(path) == [] and artifact_read(path) == []
    assert len(records_from_client_log(path)) == 1


@pytest.mark.parametrize("content, message", [
    ("hello\n", r"no result line"),
    ("x\n[(1, 2, 3.0, 0.0\n", r":2: cannot parse"),
    ("[(1, 2, 3.0)]\n", r":1: entry 0 must be a tuple of 5 or 6"),
    ("[(1, 0, 3.0, 0.0, 3.0)]\n", r":1: entry 0: prompt_len and output_len"),
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-detail: [(0, 0.0)]\n", r":2: 'jserve-detail:' must hold"),
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-detail: [(0, 0.0, 0.0, 0.0, 0), (1, 0.0, 0.0, 0.0, 0)]\n",
     r"jserve-detail has 2 entries"),
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-unfinished: [(0, 1, 1, 0.0, None, None)]\n", r"ids repeat"),
    ("[(__import__('os'), 2, 3.0, 0.0, 3.0)]\n", r":1: cannot parse"),  # never eval'd
    # Times out of order gave negative or impossible latencies that went straight into the metrics.
    ("[(1, 2, 0.5, 5.0, 1.0, 0.2)]\n", r":1: entry 0: the times must satisfy start_ts <= first_token_ts <= end_ts"),
    ("[(1, 2, 1.0, 5.0, 6.0, 7.0)]\n", r":1: entry 0: the times must satisfy start_ts <= first_token_ts <= end_ts"),
    ("[(1, 2, 1.0, 5.0, 4.0)]\n", r":1: entry 0: the times must satisfy start_ts <= first_token_ts <= end_ts"),
    # Wrong types in the jserve lines escaped as TypeError (and crashed `jserve-eval plot`).
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-detail: [('x', 'a', None, 0.4, 0)]\n",
     r":2: jserve-detail entry 0 must be \(request_id, queued_s, swapping_s, executing_s, num_preemptions\)"),
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-detail: [(0, -1.0, 0.0, 0.4, -3)]\n", r":2: jserve-detail entry 0"),
    ("[(1, 2, 3.0, 0.0, 3.0, 1.0)]\njserve-detail: [(True, 0.0, 0.0, 0.4, 0)]\n", r":2: jserve-detail entry 0"),
    ("[]\njserve-unfinished: [('q', 'a', 20, 0.0, None, None)]\n",
     r":2: jserve-unfinished entry 0 must be \(request_id, prompt_len, output_len, arrival, first_token_or_None, "
     r"reason_or_None\)"),
    ("[]\njserve-unfinished: [(5, 10, 20, 1e999, None, None)]\n", r":2: jserve-unfinished entry 0"),
    ("[]\njserve-unfinished: [(5, 10, 20, 0.0, None, 7)]\n", r":2: jserve-unfinished entry 0"),
    ("[]\njserve-unfinished: [(5, 10, 20, 2.0, 1.0, None)]\n", r":2: jserve-unfinished entry 0"),
])
def test_malformed_logs_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad-client-log"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        records_from_client_log(path)
    assert "bad-client-log" in str(info.value)


def test_write_rejects_what_the_artifact_could_not_read(tmp_path):
    with pytest.raises(ValueError, match="extra_lines\\[0\\]"):
        write_client_log(tmp_path / "a", [], extra_lines=["[(1, 2)]"])
    with pytest.raises(ValueError, match="extra_lines\\[1\\]"):
        write_client_log(tmp_path / "a", [], extra_lines=["ok", "two\nlines"])
    with pytest.raises(ValueError, match="request 7 finished without a first-token time"):
        write_client_log(tmp_path / "a", [RequestRecord(7, 5, 5, 0.0, None, 1.0)])
    with pytest.raises(FileNotFoundError, match="missing-client-log"):
        read_client_log(tmp_path / "missing-client-log")
