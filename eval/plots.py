"""Figures in the paper's style: one PDF and one PNG per figure, from ``eval.analysis.FigureData``.

Style follows the artifact's plotting scripts: ticks pointing in, no top/right frame, one color and marker per
system (FasterTransformer blue circles, vLLM orange triangles, FastServe-FCFS green squares, FastServe red
diamonds), a dashed grey SLO line, and the legend above the axes. Attainment panels draw the 95% line and
mark each system's crossing with an ``x``; latency panels mark each capacity (first upward SLO crossing) with
a dotted drop line. A latency axis shows the SLO line and the data up to 2.5x the SLO: a higher value (or inf,
unfinished requests) is drawn at 2.5x the SLO as an upward arrow, without the system's marker, and its value is
written above the arrow; the legend explains the arrow. Every panel title carries the largest request count of
its points (finite traces cap overload; DESIGN.md section 8); titles are wrapped to their panel's width, and
the legend and the figure's title sit above the panels. Uses the non-interactive Agg backend. ``draw_figure``
returns the matplotlib figure, ``plot_figure`` saves it.
"""

from __future__ import annotations

import math
import re
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


def _finite(xs, ys):
    """The points with a finite value."""
    px, py = [], []
    for x, y in zip(xs, ys):
        if y is not None and math.isfinite(y):
            px.append(x)
            py.append(y)
    return px, py


CLIP_FACTOR = 2.5  # a latency axis shows at most this multiple of the SLO; higher values are marked at it
CLIPPED_MARKER = r"$\uparrow$"  # no system's marker (STYLE) looks like it
CLIPPED_LABEL = "above the axis (value written)"


def _clipped_text(y: float) -> str:
    return "inf" if math.isinf(y) else f"{y:.2g}"


def _latency_panel(ax, data: PanelData) -> tuple[float, list] | None:
    """Draws a latency panel; returns (clip level, the texts of the values above it) when a value is above the
    axis, else None (``_place_clipped_values`` places the texts once the layout is done)."""
    panel = data.panel
    slo = panel.slo
    clip = top = None
    clipped: list[tuple[float, float, str]] = []  # (x, true value, color)
    if slo is not None:
        values = [
            y for c in data.curves.values() for y in c.values(panel.metric) if y is not None and not math.isnan(y)
        ]
        clip = CLIP_FACTOR * slo
        if not any(y > clip for y in values):
            clip = None
            top = max(values + [slo]) * 1.1  # the SLO line is always inside the axes
    caps = capacities(data) if slo is not None else {}
    for k, (label, curve) in enumerate(data.curves.items()):
        color, marker = _style(label, k)
        xs, ys, marked = [], [], []
        for x, y in zip(curve.xs, curve.values(panel.metric)):
            if y is None or math.isnan(y) or (math.isinf(y) and clip is None):
                continue
            if clip is not None and y > clip:
                clipped.append((x, y, color))
                y = clip
            else:
                marked.append(len(xs))
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, marker=marker, markevery=marked, color=color, lw=2, markersize=6, label=curve.display,
                zorder=3)
        cap = caps.get(label)
        if cap is not None and math.isfinite(cap):
            ax.plot([cap, cap], [0, slo], ls=":", color=color, lw=1.2, zorder=2)
    room = None
    if clipped:
        texts = []
        for x, y, color in clipped:
            ax.plot([x], [clip], ls="none", marker=CLIPPED_MARKER, color=color, markersize=11, zorder=4)
            text = ax.annotate(_clipped_text(y), (x, clip), xytext=(0, 0), textcoords="offset points",
                               ha="center", va="bottom", rotation=90, fontsize=6.5, color=color,
                               annotation_clip=False)
            text.set_in_layout(False)  # placed, and the axis extended to hold them, after the layout
            texts.append(text)
        ax.plot([], [], ls="none", marker=CLIPPED_MARKER, color="black", markersize=11, label=CLIPPED_LABEL)
        top = clip * 1.2  # provisional: draw_figure makes room for the values once the panel's size is known
        room = (clip, texts)
    if slo is not None:
        ax.axhline(slo, ls="--", color="gray", label=f"SLO {slo:g}")
        ax.set_ylim(0, top)
    ax.set_xlim(left=0)
    ax.set_xlabel("Job arrival rate (job/s)")
    ax.set_ylabel("P95 latency (s/token)" if panel.metric.startswith("p95") else "Latency (s/token)")
    return room


