"""``jserve-eval``: reproduce the paper's figures, run one simulation, or plot existing logs.

    jserve-eval reproduce [--figures 11,12,...] [--quick] [--backend sim|engine] [--out DIR] [--jobs N] [--seed S]
    jserve-eval run --system NAME --dataset sharegpt|alpaca --rate R --num-requests N --out DIR
                    [--seed S] [--batch-size B] [--dataset-path FILE] [--hardware PRESET] [--cost PROFILE.json]
                    [--backend engine --cost PROFILE.json [--model M] [--max-model-len N] ...]

``--cost PROFILE.json`` (from ``jserve profile``): the device that runs the experiment. With ``--backend engine``
it is the engine's own profile, which the policy predicts with; with the simulator, the simulated device (its
prices, link, pools and limits): the simulator's prediction of the engine backend's run. Either way lengths are
fitted to the device's context and arrival rates scaled from ``--hardware`` (the figure's preset) to the device,
the same load (``eval.engine_backend``). ``--hardware PROFILE.json`` instead simulates the profile at the rates
given.
    jserve-eval plot --logs DIR --out DIR [--figures ...]

``reproduce`` writes ``DIR/logs/<group>/exp-*-client-log`` (artifact format), ``DIR/summary.csv`` (one row per
run), ``DIR/fig<ID>.csv``, ``DIR/fig<ID>.pdf``/``.png`` and ``DIR/report.md``. Bad input (unknown figure,
system, dataset or preset, unreadable or malformed dataset file or cost profile, non-positive rate or count, an
unavailable backend, an ``--out`` that is a file or cannot be created, engine-only options with the simulator;
for ``run``, a workload or scheduler configuration that cannot be built) is reported argparse-style on stderr
with exit status 2, never a traceback. A run that fails inside a ``reproduce`` sweep (a cost profile whose
pools cannot be built for some figure, say) is named on stderr and in the report, and the sweep finishes; the
exit status is then 1.

``run`` writes its log to ``--out`` for the figures' settings and to a sub-folder named by the settings that
differ (``--out/seed-1/``, ``--out/gamma-cv4/``, ...). ``plot`` takes, for each run of a figure, the log of
its name in the figure's log group (``reproduce``'s layout), else the one log of that name anywhere under
``--logs`` whose recorded settings are the figure's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .experiments.figures import FIGURE_ORDER
from .experiments.systems import SYSTEMS
from .runner import BACKENDS

DATASETS = ("sharegpt", "alpaca")


class UsageError(Exception):
    """Bad input discovered after parsing; reported like an argparse error (exit 2)."""


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    return parse


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    return parse


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be >= 0, got {text}")
    return value


def _out_dir(path: Path) -> Path:
    """Create ``--out`` (and parents) or say why not, before any work is done."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument --out: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"argument --out: cannot create directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"argument --out: directory {path} is not writable")
    return path


def _figure_list(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("--figures needs at least one figure id")
    unknown = [i for i in ids if i not in FIGURE_ORDER]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURE_ORDER)}")
    return ids


def _backend(text: str) -> str:
    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"backend {text!r} is not available; choose from {', '.join(BACKENDS)}")
    return text


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--cost`` and the engine backend's model and pool options."""
    p.add_argument("--cost", default=None, help="cost profile JSON (`jserve profile`): with --backend sim the same "
                   "as --hardware PATH; with --backend engine the engine's own profile (policy cost model and the "
                   "device side of the rate scaling)")
    p.add_argument("--model", default=None, help="engine backend: preset (dummy weights), HF directory or .gguf "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=_positive_int("--max-model-len"), default=None,
                   help=f"engine backend: context (default {ENGINE_MAX_MODEL_LEN}); workload lengths are scaled by "
                   "max_model_len/2048 when shorter")
    p.add_argument("--num-device-blocks", type=_positive_int("--num-device-blocks"), default=None,
                   help="engine backend: device KV pool (default: what fits)")
    p.add_argument("--num-host-blocks", type=_positive_int("--num-host-blocks"), default=None,
                   help="engine backend: host KV pool")


ENGINE_ONLY = ("model", "dtype", "max_model_len", "num_device_blocks", "num_host_blocks")
ENGINE_MAX_MODEL_LEN = 512


