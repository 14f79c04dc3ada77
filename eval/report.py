"""CSV summaries and ``report.md``: our capacities and capacity ratios beside the paper's and the artifact's.

``figure_rows`` / ``write_figure_csv`` flatten a figure's curves (one row per panel, system and point, with
every metric). ``build_report`` writes the Markdown report: per figure, each system's capacity at the SLO the
paper used, FastServe's capacity ratio to each baseline (ours vs paper vs artifact), observations computed
from the runs (preemptions, swap traffic, unfinished requests), and the reasons we know of for differences.
Nothing here tunes anything: the numbers are what the runs gave.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

from .analysis import FigureData, PanelData, capacities, fmt_capacity, ratio, ratio_text
from .experiments.paper import load_paper_numbers, paper_breakdown, paper_capacities
from .runner import RunResult

METRIC_COLUMNS = (
    "mean_norm_latency",
    "p95_norm_latency",
    "p99_norm_latency",
    "mean_ttft",
    "mean_tpot",
    "slo_1.55_0.15",
    "slo_3.1_0.3",
    "slo_6.2_0.6",
    "breakdown_queuing",
    "breakdown_swapping",
    "breakdown_execution",
    "num_finished",
    "num_unfinished",
    "num_rejected",
    "num_preemptions",
)

REASONS = """\
Known reasons our numbers differ from the paper's (as best we can tell; nothing was tuned to match):

