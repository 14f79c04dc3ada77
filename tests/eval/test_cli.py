"""``jserve-eval``: bad input gives argparse-style errors (exit 2, no traceback); ``run``, ``reproduce`` and
``plot`` work end to end."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from eval.artifact_log import read_client_log
from eval.cli import main


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_a_usage_error(capsys, tmp_path):
    out = str(tmp_path / "o")
    _fails(capsys, ["reproduce", "--figures", "11,99", "--out", out], "unknown figure 99")
    _fails(capsys, ["reproduce", "--backend", "gpu", "--out", out], "backend 'gpu' is not available")
    _fails(capsys, ["reproduce", "--backend", "engine", "--out", out], "--backend engine needs the engine's cost profile")
    base = ["run", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "5", "--out", out]
    _fails(capsys, ["run", "--system", "orca"] + base[1:], "unknown system 'orca'")
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "lmsys", "--rate", "1", "--num-requests", "5",
                    "--out", out], "unknown dataset 'lmsys'")
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "0", "--num-requests", "5",
                    "--out", out], "--rate must be > 0")
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "-2", "--num-requests", "5",
                    "--out", out], "--rate must be > 0")
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "abc", "--num-requests", "5",
                    "--out", out], "--rate must be a number")
    _fails(capsys, ["run", "--system", "fcfs", "--num-requests", "0"] + base[1:5] + ["--out", out],
           "--num-requests must be > 0")
    _fails(capsys, ["run", "--system", "fcfs", "--hardware", "tpu-v9"] + base[1:], "unknown hardware preset")
    _fails(capsys, ["plot", "--logs", str(tmp_path / "none"), "--out", out], "is not a directory")


def test_bad_dataset_files_are_usage_errors(capsys, tmp_path):
    argv = ["run", "--system", "fcfs", "--dataset", "alpaca", "--rate", "1", "--num-requests", "3",
            "--out", str(tmp_path / "o"), "--dataset-path"]
    missing = tmp_path / "missing.json"
    _fails(capsys, argv + [str(missing)], "--dataset-path", "missing.json")
    bad = tmp_path / "broken.json"
    bad.write_text("[{\"instruction\": ")
    _fails(capsys, argv + [str(bad)], "--dataset-path", "broken.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"not": "a list"}))
    _fails(capsys, argv + [str(wrong)], "wrong.json")
    _fails(capsys, argv + [str(tmp_path)], "--dataset-path", f"{tmp_path} is a directory")  # said 'does not exist'


def test_a_workload_that_cannot_be_made_is_a_usage_error(capsys, tmp_path):
    """--cv 1e200 overflows the gamma gaps: the run used to start and fail with exit 1 ("the simulation failed")."""
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "3",
                    "--arrival", "gamma", "--cv", "1e200", "--out", str(tmp_path)],
           "the workload:", "non-finite arrival times from the gamma process")
    assert list(tmp_path.iterdir()) == []


def test_run_writes_an_artifact_log(capsys, tmp_path):
    code = main(["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "2", "--num-requests", "30",
                 "--out", str(tmp_path), "--seed", "3"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    log = tmp_path / "seed-3" / "exp-fcfs-sharegpt-30-2-client-log"  # a non-default seed gets its own folder
    assert shown["log"] == str(log) and shown["num_finished"] == 30
    rows = read_client_log(log)
    assert len(rows) == 30
    prompt, output, latency, start, end, first = rows[0]
    assert end - start == pytest.approx(latency) and start <= first <= end
    assert shown["mean_norm_latency"] == pytest.approx(sum((r[4] - r[3]) / r[1] for r in rows) / 30)


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.cli", "run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "0",
         "--num-requests", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--rate must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_reproduce_and_plot_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["reproduce", "--figures", "12", "--quick", "--out", str(out), "--jobs", "2", "--no-progress"])
    for name in ("fig12.pdf", "fig12.png", "fig12.csv", "summary.csv", "report.md"):
        assert (out / name).is_file(), name
    summary = _csv(out / "summary.csv")
    failed = [r for r in summary if r["error"]]
    assert code == (1 if failed else 0)
    ok = [r for r in summary if not r["error"]]
    assert ok, "no run succeeded"
    logs = sorted((out / "logs" / "opt-13b").glob("exp-*-sharegpt-*-client-log"))
    assert len(logs) == len(ok)
    assert sorted(r["log"] for r in ok) == [str(p) for p in logs]
    report = (out / "report.md").read_text()
    assert "## Fig 12" in report and "| FastServe-FCFS |" in report

    # plot: the same figure from the logs alone, same numbers.
    again = tmp_path / "again"
    assert main(["plot", "--logs", str(out / "logs"), "--out", str(again)]) == 0
    assert (again / "fig12.png").is_file() and (again / "report.md").is_file()
    first = {(r["system"], r["x"]): r for r in _csv(out / "fig12.csv")}
    second = {(r["system"], r["x"]): r for r in _csv(again / "fig12.csv")}
    assert first.keys() == second.keys()
    for key, row in first.items():
        if row["ok"] == "True":
            for col in ("mean_norm_latency", "p95_norm_latency", "mean_ttft"):
                assert float(second[key][col]) == pytest.approx(float(row[col]), rel=1e-9), (key, col)


def test_plot_skips_unreadable_logs_with_a_message(capsys, tmp_path):
    """A dangling link or a directory named like a log used to crash ``plot`` with a FileNotFoundError traceback,
    and a log with a malformed jserve-detail line with a TypeError; each is now skipped, named on stderr."""
    group = tmp_path / "logs" / "opt-13b"
    group.mkdir(parents=True)
    (group / "exp-fastserve-sharegpt-200-4-client-log").write_text("[(10, 5, 0.5, 0.0, 0.5, 0.1)]\n")
    (group / "exp-fcfs-sharegpt-200-4-client-log").symlink_to(tmp_path / "gone")
    (group / "exp-vllm-sharegpt-200-4-client-log").mkdir()
    (group / "exp-static-sharegpt-200-4-client-log").write_text(
        "[(10, 5, 0.5, 0.0, 0.5, 0.1)]\njserve-detail: [('x', 'a', None, 0.4, 0)]\n")
    out = tmp_path / "plots"
    assert main(["plot", "--logs", str(tmp_path / "logs"), "--out", str(out), "--figures", "11"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in ("exp-fcfs-sharegpt-200-4-client-log", "exp-vllm-sharegpt-200-4-client-log",
                 "exp-static-sharegpt-200-4-client-log"):
        assert f"skipping {group / name}" in err, (name, err)
    assert "exp-fastserve-sharegpt-200-4-client-log" not in err
    rows = [r for r in _csv(out / "fig11.csv") if r["ok"] == "True"]
    assert [(r["system"], float(r["x"]), float(r["mean_norm_latency"])) for r in rows] == [("fastserve", 4.0, 0.1)]


def test_run_keeps_other_settings_apart_and_plot_reads_run_logs(capsys, tmp_path):
    """``run`` wrote every run to ``--out/<name>``, so a second seed or arrival process overwrote the first, and
    ``plot`` found only logs in ``reproduce``'s folders (``0 logs read``, exit 0). Now runs with other settings
    get their own sub-folder, and ``plot`` takes a log of a figure's name from anywhere under ``--logs`` when its
    recorded settings are the figure's."""
    from eval.analysis import figure_specs
    from eval.experiments.figures import get_figures

    spec = next(s for s in figure_specs(get_figures(["11"], quick=True)[0])
                if s.system.label == "fastserve" and s.dataset == "sharegpt")
    logs = tmp_path / "logs"
    base = ["run", "--system", "fastserve", "--dataset", "sharegpt", "--num-requests", str(spec.num_requests),
            "--rate", f"{spec.rate:g}", "--out", str(logs)]
    latency = {}
    for extra in ([], ["--seed", "1"], ["--arrival", "gamma", "--cv", "4"]):
        assert main(base + extra) == 0
        latency[tuple(extra)] = json.loads(capsys.readouterr().out)["mean_norm_latency"]
    assert len(set(latency.values())) == 3
    name = f"exp-fastserve-sharegpt-{spec.num_requests}-{spec.rate:g}-client-log"
    assert sorted(p.relative_to(logs).as_posix() for p in logs.rglob("*-client-log")) == [
        name, f"gamma-cv4/{name}", f"seed-1/{name}"]

    assert main(["plot", "--logs", str(logs), "--out", str(tmp_path / "p"), "--figures", "11"]) == 0
    assert "1 of 3 logs used" in capsys.readouterr().err
    rows = [r for r in _csv(tmp_path / "p" / "fig11.csv") if r["ok"] == "True"]
    assert [(r["system"], float(r["x"]), float(r["mean_norm_latency"])) for r in rows] == [
        ("fastserve", spec.rate, pytest.approx(latency[()], rel=1e-9))]

    # the same run in two places is ambiguous: named on stderr, not used; nothing else matches: a usage error
    (logs / "copy").mkdir()
    (logs / "copy" / name).write_text((logs / name).read_text())
    _fails(capsys, ["plot", "--logs", str(logs), "--out", str(tmp_path / "q"), "--figures", "11"],
           "2 logs could be fastserve sharegpt", "none of the 4 client logs")
    assert not (tmp_path / "q").exists()