def _engine_options(args):
    """Validate the engine/cost options; returns EngineOptions for --backend engine, else None."""
    from .engine_backend import EngineOptions

    if args.cost is not None:
        from .costmodels import load_profile

        try:
            load_profile(args.cost)
        except ValueError as exc:
            raise UsageError(f"argument --cost: {exc}") from None
    if args.backend == "sim":
        for name in ENGINE_ONLY:  # the simulator's pools and lengths come from --hardware/--cost
            if getattr(args, name) is not None:
                raise UsageError(f"argument --{name.replace('_', '-')}: only applies with --backend engine")
        return None
    if args.cost is None:
        raise UsageError("argument --cost: --backend engine needs the engine's cost profile (run `jserve profile "
                         "--out P.json` with the same engine settings first)")
    max_model_len = ENGINE_MAX_MODEL_LEN if args.max_model_len is None else args.max_model_len
    return EngineOptions(model=args.model, dtype=args.dtype, profile=str(args.cost), max_model_len=max_model_len,
                         num_device_blocks=args.num_device_blocks, num_host_blocks=args.num_host_blocks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jserve-eval", description="Reproduce the FastServe paper's figures.")
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run the figure sweeps and write logs, CSVs, figures and report.md")
    rep.add_argument("--figures", type=_figure_list, default=None, help=f"comma list from {','.join(FIGURE_ORDER)}")
    rep.add_argument("--quick", action="store_true", help="fewer rates and requests per figure (a smoke run)")
    rep.add_argument("--backend", type=_backend, default="sim")
    rep.add_argument("--out", type=Path, default=Path("results"))
    rep.add_argument("--jobs", type=_positive_int("--jobs"), default=None, help="worker processes (default: CPUs)")
    rep.add_argument("--seed", type=_nonneg_int, default=0)
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_options(rep)

    run = sub.add_parser("run", help="one simulation; writes its artifact-format client log into --out")
    run.add_argument("--system", required=True, help=f"one of {', '.join(SYSTEMS)}")
    run.add_argument("--dataset", required=True, help="sharegpt or alpaca")
    run.add_argument("--rate", required=True, type=_positive_float("--rate"), help="arrival rate, req/s")
    run.add_argument("--num-requests", required=True, type=_positive_int("--num-requests"))
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--seed", type=_nonneg_int, default=0)
    run.add_argument("--batch-size", type=_positive_int("--batch-size"), default=16)
    run.add_argument("--dataset-path", default=None, help="real dataset JSON (default: built-in length profile)")
    run.add_argument("--hardware", default="opt-13b-a100", help="preset name, roofline:<model>:<gpu>, or profile .json")
    run.add_argument("--arrival", default="poisson", choices=("poisson", "gamma", "uniform"))
    run.add_argument("--cv", type=_positive_float("--cv"), default=1.0, help="burstiness for --arrival gamma")
    run.add_argument("--backend", type=_backend, default="sim")
    _add_engine_options(run)

    plot = sub.add_parser("plot", help="figures, CSVs and report.md from existing client logs")
    plot.add_argument("--logs", required=True, type=Path, help="directory of client logs (searched recursively)")
    plot.add_argument("--out", required=True, type=Path)
    plot.add_argument("--figures", type=_figure_list, default=None)
    return parser


def _write_outputs(figs, lookup, out: Path, results, header, *, ours: str) -> list[Path]:
    from .analysis import figure_data
    from .plots import plot_figure
    from .report import build_report, write_figure_csv

    out.mkdir(parents=True, exist_ok=True)
    written, datas = [], []
    for fig in figs:
        fd = figure_data(fig, lookup, **_spec_kwargs(results))
        if not any(m is not None for p in fd.panels for c in p.curves.values() for m in c.metrics):
            continue
        datas.append(fd)
        written += plot_figure(fd, out)
        csv_path = out / f"fig{fig.fig_id}.csv"
        write_figure_csv(fd, csv_path)
        written.append(csv_path)
    report = out / "report.md"
    report.write_text(build_report(datas, results, header_lines=header, ours=ours))
    written.append(report)
    return written


def _spec_kwargs(results) -> dict:
    if results:
        spec = next(iter(results))
        return {"seed": spec.seed}
    return {}


_COST_CAVEAT = (" on the device of cost profile {} (its step prices, link, pools and limits), the prediction of "
                "`--backend engine` there: lengths fitted to its context, rates scaled from each figure's preset "
                "to it (the same load); logs and figures keep the figures' nominal rates")


def cmd_reproduce(args) -> int:
    from .analysis import figure_specs
    from .experiments.figures import get_figures
    from .report import write_csv
    from .runner import result_row, run_sweep

    import dataclasses

    t0 = time.perf_counter()
    args.hardware = None
    engine = _engine_options(args)
    figs = get_figures(args.figures, quick=args.quick)

    def on_backend(spec):  # the same experiment on the profiled device: the real engine, or its simulation
        if engine is not None:
            return dataclasses.replace(spec, backend="engine", engine=engine)
        if args.cost is not None:
            return dataclasses.replace(spec, device=str(args.cost))
        return spec

    specs = [on_backend(s) for f in figs for s in figure_specs(f, seed=args.seed)]
    out: Path = _out_dir(args.out)
    _out_dir(out / "logs")
    unique = len(dict.fromkeys(specs))
    jobs = max(1, min(args.jobs or os.cpu_count() or 1, unique))  # the sweep starts at most one process per run
    if engine is not None:
        jobs = 1
    print(f"jserve-eval: {len(figs)} figures, {unique} runs ({args.backend}) on {jobs} processes -> {out}", file=sys.stderr)
    results = run_sweep(specs, out / "logs", jobs=jobs, progress=not args.no_progress)
    sweep_s = time.perf_counter() - t0
    write_csv((result_row(r) for r in results.values()), out / "summary.csv")
    header = [
        f"Command: `jserve-eval reproduce{' --quick' if args.quick else ''} --figures "
        f"{','.join(f.fig_id for f in figs)} --seed {args.seed} --backend {args.backend}"
        f"{f' --cost {args.cost}' if args.cost else ''}`",
        (f"Backend: simulator{_COST_CAVEAT.format(args.cost) if args.cost else ''}." if engine is None else
         f"Backend: the real engine ({engine.model or 'SmolLM2-135M'}, profile {args.cost}); rates scaled to the "
         "device (docs/eval.md).") + f" {unique} runs on {jobs} processes; sweep wall time {sweep_s:.0f} s.",
        "Quick mode: fewer rates and capped request counts - a smoke run, not a measurement." if args.quick else
        "Full mode: the artifact's rates and request counts.",
    ]
    # the figures, the report and its run facts look runs up by the figures' own specs
    by_figure_spec = {s: results[m] for f in figs for s in figure_specs(f, seed=args.seed)
                      if (m := on_backend(s)) in results}
    lookup = lambda spec: by_figure_spec[spec].metrics if spec in by_figure_spec else None  # noqa: E731
    _write_outputs(figs, lookup, out, by_figure_spec, header, ours=f"ours ({args.backend})")
    failed = sum(1 for r in results.values() if not r.ok)
    total_s = time.perf_counter() - t0
    print(f"jserve-eval: done in {total_s:.0f} s; {failed} of {unique} runs failed; report: {out / 'report.md'}",
          file=sys.stderr)
    return 1 if failed else 0


def cmd_run(args) -> int:
    from .costmodels import resolve_preset
    from .experiments.systems import get_system
    from .runner import RunSpec, execute_run

    if args.system not in SYSTEMS:
        raise UsageError(f"argument --system: unknown system {args.system!r}; choose one of {', '.join(SYSTEMS)}")
    if args.dataset not in DATASETS:
        raise UsageError(f"argument --dataset: unknown dataset {args.dataset!r}; choose sharegpt or alpaca")
    if args.cv != 1.0 and args.arrival != "gamma":
        raise UsageError("argument --cv: only applies with --arrival gamma")
    engine = _engine_options(args)
    try:
        preset = resolve_preset(args.hardware)
    except ValueError as exc:
        raise UsageError(f"argument --hardware: {exc}") from None
    if engine is None:  # the simulator's scheduler configuration, built now so that it cannot fail the run
        from .costmodels import load_profile
        from .experiments.systems import device_scheduler_config, scheduler_config

        try:
            scheduler_config(get_system(args.system), preset, args.dataset, batch_size=args.batch_size)
            if args.cost is not None:
                device_scheduler_config(get_system(args.system), load_profile(args.cost), args.dataset,
                                        batch_size=args.batch_size)
        except ValueError as exc:
            raise UsageError(f"the scheduler configuration (--hardware/--cost, --batch-size): {exc}") from None
    spec = RunSpec(
        system=get_system(args.system),
        dataset=args.dataset,
        num_requests=args.num_requests,
        rate=args.rate,
        batch_size=args.batch_size,
        preset=args.hardware,
        arrival=args.arrival,
        cv=args.cv,
        seed=args.seed,
        dataset_path=str(args.dataset_path) if args.dataset_path else None,
        log_group=_run_log_group(args),
        log_batch_size=args.batch_size != 16,
        backend=args.backend,
        engine=engine,
        device=str(args.cost) if args.cost is not None and engine is None else None,
    )
    try:
        spec.log_name()
    except ValueError as exc:
        raise UsageError(f"argument --rate: {exc}") from None
    _check_workload(spec)
    res = execute_run(spec, _out_dir(args.out))
    if not res.ok:
        print(f"jserve-eval run: the {'simulation' if args.backend == 'sim' else 'engine run'} failed: {res.error}",
              file=sys.stderr)
        return 1
    m = res.metrics
    shown = {k: m[k] for k in ("num_finished", "num_unfinished", "num_rejected", "mean_norm_latency",
                               "p95_norm_latency", "mean_ttft", "mean_tpot", "throughput_rps", "stop_reason")
             if k in m}
    # inf and nan as strings: json.dumps would write Infinity/NaN, which strict JSON readers refuse.
    shown = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in shown.items()}
    print(json.dumps({"log": res.log_path, "wall_seconds": round(res.wall_seconds, 3), **shown}, indent=2))
    return 0