1. **One engine for every system.** The simulator runs every policy on the same iteration-cost model
   (DistServe's OPT-13B/A100 fit by default). In the paper, vLLM runs on the vLLM engine, whose own fit
   (DESIGN.md section 6) is about 18% slower per decode iteration and 38% per prefill token than the
   DistServe fit, and FasterTransformer on its own kernels. Our ratios therefore isolate scheduling and
   KV management; the paper's include engine differences.
2. **Cost model, not a GPU.** Iteration times come from a linear fit; real steps have launch jitter, Python
   scheduling overhead (the FastServe prototype schedules in Python on every iteration) and copy/compute
   interference that the fit does not see. Copies overlap compute perfectly here when they fit under it.
3. **Request lengths.** Our ShareGPT/Alpaca lengths come from the built-in profiles (eval/data, derived
   from real samples with the SmolLM2 tokenizer; see docs/workloads.md), not the full datasets tokenized
   with OPT's tokenizer, so the length distributions (and the load a given rate means) differ somewhat.
4. **Finite traces.** Each point has the artifact's request count (at most a few hundred for OPT-13B); past
   saturation the mean latency of a finite trace stops growing, so capacities at high rates depend on the
   count (DESIGN.md section 8). Same counts as the artifact, but our capacities inherit this.
5. **KV pool sizes.** We size pools from memory as each server does (FastServe: 1% headroom, 925 OPT-13B
   blocks; vLLM: profiled activations, estimated at 894 blocks); the artifact's real GPU may report
   slightly different memory.
6. **Policies are our reimplementations** (schedulers/), following the paper and the artifact where they
   differ as documented in docs/schedulers.md; the FasterTransformer baseline is our request-level batching
   policy, whereas the artifact's Fig 11 hard-codes measured FasterTransformer numbers.
7. **Ideal preemption.** Our FastServe pays no per-iteration scheduling cost and its proactive copies hide
   completely behind compute whenever they fit, so preemption is nearly free. Combined with finite traces,
   its mean-latency curve on ShareGPT can stay under 0.3 s/token over the artifact's whole rate range
   ("above range"; the ratio is then a lower bound). The hazards figure's 2000-requests-per-rate panel (full mode)
   shows the same systems on longer traces, where capacities are lower and the ratios smaller.
8. **Load at a given rate.** Because of 3 and 7, a given arrival rate loads our systems less than the
   artifact's GPU, so Fig 17's breakdown at the paper's rates (0.5..3 req/s) shows less queuing than the
   paper's, and Fig 14's large-batch curves may not reach the SLO within the artifact's rates.
9. **Chunked prefill at a 2048-token budget.** With batch size 16 and prompts of at most 1024 tokens, a step
   almost never has more new prompt tokens than the budget, so `cp` rarely chunks; without preemption (which
   neither system needs at batch 16) its schedule is then FastServe-FCFS's, and the two curves coincide in
   Fig 18. The artifact's vLLM-CP differs from its FCFS through vLLM's engine (reason 1), and the paper's
   Fig 18 uses a faster setting where chunking matters more.
"""


def figure_rows(fd: FigureData) -> list[dict]:
    rows = []
    for pdata in fd.panels:
        for label, curve in pdata.curves.items():
            for x, n, m in zip(curve.xs, curve.num_requests, curve.metrics):
                row = {"figure": fd.fig.fig_id, "panel": pdata.panel.key, "system": label, "x": x, "num_requests": n}
                row.update({k: (m or {}).get(k, "") for k in METRIC_COLUMNS})
                row["ok"] = m is not None
                rows.append(row)
    return rows


def write_csv(rows: Iterable[dict], path: str | Path) -> None:
    rows = list(rows)
    if not rows:
        Path(path).write_text("")
        return
    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def write_figure_csv(fd: FigureData, path: str | Path) -> None:
    write_csv(figure_rows(fd), path)


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _capacity_table(fd: FigureData, pdata: PanelData, ours_label: str) -> list[str]:
    panel = pdata.panel
    paper = paper_capacities(fd.fig.fig_id, panel.key)
    slo = paper.get("slo") if paper else panel.slo
    if slo is None:
        slo = panel.slo
    ours = capacities(pdata, slo=slo)
    attain = panel.metric.startswith("slo_")
    what = "rate where attainment falls below 95%" if attain else f"capacity at {slo:g} s/token ({panel.metric})"
    lines = [f"**{panel.title}** - {what}, req/s:", ""]
    sources = (paper or {}).get("sources", {})
    header = ["system", ours_label] + list(sources)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, curve in pdata.curves.items():
        row = [curve.display, fmt_capacity(ours.get(label), curve)]
        row += [_num((src or {}).get(label)) for src in sources.values()]
        lines.append("| " + " | ".join(row) + " |")
    if paper and paper.get("note"):
        lines += ["", f"Paper note: {paper['note']}"]
    # FastServe's ratio to each baseline.
    main = next((k for k in ("fastserve", "fastserve-proactive") if k in pdata.curves), None)
    if main is not None:
        ratio_rows = []
        for label, curve in pdata.curves.items():
            if label == main:
                continue
            r_ours = ratio_text(ours.get(main), pdata.curves[main], ours.get(label), curve)
            r_src = [ratio((src or {}).get(main), (src or {}).get(label)) for src in sources.values()]
            ratio_rows.append([f"{pdata.curves[main].display} / {curve.display}", r_ours] + [_num(r) for r in r_src])
        if ratio_rows:
            lines += ["", "| " + " | ".join(["capacity ratio", ours_label, *sources]) + " |",
                      "|" + "---|" * (2 + len(sources))]
            lines += ["| " + " | ".join(r) + " |" for r in ratio_rows]
    lines.append("")
    return lines


def _ratio_table(pdata: PanelData) -> list[str]:
    curves = pdata.curves
    first = next(iter(curves.values()))
    lines = ["Mean normalized latency (s/token) by input/output ratio scale:", ""]
    lines.append("| system | " + " | ".join(f"x{x:g}" for x in first.xs) + " |")
    lines.append("|" + "---|" * (1 + len(first.xs)))
    for curve in curves.values():
        lines.append(f"| {curve.display} | " + " | ".join(_num(v) for v in curve.values(pdata.panel.metric)) + " |")
    return lines + [""]


def _breakdown_table(fd: FigureData) -> list[str]:
    curve = fd.panels[0].curves.get("fastserve")
    paper = {row[0]: row[1:] for row in paper_breakdown()["rows"]}
    lines = ["Proactive (FastServe) time breakdown, % of request time (queuing / swapping / execution):", "",
             "| rate | ours | paper |", "|---|---|---|"]
    for rate in fd.fig.breakdown_rates:
        ours = "-"
        if curve is not None and rate in curve.xs:
            m = curve.metrics[curve.xs.index(rate)]
            if m is not None:
                ours = " / ".join(f"{100 * m.get(f'breakdown_{k}', math.nan):.1f}" for k in ("queuing", "swapping", "execution"))
        p = paper.get(rate)
        lines.append(f"| {rate:g} | {ours} | {' / '.join(f'{v:.1f}' for v in p) if p else '-'} |")
    return lines + [""]


def _burstiness_table(fd: FigureData) -> list[str]:
    systems = list(fd.panels[0].curves)
    lines = ["Capacity at 0.3 s/token (req/s) by arrival CV:", "",
             "| CV | " + " | ".join(fd.panels[0].curves[s].display for s in systems) + " |",
             "|" + "---|" * (1 + len(systems))]
    for pdata in fd.panels:
        caps = capacities(pdata)
        lines.append(f"| {pdata.panel.points[0].cv:g} | "
                     + " | ".join(fmt_capacity(caps.get(s), pdata.curves[s]) for s in systems) + " |")
    return lines + [""]


def _observations(fd: FigureData, results: dict | None) -> list[str]:
    """Facts about the runs behind a figure: preemptions, swap traffic, unfinished requests."""
    if not results:
        return []
    by_system: dict[str, list[RunResult]] = {}
    from .analysis import panel_specs

    for pdata in fd.panels:
        for label, _, spec in panel_specs(pdata.panel, seed=_seed_of(results)):
            res = results.get(spec)
            if res is not None and res.ok:
                by_system.setdefault(label, []).append(res)
    lines = []
    for label, runs in by_system.items():
        pre = sum(r.metrics.get("num_preemptions", 0) for r in runs)
        gb_out = sum(r.stats.get("bytes_out", 0) for r in runs) / 1e9
        drops = sum(r.stats.get("drops", 0) for r in runs)
        unfinished = sum(r.metrics.get("num_unfinished", 0) for r in runs)
        swap_share = [r.metrics.get("breakdown_swap_share_of_latency") for r in runs]
        swap_share = [s for s in swap_share if s is not None and math.isfinite(s)]
        lines.append(
            f"- {label}: {len(runs)} runs, {pre} preemptions, {drops} KV drops, {gb_out:.1f} GB offloaded, "
            f"max swap share of latency {100 * max(swap_share, default=0):.1f}%, {unfinished} unfinished requests"
        )
    return (["Run facts:", ""] + lines + [""]) if lines else []


def _seed_of(results: dict) -> int:
    for spec in results:
        return spec.seed
    return 0


PUBLISHED_MEANS = {"sharegpt": (161.3, 338.0), "alpaca": (19.3, 58.5)}  # OPT tokenizer, vLLM paper


def workload_lines(datasets: Iterable[str]) -> list[str]:
    """Mean prompt/output lengths of the built-in profiles beside the published means (OPT tokenizer)."""
    from .workloads import WorkloadSpec, make_workload

    lines = ["Workload lengths (built-in profiles, 5000 draws, seed 0) vs the published means (OPT tokenizer):", "",
             "| dataset | prompt mean (ours / published) | output mean (ours / published) |", "|---|---|---|"]
    for d in sorted(set(datasets) & set(PUBLISHED_MEANS)):
        w = make_workload(WorkloadSpec(dataset=d, num_requests=5000, rate=1.0), 0)
        p = sum(x.prompt_len for x in w) / len(w)
        o = sum(x.output_len for x in w) / len(w)
        pp, po = PUBLISHED_MEANS[d]
        lines.append(f"| {d} | {p:.1f} / {pp} | {o:.1f} / {po} |")
    return lines + ["", "Shorter outputs mean less work per request, so every system's capacity in req/s is "
                    "higher than with the published lengths; capacity *ratios* are less affected.", ""]


def build_report(
    figures: list[FigureData],
    results: dict | None = None,
    *,
    header_lines: Iterable[str] = (),
    ours: str = "ours (sim)",
) -> str:
    """The Markdown report for ``figures`` (``results``, keyed by the figures' specs, adds per-run facts; absent
    for ``jserve-eval plot``). ``ours`` heads the column of our capacities (which backend measured them)."""
    numbers = load_paper_numbers()
    out = ["# jserve-eval report", ""]
    out += list(header_lines)
    out += ["", f"Paper numbers from `{numbers.get('_loaded_from', 'eval/experiments/paper_numbers.json')}`.", ""]
    if results:
        failed = [r for r in results.values() if not r.ok]
        out.append(f"Runs: {len(results)} ({len(failed)} failed).")
        by_error: dict[str, list[RunResult]] = {}
        for r in failed:
            by_error.setdefault(r.error or "", []).append(r)
        for error, runs in by_error.items():
            out.append(f"- FAILED ({len(runs)} runs, e.g. {runs[0].spec.describe()}): {error}")
        out.append("")
    for fd in figures:
        fig = fd.fig
        out += [f"## Fig {fig.fig_id}: {fig.title}", "", f"![Fig {fig.fig_id}](fig{fig.fig_id}.png)", ""]
        if fig.kind == "ratio":
            out += _ratio_table(fd.panels[0])
        elif fig.kind == "burstiness":
            out += _burstiness_table(fd)
        else:
            for pdata in fd.panels:
                out += _capacity_table(fd, pdata, ours)
            if fig.kind == "kv_ablation":
                out += _breakdown_table(fd)
        out += _observations(fd, results)
    datasets = {p.panel.dataset for fd in figures for p in fd.panels}
    if datasets:
        out += ["## Workloads", ""] + workload_lines(datasets)
    out += ["## Why our numbers differ", "", REASONS]
    return "\n".join(out) + "\n"
