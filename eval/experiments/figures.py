"""One definition per figure: which systems, workloads, rates, request counts, batch sizes and hardware.

Figure numbers follow the public artifact. Rates and request counts are the artifact's scripts
(``benchmarks/artifact-evaluation/{overall,large_bs,gqa}/*.sh``): every system of a panel runs the union of
the rates the artifact ran for any of them (the simulator is cheap, so curves are complete), each rate with
the artifact's request count for it. Quick mode keeps a spread of rates and caps the request count; it is a
smoke run of every figure, not a measurement. A panel that runs one count at every point (Fig 16, the
long-trace panels) names that count in its title and log group, so quick mode rebuilds it with the capped count
(``Panel.with_requests``), and a panel that capping turns into a repeat of another panel of its figure is left
out (the hazards figure's long-trace panel; the figure's title says so).

Definitions the artifact does not script (ours; see ``docs/eval.md``):

* Fig 16 (scheduler ablation): ShareGPT lengths with each request's prompt/output ratio scaled by
  0.25x..256x at constant total tokens (``WorkloadSpec.io_ratio_scale``), 400 requests per ratio at the rate
  that offers 90% of a batch-16 server's capacity (``load.load_matched_rate``: prompt tokens are much cheaper
  than output tokens, so a fixed rate would leave the high-ratio points idle); mean normalized latency of
  fcfs, naive MLFQ, fixed-priority and FastServe, with the SRPT oracle as a bound.
* Fig 17 (KV ablation): FastServe with proactive, reactive and recompute KV management on the Fig 11 ShareGPT
  sweep, and the queuing / swapping / execution breakdown of the proactive runs at 0.5..3 req/s.
* Burstiness: Gamma arrivals with CV 0.5..4 on the ShareGPT rates from 1.5 req/s, 2000 requests per rate
  (with the artifact's 400, FastServe's curve never crosses the SLO, see the hazards figure); capacity at
  0.3 s/token against CV.
* Hazards (not a paper figure; DESIGN.md section 8): FastServe as configured by default, with the artifact's
  configuration and with starvation promotion off, beside vLLM and FCFS, on the ShareGPT sweep with the
  artifact's request counts and with 2000 requests per rate (finite traces cap overload).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

from .load import load_matched_rate
from .systems import SYSTEMS, SystemSpec


@dataclass(frozen=True)
class Point:
    rate: float
    num_requests: int
    io_ratio_scale: float = 1.0
    cv: float = 1.0


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    dataset: str
    systems: tuple[SystemSpec, ...]
    points: tuple[Point, ...]
    metric: str = "mean_norm_latency"  # a key of the per-run metrics (see eval.runner)
    x: str = "rate"  # "rate" | "io_ratio_scale"
    batch_size: int = 16
    preset: str = "opt-13b-a100"
    arrival: str = "poisson"
    slo: float | None = 0.3  # horizontal SLO line (s/token) or attainment level
    log_group: str = "opt-13b"  # sub-directory of the artifact-format logs
    log_batch_size: bool = False  # add "-bs=<B>" to log names (Fig 14)
    # For a panel that runs one request count at every point and names it in its title and log group: the same
    # panel with ``n`` requests per point (quick mode caps the count and must not keep claiming the full one).
    with_requests: Callable[[int], Panel] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class FigureDef:
    fig_id: str
    title: str
    kind: str  # plot/report kind: latency | attainment | ratio | kv_ablation | burstiness
    panels: tuple[Panel, ...]
    notes: str = ""
    breakdown_rates: tuple[float, ...] = field(default=())


def _pts(rates, counts, **kw) -> tuple[Point, ...]:
    if len(rates) != len(counts):
        raise ValueError("rates and request counts differ in length")
    return tuple(Point(float(r), int(n), **kw) for r, n in zip(rates, counts))


def _systems(*labels: str) -> tuple[SystemSpec, ...]:
    return tuple(SYSTEMS[s] for s in labels)


# The artifact's sweeps (overall/*.sh, large_bs/*.sh, gqa/*.sh).
SHAREGPT = _pts(
    (0.1, 0.2, 0.5, 1, 1.5, 1.75, 2, 2.25, 2.5, 3, 4, 4.5, 5, 5.5, 6, 10),
    (20, 50, 100, 200, 300, 350) + (400,) * 10,
)
ALPACA = _pts(
    (1, 3, 5, 8, 11, 11.5, 12, 13, 14, 15, 17, 20, 30, 40),
    (100,) + (300,) * 9 + (340, 400, 600, 800),
)
LARGE_BS = _pts((1, 2, 2.5, 2.75, 3, 3.25, 3.5, 3.75), (200, 400, 500, 550, 600, 650, 700, 750))
# gqa_fcfs_sharegpt: the script's 6000 at rate 4 (a second run) and 8000 at 5.5 are dropped/replaced by the
# 200-per-req/s pattern every other entry follows.
GQA_SHAREGPT = _pts(
    (1, 2, 3, 3.3, 3.5, 3.8, 4, 5, 5.5, 6, 7, 8, 9, 10, 11, 12),
    (200, 400, 600, 660, 700, 760, 800, 1000, 1100, 1200, 1400, 1600, 1800, 2000, 2200, 3600),
)
GQA_ALPACA = _pts(
    (1, 10, 11, 12, 15, 16, 17, 18, 21, 23, 25),
    (200, 2000, 2200, 2500, 3000, 3200, 3400, 3600, 4200, 4600, 5000),
)
IO_RATIOS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
FIG16_UTILIZATION = 0.9
FIG16_REQUESTS = 400  # requests per ratio
LONG_TRACE = 2000  # requests per rate in the hazards figure's long-trace panel
CVS = (0.5, 1.0, 2.0, 4.0)
BREAKDOWN_RATES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
SLO_PAIRS = ((1.55, 0.15), (3.1, 0.3), (6.2, 0.6))  # (TTFT s, normalized latency s/token), Fig 13


def slo_metric(ttft: float, norm: float) -> str:
    return f"slo_{ttft:g}_{norm:g}"


def _overall(key, dataset, points, systems, title: str | None = None, **kw) -> Panel:
    title = title or {"sharegpt": "ShareGPT", "alpaca": "Alpaca"}[dataset]
    return Panel(key=key, title=title, dataset=dataset, systems=systems, points=points, **kw)


MAIN3 = ("vllm", "fcfs", "fastserve")
HAZARD_SYSTEMS = MAIN3 + ("fastserve-artifact", "fastserve-nostarve", "fastserve-aging")


def _ratio_panel(n: int) -> Panel:
    """Fig 16: ``n`` requests per prompt/output ratio at the load-matched rate."""
    return Panel(
        "ratio",
        f"ShareGPT, {n} requests per ratio at {FIG16_UTILIZATION:.0%} offered load",
        "sharegpt",
        _systems("fcfs", "mlfq", "fixed-priority", "fastserve", "srpt"),
        tuple(Point(load_matched_rate("sharegpt", s, FIG16_UTILIZATION), n, io_ratio_scale=s) for s in IO_RATIOS),
        x="io_ratio_scale",
        slo=None,
        log_group="io-ratio",
        with_requests=_ratio_panel,
    )


def _burst_panel(cv: float, n: int) -> Panel:
    """The burstiness sweep at one CV: the ShareGPT rates from 1.5 req/s, ``n`` requests each."""
    return Panel(
        f"cv{cv:g}",
        f"CV = {cv:g}",
        "sharegpt",
        _systems(*MAIN3),
        tuple(replace(p, cv=cv, num_requests=n) for p in SHAREGPT if p.rate >= 1.5),
        arrival="gamma" if cv != 1.0 else "poisson",
        log_group=f"long-{n}" if cv == 1.0 else f"cv-{cv:g}-long-{n}",  # CV 1: the hazards panel's runs
        with_requests=partial(_burst_panel, cv),
    )


def _long_panel(n: int) -> Panel:
    """The hazards figure's long-trace panel: the ShareGPT rates from 1.5 req/s, ``n`` requests each."""
    return Panel(
        "sharegpt-long",
        f"ShareGPT, {n} requests per rate",
        "sharegpt",
        _systems(*HAZARD_SYSTEMS),
        tuple(replace(p, num_requests=n) for p in SHAREGPT if p.rate >= 1.5),
        log_group=f"long-{n}",
        with_requests=_long_panel,
    )