def _place_clipped_values(ax, clip: float, texts, renderer) -> None:
    """Stack the written values above their arrows, each as low as it goes without touching another (values
    at one rate, or at rates closer than a text's width), and extend the y-axis to hold them all."""
    to_pt = 72 / ax.figure.dpi
    placed: list[tuple[float, float, float, float]] = []  # x0, x1 (pixels), bottom, top (points above clip)
    for text in sorted(texts, key=lambda t: t.xy[0]):
        box = text.get_window_extent(renderer)
        height = box.height * to_pt
        low = 7.0  # above the arrow
        while True:
            clash = [p for p in placed if p[0] < box.x1 + 1 and box.x0 - 1 < p[1] and p[2] < low + height
                     and low < p[3]]
            if not clash:
                break
            low = max(p[3] for p in clash) + 2
        text.xyann = (0, low)
        placed.append((box.x0, box.x1, low, low + height))
    need = max(p[3] for p in placed) + 3
    height_pt = ax.get_window_extent(renderer).height * to_pt
    ax.set_ylim(0, clip / (1 - min(need / height_pt, 0.6)))


def _attainment_panel(ax, data: PanelData) -> None:
    panel = data.panel
    level = panel.slo or 0.95
    for k, (label, curve) in enumerate(data.curves.items()):
        color, marker = _style(label, k)
        xs, ys = _finite(curve.xs, curve.values(panel.metric))
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
        xs, ys = _finite(curve.xs, curve.values(panel.metric))
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


def _wrap(text_artist, text: str, width_px: float, renderer) -> None:
    """Set ``text`` on ``text_artist``, broken between words so that no line is wider than ``width_px``; a
    parenthesized group such as ``(n <= 200)`` stays on one line."""
    def width(t: str) -> float:
        text_artist.set_text(t)
        return text_artist.get_window_extent(renderer).width

    lines, line = [], ""
    for word in re.findall(r"\S*\([^()]*\)\S*|\S+", text):
        longer = f"{line} {word}" if line else word
        if line and width(longer) > width_px:
            lines.append(line)
            line = word
        else:
            line = longer
    text_artist.set_text("\n".join(lines + [line]))


def draw_figure(fd: FigureData):
    """Draw ``fd``; returns the matplotlib ``Figure`` (the caller closes it)."""
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
    renderer = fig.canvas.get_renderer()
    titles, rooms = [], []
    if kind == "burstiness":
        _burstiness_panel(axes[0], fd)
    elif kind == "kv_ablation":
        rooms.append((axes[0], _latency_panel(axes[0], fd.panels[0])))
        titles = [_title(fd.panels[0]), "Proactive: time breakdown"]
        _breakdown_panel(axes[1], fd.panels[0], fig_def.breakdown_rates)
    else:
        for ax, pdata in zip(axes, fd.panels):
            draw = {"latency": _latency_panel, "attainment": _attainment_panel, "ratio": _ratio_panel}[kind]
            rooms.append((ax, draw(ax, pdata)))
            titles.append(_title(pdata))
    panel_px = fig.get_figwidth() * fig.dpi / n_axes
    for ax, title in zip(axes, titles):  # wrapped to the panel, or neighbouring titles run into each other
        _wrap(ax.set_title(title), title, 0.9 * panel_px, renderer)
    for ax in axes:
        _frame(ax)
    fig.tight_layout()
    for ax, room in rooms:  # now that the panel's size is known
        if room is not None:
            _place_clipped_values(ax, *room, renderer)
    # Above the panels: the legend (every panel's entries once: a panel may have one the first lacks, such as
    # the clipped-value arrow), in as many columns as fit the figure's width, and above it the figure's title.
    # Both lie outside the figure's box; savefig(bbox_inches="tight") keeps them.
    width_px = fig.get_figwidth() * fig.dpi
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    top = 1.0
    if handles:
        for ncol in range(min(len(handles), 6), 0, -1):
            legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol,
                                frameon=False, fontsize=8)
            box = legend.get_window_extent(renderer)
            if box.width <= width_px or ncol == 1:
                break
            legend.remove()
        top = box.y1 / (fig.get_figheight() * fig.dpi)
    suptitle = f"Fig {fig_def.fig_id}: {fig_def.title}"
    _wrap(fig.suptitle(suptitle, y=top + 0.01, va="bottom", fontsize=10), suptitle, 0.95 * width_px, renderer)
    return fig


def plot_figure(fd: FigureData, out_dir: str | Path, *, stem: str | None = None) -> list[Path]:
    """Draw ``fd`` and save ``fig<ID>.pdf`` and ``.png`` in ``out_dir``; returns the paths."""
    fig = draw_figure(fd)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"fig{fd.fig.fig_id}"
    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, bbox_inches="tight", dpi=130)
        paths.append(path)
    plt.close(fig)
    return paths