def _run_log_group(args) -> str:
    """Where ``run`` writes its log under ``--out``: ``.`` for the figures' settings, else a sub-folder named by
    every setting that differs from them (``seed-1``, ``gamma-cv4``, ``hw-opt-66b-4xa100``, ``cost-P``,
    ``data-sg``, ``engine-M``), so that runs differing only there keep their own logs instead of overwriting one."""
    import re

    parts = []
    if args.backend != "sim":
        parts.append(args.backend + (f"-{Path(args.model).stem}" if args.model else ""))
    if args.hardware != "opt-13b-a100":
        parts.append(f"hw-{Path(args.hardware).stem if args.hardware.endswith('.json') else args.hardware}")
    if args.cost is not None:
        parts.append(f"cost-{Path(args.cost).stem}")
    if args.arrival != "poisson":
        parts.append(args.arrival + (f"-cv{args.cv:g}" if args.arrival == "gamma" else ""))
    if args.dataset_path:
        parts.append(f"data-{Path(args.dataset_path).stem}")
    if args.seed != 0:
        parts.append(f"seed-{args.seed}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "_".join(parts))[:200] or "."


def _check_workload(spec) -> None:
    """Make the workload up front (cheap; a dataset file is tokenized once and cached) so that a bad dataset file
    or arrival setting is a usage error, not a failed run."""
    from .workloads import make_workload
    from .workloads.generate import dataset_pool

    try:
        wspec = spec.workload_spec()
        if spec.dataset_path is not None:
            dataset_pool(wspec)
    except (OSError, ValueError) as exc:
        raise UsageError(f"argument --dataset-path: {exc}") from None
    try:
        make_workload(wspec, spec.seed)
    except (OSError, ValueError) as exc:
        raise UsageError(f"the workload: {exc}") from None


def cmd_plot(args) -> int:
    from .artifact_log import parse_log_filename, read_run_header, records_from_client_log
    from .experiments.figures import get_figures
    from .runner import run_metrics

    root: Path = args.logs
    if not root.is_dir():
        raise UsageError(f"argument --logs: {root} is not a directory")
    by_name: dict[tuple, list[tuple[str, Path]]] = {}  # the name's fields -> (group, path) of every such log
    for path in sorted(root.rglob("*-client-log")):
        try:
            name = parse_log_filename(path.name)
        except ValueError:
            continue
        group = path.parent.relative_to(root).as_posix()
        by_name.setdefault((name.system, name.dataset, name.num_requests, round(name.rate, 9), name.batch_size),
                           []).append((group, path))
    num_logs = sum(len(v) for v in by_name.values())
    if not num_logs:
        raise UsageError(f"argument --logs: no exp-*-client-log files under {root}")
    cache: dict[Path, dict | None] = {}
    headers: dict[Path, dict | None] = {}
    ambiguous: set[tuple] = set()

    def read(path: Path, what):
        try:
            return what(path)
        except (OSError, ValueError) as exc:  # unreadable or malformed: skip it, as the artifact's scripts do
            print(f"jserve-eval plot: skipping {path}: {exc}", file=sys.stderr)
            return None

    def agrees(path: Path, spec) -> bool:
        """A log whose jserve-run header states other settings than ``spec``'s is another experiment (a log
        without one, such as the artifact's, is taken on its name)."""
        if path not in headers:
            headers[path] = read(path, read_run_header) or {}
        header = headers[path]
        want = {"policy": spec.system.policy, "config_preset": spec.system.config_preset, "arrival": spec.arrival,
                "cv": spec.cv, "io_ratio_scale": spec.io_ratio_scale, "hardware": spec.preset, "seed": spec.seed,
                "batch_size": spec.batch_size, "dataset_path": spec.dataset_path, "device": spec.device}
        return all(header[k] == v for k, v in want.items() if k in header)

    def find(spec) -> Path | None:
        """The log of ``spec``: the one of its name in the spec's own log group (``reproduce``'s layout, also
        below ``--logs``), else the one of its name anywhere whose recorded settings are the spec's."""
        key = (spec.system.label, spec.dataset, spec.num_requests, round(spec.rate, 9),
               spec.batch_size if spec.log_batch_size else None)
        found = by_name.get(key, [])
        own = [p for g, p in found if g == spec.log_group or g.endswith("/" + spec.log_group)]
        if len(own) == 1:
            return own[0]
        matching = [p for p in (own or [p for _, p in found]) if agrees(p, spec)]
        if len(matching) > 1 and key not in ambiguous:
            ambiguous.add(key)
            print(f"jserve-eval plot: {len(matching)} logs could be {spec.describe()} "
                  f"({', '.join(str(p.relative_to(root)) for p in matching[:3])}); none is used", file=sys.stderr)
        return matching[0] if len(matching) == 1 else None

    def lookup(spec):
        path = find(spec)
        if path is None:
            return None
        if path not in cache:
            cache[path] = read(path, lambda p: run_metrics(records_from_client_log(p)))
        return cache[path]

    figs = []
    for full, quick in zip(get_figures(args.figures), get_figures(args.figures, quick=True)):
        figs.append(full if _num_found(full, lookup) >= _num_found(quick, lookup) else quick)
    read_ok = sum(1 for m in cache.values() if m is not None)
    if not read_ok:
        raise UsageError(f"argument --logs: none of the {num_logs} client logs under {root} is a readable run of "
                         f"the figures' experiments (plot reads the logs of `reproduce`, or of `run` with a "
                         f"figure's system, dataset, request count, rate and settings)")
    header = [f"Plotted from the client logs under `{root}` ({num_logs} logs found, {read_ok} used)."]
    written = _write_outputs(figs, lookup, _out_dir(args.out), None, header, ours="ours")
    skipped = len(cache) - read_ok
    print(f"jserve-eval plot: {read_ok} of {num_logs} logs used"
          + (f", {skipped} skipped as unreadable" if skipped else "")
          + f"; wrote {len(written)} files to {args.out}", file=sys.stderr)
    return 0


def _num_found(fig, lookup) -> int:
    """How many of ``fig``'s runs have a readable log (picks the full or the quick variant of a figure)."""
    from .analysis import figure_specs

    return sum(1 for s in figure_specs(fig) if lookup(s) is not None)


COMMANDS = {"reproduce": cmd_reproduce, "run": cmd_run, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