def _figures() -> dict[str, FigureDef]:
    main4 = _systems("static", "vllm", "fcfs", "fastserve")
    main3 = _systems(*MAIN3)
    hazard_systems = _systems(*HAZARD_SYSTEMS)
    figs = [
        FigureDef(
            "11",
            "Mean normalized latency vs arrival rate (OPT-13B, 1 GPU)",
            "latency",
            (_overall("sharegpt", "sharegpt", SHAREGPT, main4), _overall("alpaca", "alpaca", ALPACA, main4)),
        ),
        FigureDef(
            "12",
            "P95 normalized latency vs arrival rate (ShareGPT)",
            "latency",
            (_overall("sharegpt", "sharegpt", SHAREGPT, main4, metric="p95_norm_latency"),),
        ),
        FigureDef(
            "13",
            "SLO attainment vs arrival rate (ShareGPT)",
            "attainment",
            tuple(
                _overall(
                    f"ttft{t:g}_norm{n:g}",
                    "sharegpt",
                    SHAREGPT,
                    main3,
                    title=f"ShareGPT: TTFT < {t:g} s and latency < {n:g} s/token",
                    metric=slo_metric(t, n),
                    slo=0.95,
                )
                for t, n in SLO_PAIRS
            ),
        ),
        FigureDef(
            "14",
            "Mean normalized latency with large batch sizes (ShareGPT)",
            "latency",
            tuple(
                Panel(f"bs{b}", f"batch size {b}", "sharegpt", main3, LARGE_BS, batch_size=b, log_batch_size=True)
                for b in (64, 128)
            ),
        ),
        FigureDef(
            "15",
            "GQA model: Llama-3-8B on one A100-40GB",
            "latency",
            (
                _overall("sharegpt", "sharegpt", GQA_SHAREGPT, main3, preset="llama-3-8b-a100", log_group="llama-3-8b"),
                _overall("alpaca", "alpaca", GQA_ALPACA, main3, preset="llama-3-8b-a100", log_group="llama-3-8b"),
            ),
        ),
        FigureDef(
            "16",
            "Scheduler ablation: input/output length ratio (ShareGPT, load-matched at 90%)",
            "ratio",
            (_ratio_panel(FIG16_REQUESTS),),
        ),
        FigureDef(
            "17",
            "KV-cache management ablation (ShareGPT)",
            "kv_ablation",
            (
                _overall(
                    "sharegpt",
                    "sharegpt",
                    SHAREGPT,
                    _systems("fastserve", "fastserve-reactive", "fastserve-recompute"),
                ),
            ),
            breakdown_rates=BREAKDOWN_RATES,
        ),
        FigureDef(
            "18",
            "Comparison with chunked prefill (OPT-13B)",
            "latency",
            (
                _overall("sharegpt", "sharegpt", SHAREGPT, _systems("vllm", "cp", "fastserve")),
                _overall("alpaca", "alpaca", ALPACA, _systems("vllm", "cp", "fastserve")),
            ),
        ),
        FigureDef(
            "burst",
            "Burstiness: capacity at 0.3 s/token vs arrival CV (ShareGPT, Gamma arrivals)",
            "burstiness",
            tuple(_burst_panel(cv, LONG_TRACE) for cv in CVS),
        ),
        FigureDef(
            "hazards",
            "Hazards (DESIGN.md section 8): starvation promotion and finite traces (ShareGPT)",
            "latency",
            (
                _overall("sharegpt", "sharegpt", SHAREGPT, hazard_systems),
                _long_panel(LONG_TRACE),
            ),
        ),
    ]
    return {f.fig_id: f for f in figs}