def test_out_must_be_a_writable_directory(capsys, tmp_path):
    """``--out`` naming a file: ``reproduce`` crashed with a FileExistsError traceback and ``run`` simulated first
    and then failed with exit 1; both are usage errors now, before any work."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "3"]
    _fails(capsys, run + ["--out", str(afile)], f"argument --out: {afile} exists and is not a directory")
    _fails(capsys, run + ["--out", str(afile / "sub")], "argument --out: cannot create", str(afile / "sub"))
    _fails(capsys, ["reproduce", "--figures", "12", "--quick", "--out", str(afile)],
           f"argument --out: {afile} exists and is not a directory")
    blocked = tmp_path / "res"
    blocked.mkdir()
    (blocked / "logs").write_text("x")  # every run failed on it, after simulating
    _fails(capsys, ["reproduce", "--figures", "12", "--quick", "--out", str(blocked)],
           f"argument --out: {blocked / 'logs'} exists and is not a directory")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "exp-fcfs-sharegpt-200-4-client-log").write_text("[(10, 5, 0.5, 0.0, 0.5, 0.1)]\n")
    _fails(capsys, ["plot", "--logs", str(logs), "--out", str(afile)],
           f"argument --out: {afile} exists and is not a directory")
    assert afile.read_text() == "x"


def test_a_rate_whose_log_name_is_too_long_is_a_usage_error(capsys, tmp_path):
    """--rate 1e300 prints as 301 digits: the run used to simulate and then fail on 'File name too long'."""
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1e300", "--num-requests", "3",
                    "--out", str(tmp_path)], "argument --rate:", "255")
    assert list(tmp_path.iterdir()) == []


def test_run_reports_rejections_in_strict_json(capsys, tmp_path):
    """A pool of one block rejects every request: the summary said 0 finished and 0 unfinished (the rejected
    count was not shown) and printed NaN/Infinity, which strict JSON readers refuse."""
    from eval.costmodels import resolve_preset
    from eval.costmodels.profile import profile_dict

    profile = profile_dict(resolve_preset("opt-13b-a100"))
    profile.pop("model"), profile.pop("device")
    profile["num_device_blocks"] = 1
    path = tmp_path / "one-block.json"
    path.write_text(json.dumps(profile))
    code = main(["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "4",
                 "--out", str(tmp_path / "o"), "--hardware", str(path)])
    assert code == 0

    def strict(constant):
        raise AssertionError(f"non-JSON constant {constant}")

    shown = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert (shown["num_finished"], shown["num_unfinished"], shown["num_rejected"]) == (0, 0, 4)
    assert shown["mean_norm_latency"] == "inf" and shown["throughput_rps"] == "nan"


@pytest.mark.parametrize("option, value", [("--num-device-blocks", "5"), ("--num-host-blocks", "5"),
                                           ("--max-model-len", "256"), ("--model", "tiny"), ("--dtype", "float32")])
def test_engine_only_options_are_refused_for_the_simulator(capsys, tmp_path, option, value):
    """``run --num-device-blocks 5`` (default backend sim) used to run with the preset's pool, silently ignoring
    the option; a researcher would believe the pool was 5 blocks."""
    _fails(capsys, ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "3",
                    "--out", str(tmp_path), option, value], f"argument {option}: only applies with --backend engine")
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_configuration_that_cannot_be_built_is_a_usage_error(capsys, tmp_path):
    """--batch-size 4096 (over the 2048-token budget) and a profile whose model leaves no KV room used to start the
    run and fail with exit 1; the configuration is now built before the run."""
    run = ["run", "--system", "fcfs", "--dataset", "sharegpt", "--rate", "1", "--num-requests", "3",
           "--out", str(tmp_path / "o")]
    _fails(capsys, run + ["--batch-size", "4096"], "max_tokens_per_batch (2048) must be >= max_batch_size (4096)")
    from eval.costmodels import resolve_preset
    from eval.costmodels.profile import profile_dict

    profile = profile_dict(resolve_preset("opt-13b-a100"))
    profile["block_size"] = 100_000  # one block of OPT-13B KV is then far larger than the GPU
    path = tmp_path / "huge-blocks.json"
    path.write_text(json.dumps(profile))
    _fails(capsys, run + ["--cost", str(path)], "hold no block of 100000 tokens")
    assert not (tmp_path / "o").exists()


def test_reproduce_reports_the_processes_it_actually_uses(capsys, tmp_path, monkeypatch):
    """--jobs 64 on 24 runs said 'on 64 processes' (and report.md too); the sweep only ever starts one per run."""
    import eval.runner

    seen = {}

    def fake_sweep(specs, logs_root, *, jobs, progress):
        seen["jobs"] = jobs
        return {}

    monkeypatch.setattr(eval.runner, "run_sweep", fake_sweep)
    assert main(["reproduce", "--figures", "12", "--quick", "--jobs", "64", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "24 runs (sim) on 24 processes" in err and seen["jobs"] == 24
    assert "24 runs on 24 processes" in (tmp_path / "report.md").read_text()


def test_a_failed_run_in_a_sweep_is_named_on_stderr_without_the_progress_bar(capsys):
    """Failed runs were written only through the tqdm bar, so ``--no-progress`` left just a count on stderr."""
    from eval.experiments.systems import get_system
    from eval.runner import RunSpec, run_sweep

    good = RunSpec(get_system("fcfs"), "sharegpt", 5, 1.0)
    bad = RunSpec(get_system("fcfs"), "sharegpt", 5, 1.0, batch_size=4096)  # over the 2048-token batch budget
    results = run_sweep([good, bad], None, jobs=1, progress=False)
    assert results[good].ok and not results[bad].ok
    err = capsys.readouterr().err
    assert f"FAILED {bad.describe()}: " in err and "max_tokens_per_batch" in err
    assert err.count("FAILED ") == 1


def test_reproduce_with_a_cost_profile_keeps_run_facts_and_states_the_profile(tmp_path, capsys):
    """With --cost, the report looked runs up by the figures' specs while the sweep had keyed them by the specs
    on the profile, so every "Run facts" block vanished, and the Command line left --cost out."""
    from eval.costmodels import resolve_preset
    from eval.costmodels.profile import profile_dict

    profile = tmp_path / "P.json"
    profile.write_text(json.dumps(profile_dict(resolve_preset("opt-13b-a100"))))
    out = tmp_path / "r"
    assert main(["reproduce", "--quick", "--figures", "17", "--cost", str(profile), "--out", str(out),
                 "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert f"--backend sim --cost {profile}`" in report
    facts = report[report.index("Run facts:"):]
    runs = sum(int(n) for n in re.findall(r"^- [\w-]+: (\d+) runs,", facts, flags=re.M))
    assert runs == len(_csv(out / "summary.csv")) > 0
    assert "| system | ours (sim) |" in report
