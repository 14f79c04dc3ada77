"""Figure definitions, per-system configurations, capacity analysis, the report and the plots."""

from __future__ import annotations

import math
import re
from itertools import permutations

import pytest

from eval.analysis import Curve, FigureData, PanelData, capacities, figure_specs, fmt_capacity, ratio, ratio_text
from eval.costmodels import resolve_preset
from eval.experiments import (
    FIGURE_ORDER,
    FIGURES,
    get_figures,
    get_system,
    paper_capacities,
    scheduler_config,
    slo_metric,
)
from eval.experiments.figures import QUICK_MAX_REQUESTS, Panel, Point
from eval.plots import plot_figure
from eval.report import build_report, figure_rows


def test_every_paper_figure_is_defined():
    assert set(FIGURE_ORDER) >= {"11", "12", "13", "14", "15", "16", "17", "18", "burst"}
    fig11 = FIGURES["11"]
    assert [s.label for s in fig11.panels[0].systems] == ["static", "vllm", "fcfs", "fastserve"]
    # The artifact's overall_fastserve_sharegpt.sh sweep.
    share = fig11.panels[0].points
    assert [p.rate for p in share] == [0.1, 0.2, 0.5, 1, 1.5, 1.75, 2, 2.25, 2.5, 3, 4, 4.5, 5, 5.5, 6, 10]
    assert [p.num_requests for p in share] == [20, 50, 100, 200, 300, 350] + [400] * 10
    alpaca = fig11.panels[1].points
    assert max(p.num_requests for p in alpaca) == 800 and alpaca[-1].rate == 40
    assert [p.batch_size for p in FIGURES["14"].panels] == [64, 128]
    assert all(p.log_batch_size for p in FIGURES["14"].panels)
    assert {p.preset for p in FIGURES["15"].panels} == {"llama-3-8b-a100"}
    assert [s.label for s in FIGURES["18"].panels[0].systems] == ["vllm", "cp", "fastserve"]
    assert [s.label for s in FIGURES["16"].panels[0].systems][:4] == ["fcfs", "mlfq", "fixed-priority", "fastserve"]
    assert [p.io_ratio_scale for p in FIGURES["16"].panels[0].points][0] == 0.25
    assert [p.io_ratio_scale for p in FIGURES["16"].panels[0].points][-1] == 256
    modes = [dict(s.overrides).get("swap_mode", "proactive") for s in FIGURES["17"].panels[0].systems]
    assert modes == ["proactive", "reactive", "recompute"]
    assert [p.metric for p in FIGURES["13"].panels] == [slo_metric(1.55, 0.15), slo_metric(3.1, 0.3), slo_metric(6.2, 0.6)]
    assert [p.points[0].cv for p in FIGURES["burst"].panels] == [0.5, 1.0, 2.0, 4.0]


def test_get_figures_and_quick_variants():
    with pytest.raises(ValueError, match="unknown figure 99"):
        get_figures(["99"])
    quick = get_figures(quick=True)
    assert [f.fig_id for f in quick] == list(FIGURE_ORDER)
    for fig in quick:
        for panel in fig.panels:
            assert panel.points, (fig.fig_id, panel.key)
            assert all(p.num_requests <= QUICK_MAX_REQUESTS[panel.dataset] for p in panel.points)
    full_runs = {s for f in get_figures() for s in figure_specs(f)}
    quick_runs = {s for f in quick for s in figure_specs(f)}
    # Quick mode simulates about a tenth of the requests of the full reproduction.
    assert sum(s.num_requests for s in quick_runs) < sum(s.num_requests for s in full_runs) / 5


def test_quick_mode_states_the_request_counts_it_runs():
    # The full definitions name their per-point counts in titles and log groups ...
    assert "2000 requests per rate" in FIGURES["hazards"].panels[1].title
    assert "400 requests per ratio" in FIGURES["16"].panels[0].title
    assert {s.log_group for s in figure_specs(FIGURES["burst"])} == {
        "cv-0.5-long-2000", "long-2000", "cv-2-long-2000", "cv-4-long-2000"}
    # ... and quick mode, which caps the counts, names the capped counts instead.
    quick = {f.fig_id: f for f in get_figures(quick=True)}
    assert "200 requests per ratio" in quick["16"].panels[0].title
    checked = 0
    for fig in quick.values():
        for panel in fig.panels:
            counts = {p.num_requests for p in panel.points}
            for m in re.finditer(r"(\d+) requests", panel.title):
                assert counts == {int(m.group(1))}, (fig.fig_id, panel.title, counts)
                checked += 1
        for spec in figure_specs(fig):
            for m in re.finditer(r"long-(\d+)", spec.log_group):
                assert int(m.group(1)) == spec.num_requests, (fig.fig_id, spec.log_group, spec.num_requests)
                checked += 1
    assert checked >= 1 + 4 * 4 * 3  # Fig 16's title; every burstiness run (4 CVs, 4 rates, 3 systems)
    assert {s.log_group for s in figure_specs(quick["burst"])} == {
        "cv-0.5-long-200", "long-200", "cv-2-long-200", "cv-4-long-200"}