FIGURES: dict[str, FigureDef] = _figures()
FIGURE_ORDER = tuple(FIGURES)

# Quick mode: these rates (a spread that brackets each system's knee) and at most this many requests per run.
QUICK_MAX_REQUESTS = {"sharegpt": 200, "alpaca": 300}
QUICK_RATES = {
    "sharegpt": (0.5, 1, 2, 3, 4, 6),
    "alpaca": (3, 8, 12, 15, 20, 30),
    "large_bs": (1, 2, 3, 3.75),
    "gqa_sharegpt": (1, 3, 5, 8, 12),
    "gqa_alpaca": (1, 12, 18, 25),
}


def _quick_points(panel: Panel) -> tuple[Point, ...]:
    cap = QUICK_MAX_REQUESTS[panel.dataset]
    if panel.x != "rate":
        keep = panel.points[::2] + (panel.points[-1],) if len(panel.points) > 2 else panel.points
        pts = tuple(dict.fromkeys(keep))
    else:
        if panel.preset.startswith("llama"):
            table = QUICK_RATES[f"gqa_{panel.dataset}"]
        elif panel.batch_size > 16:
            table = QUICK_RATES["large_bs"]
        else:
            table = QUICK_RATES[panel.dataset]
        pts = tuple(p for p in panel.points if p.rate in table)
    return tuple(replace(p, num_requests=min(p.num_requests, cap)) for p in pts)


