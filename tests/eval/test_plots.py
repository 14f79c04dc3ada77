"""The figures as drawn: titles that fit, SLO lines inside the axes, values above the axis marked."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest

from eval.analysis import Curve, FigureData, PanelData
from eval.experiments import FIGURES, get_figures
from eval.plots import CLIP_FACTOR, CLIPPED_LABEL, CLIPPED_MARKER, draw_figure, plot_figure


def _data(fig, values) -> FigureData:
    """``fig`` with every system's curve at ``values(label, i, panel_key)`` on the panel's points."""
    panels = []
    for panel in fig.panels:
        curves = {}
        for s in panel.systems:
            xs = [p.io_ratio_scale if panel.x == "io_ratio_scale" else p.rate for p in panel.points]
            ms = [{panel.metric: values(s.label, i, panel.key), "breakdown_queuing": 0.5, "breakdown_swapping": 0.1,
                   "breakdown_execution": 0.4} for i in range(len(xs))]
            curves[s.label] = Curve(s.label, s.display, xs, ms, [p.num_requests for p in panel.points])
        panels.append(PanelData(panel, curves))
    return FigureData(fig, panels)


@pytest.fixture
def drawn():
    figs = []

    def draw(fd):
        fig = draw_figure(fd)
        fig.canvas.draw()
        figs.append(fig)
        return fig

    yield draw
    for fig in figs:
        plt.close(fig)


def test_panel_titles_do_not_overlap_and_keep_their_text(drawn):
    fd = _data(get_figures(["13"], quick=True)[0], lambda label, i, key: max(0.0, 1 - 0.2 * i))
    fig = drawn(fd)
    r = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(r) for ax in fig.axes]
    assert len(boxes) == 3
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, (left, right)
    for ax, pdata in zip(fig.axes, fd.panels):
        assert ax.get_title().endswith("\n(n <= 200)")  # wrapped between words, the count kept whole
        assert ax.get_title().replace("\n", " ") == f"{pdata.panel.title} (n <= 200)"
    width = fig.get_figwidth() * fig.dpi
    sup = fig._suptitle.get_window_extent(r)
    assert sup.x0 >= 0 and sup.x1 <= width


def test_long_figure_title_is_wrapped_to_the_figure(drawn):
    hazards = get_figures(["hazards"], quick=True)[0]  # one panel, and a title with the quick-mode note
    fig = drawn(_data(hazards, lambda label, i, key: 0.05))
    r = fig.canvas.get_renderer()
    sup = fig._suptitle.get_window_extent(r)
    width = fig.get_figwidth() * fig.dpi
    assert sup.x0 >= 0 and sup.x1 <= width
    assert fig._suptitle.get_text().replace("\n", " ") == f"Fig hazards: {hazards.title}"
    # Seven legend entries do not fit one row of a one-panel figure: more rows, within its width; the legend
    # sits between the panel's title and the figure's title.
    legend = fig.legends[0].get_window_extent(r)
    assert legend.x0 >= 0 and legend.x1 <= width
    assert fig.axes[0].title.get_window_extent(r).y1 <= legend.y0 and legend.y1 <= sup.y0


def _slo_line(ax):
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("SLO")]
    assert len(lines) == 1
    return lines[0]


def test_slo_line_is_inside_the_axes_when_every_value_is_below_it(drawn):
    fig = drawn(_data(FIGURES["17"], lambda label, i, key: 0.02 + 0.007 * i))  # at most 0.125, SLO 0.3
    ax = fig.axes[0]
    slo = _slo_line(ax).get_ydata()[0]
    assert slo == 0.3
    low, high = ax.get_ylim()
    assert low <= slo < high
    assert high < CLIP_FACTOR * slo  # the axis still follows the data, not the clip level
    # Nothing is clipped, so the legend has no entry for clipped values.
    assert CLIPPED_LABEL not in [t.get_text() for t in fig.legends[0].get_texts()]


def test_values_above_the_axis_are_marked_and_written(drawn):
    fig11 = FIGURES["11"]
    values = {"static": [0.2, 4.8, math.inf], "vllm": [0.1, 0.2, 0.25]}

    def value(label, i, key):
        return values.get(label, [0.05] * 3)[i]

    share = fig11.panels[0]
    points = share.points[:3]
    fig_def = type(fig11)(fig11.fig_id, fig11.title, fig11.kind,
                          (type(share)(**{**share.__dict__, "points": points}),))
    fig = drawn(_data(fig_def, value))
    ax = fig.axes[0]
    clip = CLIP_FACTOR * 0.3
    xs = [p.rate for p in points]
    assert ax.get_ylim()[1] > clip  # room above the marks for the values
    # The static curve runs to the clip level; its own marker only where the value is real.
    static = next(ln for ln in ax.get_lines() if ln.get_label() == "FasterTransformer")
    assert list(static.get_ydata()) == pytest.approx([0.2, clip, clip])
    assert static.get_markevery() == [0]
    # An arrow at the clip level for each clipped value, in the curve's color, and the true value beside it.
    arrows = [ln for ln in ax.get_lines() if ln.get_marker() == CLIPPED_MARKER and len(ln.get_xdata())]
    assert sorted((ln.get_xdata()[0], ln.get_ydata()[0]) for ln in arrows) == [(xs[1], clip), (xs[2], clip)]
    assert all(ln.get_color() == static.get_color() for ln in arrows)
    texts = {t.get_text(): t.xy for t in ax.texts}
    assert texts == {"4.8": (xs[1], clip), "inf": (xs[2], clip)}
    # vLLM is below the clip level: drawn as is, markers everywhere, no arrow.
    vllm = next(ln for ln in ax.get_lines() if ln.get_label() == "vLLM")
    assert list(vllm.get_ydata()) == pytest.approx([0.1, 0.2, 0.25])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert CLIPPED_LABEL in legend and "SLO 0.3" in legend
    r = fig.canvas.get_renderer()
    assert all(t.get_window_extent(r).y1 <= ax.get_window_extent(r).y1 for t in ax.texts)  # inside the axes


@pytest.mark.parametrize("fig_id, values, per_panel", [
    # six systems above the axis at each of the last rates: their values stack up
    ("hazards", lambda label, i, key: 10.0 + i if i >= 10 else 0.05, lambda panel: 6 * (len(panel.points) - 10)),
    # one system above the axis everywhere, Alpaca's rates 11, 11.5, 12, 13 closer than a value's width
    ("11", lambda label, i, key: 1.0 + i if label == "static" else 0.05, lambda panel: len(panel.points)),
])
def test_written_values_do_not_overlap_and_stay_inside_the_axes(drawn, fig_id, values, per_panel):
    fig = drawn(_data(FIGURES[fig_id], values))
    r = fig.canvas.get_renderer()
    for ax, panel in zip(fig.axes, FIGURES[fig_id].panels):
        boxes = [t.get_window_extent(r) for t in ax.texts]
        assert len(boxes) == per_panel(panel)
        top = ax.get_window_extent(r).y1
        assert all(b.y1 <= top for b in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (a, b)


def test_legend_collects_entries_from_every_panel(drawn):
    # Only the second (Alpaca) panel has a value above the axis; the figure legend still explains the arrow.
    def value(label, i, key):
        return 3.0 if (label, i, key) == ("static", 13, "alpaca") else 0.05

    fig = drawn(_data(FIGURES["11"], value))
    assert [len(ax.texts) for ax in fig.axes] == [0, 1]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend.count(CLIPPED_LABEL) == 1 and legend.count("vLLM") == 1


def test_plot_figure_saves_what_draw_figure_draws(tmp_path):
    paths = plot_figure(_data(FIGURES["12"], lambda label, i, key: 0.05 * (i + 1)), tmp_path)
    assert [p.name for p in paths] == ["fig12.pdf", "fig12.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not plt.get_fignums()  # closed