def _repeats(a: Panel, b: Panel) -> bool:
    """Whether panel ``a`` shows nothing panel ``b`` does not: the same curves at a subset of its points."""
    same = (a.systems, a.dataset, a.metric, a.x, a.batch_size, a.preset, a.arrival) == (
        b.systems, b.dataset, b.metric, b.x, b.batch_size, b.preset, b.arrival)
    return same and set(a.points) <= set(b.points)


def test_quick_mode_drops_a_panel_that_capping_made_a_copy_of_another():
    full = FIGURES["hazards"]
    assert len(full.panels) == 2 and not _repeats(full.panels[1], full.panels[0])
    for fig in get_figures(quick=True):
        for a, b in permutations(fig.panels, 2):
            assert not _repeats(a, b), (fig.fig_id, a.key, b.key)
    quick = get_figures(["hazards"], quick=True)[0]
    # Capped at 200 requests, the long-trace panel's runs are the first panel's from 1.5 req/s on: dropped, and
    # the figure's title says so.
    assert [p.key for p in quick.panels] == ["sharegpt"]
    assert "2000 requests per rate" in quick.title and "quick" in quick.title
    # Figures that lose nothing keep their titles.
    assert get_figures(["11"], quick=True)[0].title == FIGURES["11"].title


def test_figures_share_runs():
    fig11 = set(figure_specs(FIGURES["11"]))
    assert set(figure_specs(FIGURES["12"])) <= fig11
    assert set(figure_specs(FIGURES["13"])) <= fig11
    # Fig 17's proactive curve is Fig 11's FastServe curve; the burstiness sweep's CV=1 (Poisson) runs are the
    # hazards figure's long-trace runs.
    assert set(figure_specs(FIGURES["17"])) & fig11
    burst = {s for s in figure_specs(FIGURES["burst"]) if s.cv == 1.0}
    assert burst and burst <= set(figure_specs(FIGURES["hazards"]))
    assert all(s.arrival == "poisson" for s in burst)


def test_scheduler_configs_follow_the_artifact():
    opt = resolve_preset("opt-13b-a100")
    fs = scheduler_config(get_system("fastserve"), opt, "sharegpt")
    assert (fs.num_device_blocks, fs.num_host_blocks, fs.max_batch_size, fs.max_tokens_per_batch) == (925, 4587, 16, 2048)
    assert scheduler_config(get_system("fcfs"), opt, "alpaca").num_host_blocks == 3932  # 48 GiB
    vl = scheduler_config(get_system("vllm"), opt, "sharegpt")
    assert vl.num_device_blocks == 894 and vl.num_host_blocks == 327  # vLLM sizing, 4 GiB
    assert scheduler_config(get_system("fastserve"), opt, "sharegpt", batch_size=64).max_batch_size == 64
    llama = scheduler_config(get_system("fastserve"), resolve_preset("llama-3-8b-a100"), "sharegpt")
    assert llama.num_host_blocks == 32 * 2**30 // (16 * 131072)
    assert scheduler_config(get_system("fastserve-reactive"), opt, "sharegpt").swap_mode == "reactive"
    art = scheduler_config(get_system("fastserve-artifact"), opt, "sharegpt")
    assert art.starvation_check_interval == 1000 and art.num_device_blocks == 925
    assert scheduler_config(get_system("fastserve-nostarve"), opt, "sharegpt").starvation_threshold is None
    assert scheduler_config(get_system("fastserve-aging"), opt, "sharegpt").promotion == "one_level"
    with pytest.raises(ValueError, match="unknown system 'orca'"):
        get_system("orca")


def test_paper_numbers_lookup():
    f11 = paper_capacities("11", "sharegpt")
    assert f11["slo"] == 0.3 and f11["sources"]["paper"]["fastserve"] == 4.89
    assert paper_capacities("13", "ttft3.1_norm0.3")["sources"]["artifact"]["vllm"] == 1.14
    assert paper_capacities("17", "sharegpt")["sources"]["paper"]["fastserve-reactive"] == 1.72
    assert paper_capacities("18", "alpaca")["sources"]["artifact"]["cp"] == 11.17
    assert paper_capacities("16", "ratio") == {}


def _panel(metric="mean_norm_latency", slo=0.3, x="rate"):
    systems = tuple(get_system(s) for s in ("vllm", "fastserve"))
    return Panel("sharegpt", "ShareGPT", "sharegpt", systems, (Point(1, 10), Point(2, 10), Point(3, 10)),
                 metric=metric, slo=slo, x=x)


def _curve(label, values, key="mean_norm_latency"):
    c = Curve(label, get_system(label).display, [1.0, 2.0, 3.0], [{key: v} if v is not None else None for v in values],
              [10, 10, 10])
    return c