def _repeats(a: Panel, b: Panel) -> bool:
    """Whether panel ``a`` would draw nothing that ``b`` does not: the same systems, settings and metric, at a
    subset of ``b``'s points (log groups may differ: they do not change a run's result)."""
    key = lambda p: (p.systems, p.dataset, p.metric, p.x, p.batch_size, p.preset, p.arrival)  # noqa: E731
    return key(a) == key(b) and set(a.points) <= set(b.points)


def quick_figure(fig: FigureDef) -> FigureDef:
    """The quick variant of ``fig``: fewer rates, request counts capped at ``QUICK_MAX_REQUESTS``.

    Logs go to the same groups as the full figure's, except that a panel with one request count per point
    (``Panel.with_requests``) is rebuilt with the capped count, so its title and log group state the count that
    runs (``long-200``, not ``long-2000``). A panel whose capped runs repeat another panel's is left out and
    the figure's title names it.
    """
    panels: list[Panel] = []
    dropped: list[tuple[Panel, Panel, int]] = []
    for full in fig.panels:
        cap = QUICK_MAX_REQUESTS[full.dataset]
        counts = {p.num_requests for p in full.points}
        panel = full
        if full.with_requests is not None and len(counts) == 1 and counts.pop() > cap:
            panel = full.with_requests(cap)
        panel = replace(panel, points=_quick_points(panel))
        same = next((q for q in panels if _repeats(panel, q)), None)
        if same is not None:
            dropped.append((full, same, cap))
            continue
        panels.append(panel)
    title = fig.title
    for full, same, cap in dropped:
        title += (f" [quick mode: no '{full.title}' panel; capped at {cap} requests its runs are the "
                  f"'{same.title}' panel's]")
    return replace(fig, title=title, panels=tuple(panels))


def get_figures(ids: list[str] | None = None, *, quick: bool = False) -> list[FigureDef]:
    """Figure definitions by id (``None`` = all), in the canonical order; unknown ids raise ``ValueError``."""
    if ids is None:
        ids = list(FIGURE_ORDER)
    unknown = [i for i in ids if i not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURE_ORDER)}")
    figs = [FIGURES[i] for i in FIGURE_ORDER if i in ids]
    return [quick_figure(f) for f in figs] if quick else figs
