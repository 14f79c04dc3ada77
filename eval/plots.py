"""Figures in the paper's style: one PDF and one PNG per figure, from ``eval.analysis.FigureData``.

Style follows the artifact's plotting scripts: ticks pointing in, no top/right frame, one color and marker per
system (FasterTransformer blue circles, vLLM orange triangles, FastServe-FCFS green squares, FastServe red
diamonds), a dashed grey SLO line, and the legend above the axes. Attainment panels draw the 95% line and
mark each system's crossing with an ``x``; latency panels mark each capacity (first upward SLO crossing) with
a dotted drop line. Every panel title carries the largest request count of its points (finite traces cap
overload; DESIGN.md section 8). Uses the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .analysis import FigureData, PanelData, capacities, curve_capacity  # noqa: E402
from .experiments.paper import paper_breakdown  # noqa: E402

matplotlib.rcParams["pdf.fonttype"] = 42
matplotlib.rcParams["ps.fonttype"] = 42

STYLE = {
    "static": ("#1f77b4", "o"),
    "vllm": ("#ff7f0e", "^"),
    "fcfs": ("#2ca02c", "s"),
    "fastserve": ("#d62728", "d"),
    "cp": ("#9467bd", "v"),
    "mlfq": ("#8c564b", "P"),
    "fixed-priority": ("#e377c2", "X"),
    "srpt": ("#7f7f7f", "*"),
    "fastserve-reactive": ("#bcbd22", "s"),
    "fastserve-recompute": ("#17becf", "^"),
    "fastserve-artifact": ("#9467bd", "v"),
    "fastserve-nostarve": ("#8c564b", "P"),
    "fastserve-aging": ("#17becf", "X"),
}
BREAKDOWN_COLORS = ("#4c72b0", "#dd8452", "#55a868")


def _style(label: str, k: int) -> tuple[str, str]:
    if label in STYLE:
        return STYLE[label]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colors[k % len(colors)], "o"


def _frame(ax) -> None:
    ax.tick_params("x", direction="in")
    ax.tick_params("y", direction="in")
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)


def _finite(xs, ys, cap: float | None):
    """Points with values; values above ``cap`` (and inf: unfinished requests) are drawn at the cap."""
    px, py = [], []
    for x, y in zip(xs, ys):
        if y is None:
            continue
        if cap is not None and (math.isinf(y) or y > cap):
            y = cap
        elif math.isinf(y):
            continue
        px.append(x)
        py.append(y)
    return px, py


def _latency_panel(ax, data: PanelData) -> None:
    panel = data.panel
    slo = panel.slo
    top = None
    if slo is not None:
        finite = [
            y for c in data.curves.values() for y in c.values(panel.metric) if y is not None and math.isfinite(y)
        ]
        top = min(max(finite, default=2 * slo), 2.5 * slo) * 1.05 if finite else 2 * slo
    caps = capacities(data) if slo is not None else {}
    for k, (label, curve) in enumerate(data.curves.items()):
        color, marker = _style(label, k)
        xs, ys = _finite(curve.xs, curve.values(panel.metric), top)
        ax.plot(xs, ys, marker=marker, color=color, lw=2, markersize=6, label=curve.display, zorder=3)
        cap = caps.get(label)
        if cap is not None and math.isfinite(cap):
            ax.plot([cap, cap], [0, slo], ls=":", color=color, lw=1.2, zorder=2)
    if slo is not None:
        ax.axhline(slo, ls="--", color="gray", label=f"SLO {slo:g}")
        ax.set_ylim(0, top)
    ax.set_xlim(left=0)
    ax.set_xlabel("Job arrival rate (job/s)")
    ax.set_ylabel("P95 latency (s/token)" if panel.metric.startswith("p95") else "Latency (s/token)")


def _attainment_panel(ax, data: PanelData) -> None:
    panel = data.panel
    level = panel.slo or 0.95
    for k, (label, curve) in enumerate(data.curves.items()):
        color, marker = _style(label, k)
        xs, ys = _finite(curve.xs, curve.values(panel.metric), None)
        ax.plot(xs, [100 * y for y in ys], marker=marker, color=color, lw=2, markersize=6, label=curve.display)
        cross = curve_capacity(curve, panel.metric, level, attainment=True)
        if cross is not None and math.isfinite(cross):
            ax.plot([cross], [100 * level], marker="x", color=color, markersize=12, mew=3, zorder=4)
    ax.axhline(100 * level, ls="--", color="gray", label=f"{100 * level:g}%")
    ax.set_ylim(0, 105)
    ax.set_xlim(left=0)
    ax.set_xlabel("Job arrival rate (job/s)")
    ax.set_ylabel("SLO attainment (%)")


def _ratio_panel(ax, data: PanelData) -> None:
    panel = data.panel
    for k, (label, curve) in enumerate(data.curves.items()):
        color, marker = _style(label, k)
        xs, ys = _finite(curve.xs, curve.values(panel.metric), None)
        ls = "--" if label == "srpt" else "-"
        ax.plot(xs, ys, marker=marker, color=color, lw=2, markersize=6, ls=ls, label=curve.display)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("Input/output length ratio (x of ShareGPT's)")
    ax.set_ylabel("Mean latency (s/token)")


def _breakdown_panel(ax, data: PanelData, rates) -> None:
    curve = data.curves.get("fastserve")
    paper = {row[0]: row[1:] for row in paper_breakdown()["rows"]}
    width = 0.38
    for i, rate in enumerate(rates):
        ours = None
        if curve is not None and rate in curve.xs:
            m = curve.metrics[curve.xs.index(rate)]
            if m is not None:
                ours = [100 * m.get(f"breakdown_{k}", math.nan) for k in ("queuing", "swapping", "execution")]
        for offset, vals, hatch in ((-width / 2, ours, None), (width / 2, paper.get(rate), "//")):
            if vals is None:
                continue
            bottom = 0.0
            for j, v in enumerate(vals):
                ax.bar(i + offset, v, width * 0.95, bottom=bottom, color=BREAKDOWN_COLORS[j], hatch=hatch,
                       edgecolor="black", lw=0.5)
                bottom += v
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlabel("Job arrival rate (job/s); left: jserve sim, right (hatched): paper")
    ax.set_ylabel("Share of time (%)")
    ax.set_ylim(0, 105)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in BREAKDOWN_COLORS]
    ax.legend(handles, ["queuing", "swapping", "execution"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)


def _burstiness_panel(ax, fd: FigureData) -> None:
    cvs = [p.points[0].cv for p in fd.fig.panels]
    systems = list(fd.panels[0].curves)
    for k, label in enumerate(systems):
        color, marker = _style(label, k)
        ys, above = [], []
        for cv, pdata in zip(cvs, fd.panels):
            cap = capacities(pdata).get(label)
            ys.append(cap if cap is not None and math.isfinite(cap) else math.nan)
            if cap is not None and math.isinf(cap):  # never crossed: a lower bound at the highest rate
                above.append((cv, max(pdata.curves[label].xs)))
        ax.plot(cvs, ys, marker=marker, color=color, lw=2, label=fd.panels[0].curves[label].display)
        if above:
            ax.plot(*zip(*above), ls="none", marker=marker, mfc="none", color=color, markersize=9,
                    label=f"{fd.panels[0].curves[label].display}: above range (lower bound)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Coefficient of variation of inter-arrival times")
    ax.set_ylabel("Capacity at 0.3 s/token (job/s)")
    ax.set_ylim(bottom=0)


def _title(pdata: PanelData) -> str:
    """Panel title with the largest request count of its points (finite traces cap overload)."""
    n = max((n for c in pdata.curves.values() for n in c.num_requests), default=0)
    return f"{pdata.panel.title} (n <= {n})"


def plot_figure(fd: FigureData, out_dir: str | Path, *, stem: str | None = None) -> list[Path]:
    """Draw ``fd`` and save ``fig<ID>.pdf`` and ``.png`` in ``out_dir``; returns the paths."""
    fig_def = fd.fig
    kind = fig_def.kind
    if kind == "burstiness":
        n_axes = 1
    elif kind == "kv_ablation":
        n_axes = 2
    else:
        n_axes = len(fd.panels)
    fig, axes = plt.subplots(1, n_axes, figsize=(5.2 * n_axes, 3.8), squeeze=False)
    axes = axes[0]
    if kind == "burstiness":
        _burstiness_panel(axes[0], fd)
    elif kind == "kv_ablation":
        _latency_panel(axes[0], fd.panels[0])
        axes[0].set_title(_title(fd.panels[0]))
        _breakdown_panel(axes[1], fd.panels[0], fig_def.breakdown_rates)
        axes[1].set_title("Proactive: time breakdown")
    else:
        for ax, pdata in zip(axes, fd.panels):
            {"latency": _latency_panel, "attainment": _attainment_panel, "ratio": _ratio_panel}[kind](ax, pdata)
            ax.set_title(_title(pdata))
    for ax in axes:
        _frame(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 6),
                   frameon=False, fontsize=8)
    fig.suptitle(f"Fig {fig_def.fig_id}: {fig_def.title}", y=1.08, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"fig{fig_def.fig_id}"
    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, bbox_inches="tight", dpi=130)
        paths.append(path)
    plt.close(fig)
    return paths