def test_capacity_analysis_by_hand():
    data = PanelData(_panel(), {"vllm": _curve("vllm", [0.1, 0.2, 0.5]), "fastserve": _curve("fastserve", [0.1, 0.1, 0.2])})
    caps = capacities(data)
    assert caps["vllm"] == pytest.approx(2 + (0.3 - 0.2) / (0.5 - 0.2))
    assert math.isinf(caps["fastserve"])
    assert fmt_capacity(caps["fastserve"]) == "above range"
    assert fmt_capacity(caps["fastserve"], data.curves["fastserve"]) == "> 3 (above range)"
    # Bounds: FastServe never crossed by 3 req/s, vLLM crossed at 2.33, so the ratio is at least 3 / 2.33.
    vllm, fs = data.curves["vllm"], data.curves["fastserve"]
    assert ratio_text(caps["fastserve"], fs, caps["vllm"], vllm) == f"> {3 / caps['vllm']:.3g}"
    assert ratio_text(caps["vllm"], vllm, caps["fastserve"], fs) == f"< {caps['vllm'] / 3:.3g}"
    assert ratio_text(caps["vllm"], vllm, caps["vllm"], vllm) == "1"
    assert ratio_text(None, vllm, caps["vllm"], vllm) == f"< {1 / caps['vllm']:.3g}"
    failed = PanelData(_panel(), {"vllm": _curve("vllm", [None, None, None])})
    assert fmt_capacity(capacities(failed)["vllm"]) == "no data"
    assert ratio(4.0, 2.0) == 2.0 and ratio(None, 2.0) is None and ratio(math.inf, 1.0) is None


def test_report_shows_our_capacities_and_ratios_beside_the_paper():
    data = PanelData(_panel(), {"vllm": _curve("vllm", [0.1, 0.2, 0.5]), "fastserve": _curve("fastserve", [0.1, 0.2, 0.4])})
    fig = FIGURES["11"]
    text = build_report([FigureData(fig, [data])])
    ours_vllm = 2 + 0.1 / 0.3
    ours_fs = 2 + 0.1 / 0.2
    assert f"| vLLM | {ours_vllm:.2f} | 2.3 | 1.6 |" in text
    assert f"| FastServe | {ours_fs:.2f} | 4.89 | 4.14 |" in text
    assert f"| FastServe / vLLM | {ours_fs / ours_vllm:.3g} | {4.89 / 2.3:.3g} | {4.14 / 1.6:.3g} |" in text
    assert "Why our numbers differ" in text and "| sharegpt |" in text
    rows = figure_rows(FigureData(fig, [data]))
    assert len(rows) == 6 and rows[0]["mean_norm_latency"] == 0.1


@pytest.mark.parametrize("fig_id", ["11", "13", "16", "17", "burst"])
def test_plots_write_pdf_and_png(tmp_path, fig_id):
    fig = FIGURES[fig_id]
    panels = []
    for panel in fig.panels:
        curves = {}
        for s in panel.systems:
            xs = [p.io_ratio_scale if panel.x == "io_ratio_scale" else p.rate for p in panel.points]
            ms = [{panel.metric: 0.02 * (1 + i), "breakdown_queuing": 0.5, "breakdown_swapping": 0.1,
                   "breakdown_execution": 0.4} for i in range(len(xs))]
            if panel.metric.startswith("slo_"):
                ms = [{panel.metric: max(0.0, 1 - 0.1 * i)} for i in range(len(xs))]
            curves[s.label] = Curve(s.label, s.display, xs, ms, [p.num_requests for p in panel.points])
        panels.append(PanelData(panel, curves))
    paths = plot_figure(FigureData(fig, panels), tmp_path)
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_fig16_rates_offer_the_same_load():
    from eval.experiments.load import load_matched_rate, mean_demand
    from eval.workloads import WorkloadSpec, make_workload

    # Hand sum: prefill tokens + each decode step's cost split over a full batch of 16 (published fit, ms).
    w = make_workload(WorkloadSpec(dataset="sharegpt", num_requests=2000, rate=1.0, io_ratio_scale=4.0), 0)
    total = 0.0
    for r in w:
        total += (0.1019 * r.prompt_len + 7.12e-6 * r.prompt_len**2) / 1e3
        for k in range(1, r.output_len):
            total += (19.93 + 6.27e-4 * 16 * (r.prompt_len + k) + 0.0385 * 16) / 16 / 1e3
    assert mean_demand("sharegpt", 4.0) == pytest.approx(total / len(w), rel=1e-9)
    assert load_matched_rate("sharegpt", 4.0, 0.9) == pytest.approx(0.9 / (total / len(w)), rel=2e-3)
    rates = [p.rate for p in FIGURES["16"].panels[0].points]
    assert rates == sorted(rates)  # prompt tokens are cheaper, so higher ratios need more requests per second
