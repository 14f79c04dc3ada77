"""From run results to figure data: curves per panel and system, capacities, ratios.

``figure_data(fig, lookup)`` turns a ``FigureDef`` and a ``lookup(RunSpec) -> metrics | None`` into
``FigureData``: for every panel, every system's curve as x values and metric dicts (``None`` for a failed or
missing run). ``capacities`` reads the capacity of every curve at an SLO (first upward crossing, linear
interpolation; ``eval.metrics.capacity_at_slo``) or, for attainment panels, the rate where attainment falls
below 95%. Both ``jserve-eval reproduce`` (lookup = this sweep's results) and ``jserve-eval plot`` (lookup =
metrics recomputed from client logs) go through here, so plots and the report see the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .experiments.figures import FigureDef, Panel, Point
from .runner import RunSpec


def panel_specs(panel: Panel, *, seed: int = 0, dataset_path: str | None = None) -> list[tuple[str, Point, RunSpec]]:
    """Every (system label, point, RunSpec) of ``panel``."""
    out = []
    for system in panel.systems:
        for p in panel.points:
            spec = RunSpec(
                system=system,
                dataset=panel.dataset,
                num_requests=p.num_requests,
                rate=p.rate,
                batch_size=panel.batch_size,
                preset=panel.preset,
                arrival=panel.arrival,
                cv=p.cv,
                io_ratio_scale=p.io_ratio_scale,
                seed=seed,
                dataset_path=dataset_path,
                log_group=_log_group(panel, p),
                log_batch_size=panel.log_batch_size,
            )
            out.append((system.label, p, spec))
    return out


def _log_group(panel: Panel, p: Point) -> str:
    if panel.x == "io_ratio_scale":
        return f"{panel.log_group}-x{p.io_ratio_scale:g}"
    return panel.log_group


def figure_specs(fig: FigureDef, **kw) -> list[RunSpec]:
    return [spec for panel in fig.panels for _, _, spec in panel_specs(panel, **kw)]


@dataclass
class Curve:
    system: str
    display: str
    xs: list[float] = field(default_factory=list)
    metrics: list[dict | None] = field(default_factory=list)
    num_requests: list[int] = field(default_factory=list)

    def values(self, key: str) -> list[float | None]:
        out = []
        for m in self.metrics:
            v = None if m is None else m.get(key)
            out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
        return out


@dataclass
class PanelData:
    panel: Panel
    curves: dict[str, Curve]


@dataclass
class FigureData:
    fig: FigureDef
    panels: list[PanelData]


def figure_data(fig: FigureDef, lookup: Callable[[RunSpec], dict | None], **kw) -> FigureData:
    panels = []
    for panel in fig.panels:
        curves: dict[str, Curve] = {}
        for label, p, spec in panel_specs(panel, **kw):
            c = curves.setdefault(label, Curve(label, spec.system.display))
            c.xs.append(p.io_ratio_scale if panel.x == "io_ratio_scale" else p.rate)
            c.metrics.append(lookup(spec))
            c.num_requests.append(p.num_requests)
        panels.append(PanelData(panel, curves))
    return FigureData(fig, panels)


def curve_capacity(curve: Curve, metric: str, slo: float, *, attainment: bool = False) -> float | None:
    """Capacity of one rate curve: rate of the first upward SLO crossing (``None``: already over at the lowest
    rate; ``inf``: never crosses in the measured range; NaN: no successful run)."""
    from .metrics import capacity_at_slo, rate_where_attainment_falls_below

    values = curve.values(metric)
    if not any(v is not None for v in values):
        return math.nan  # no successful run on this curve
    if attainment:
        return rate_where_attainment_falls_below(curve.xs, values, level=slo)
    return capacity_at_slo(curve.xs, values, slo)


def capacities(data: PanelData, slo: float | None = None) -> dict[str, float | None]:
    """Capacity of every system in a rate panel, at ``slo`` (default: the panel's)."""
    panel = data.panel
    level = panel.slo if slo is None else slo
    if panel.x != "rate" or level is None:
        return {}
    attainment = panel.metric.startswith("slo_")
    return {k: curve_capacity(c, panel.metric, level, attainment=attainment) for k, c in data.curves.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b for capacities; ``None`` when either is unknown or not finite."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a <= 0 or b <= 0:
        return None
    return a / b


def bounds(cap: float | None, curve: Curve) -> tuple[float, float] | None:
    """(low, high) bounds of a capacity: itself when known, else what the measured range implies
    (above range: > the highest rate; below range: < the lowest); ``None`` without data."""
    if cap is None:
        return (0.0, min(curve.xs))
    if math.isnan(cap):
        return None
    if math.isinf(cap):
        return (max(curve.xs), math.inf)
    return (cap, cap)


def ratio_text(a: float | None, a_curve: Curve, b: float | None, b_curve: Curve) -> str:
    """``a / b`` as text; a bound (``> 3.2``, ``< 0.5``) when a capacity lies outside its measured range."""
    ba, bb = bounds(a, a_curve), bounds(b, b_curve)
    if ba is None or bb is None:
        return "-"
    (alo, ahi), (blo, bhi) = ba, bb
    lo = alo / bhi if bhi > 0 else math.inf
    hi = ahi / blo if blo > 0 else math.inf
    if lo == hi:
        return f"{lo:.3g}"
    if math.isinf(hi) and lo > 0:
        return f"> {lo:.3g}"
    if lo == 0 and math.isfinite(hi):
        return f"< {hi:.3g}"
    return "-"


def fmt_capacity(c: float | None, curve: Curve | None = None) -> str:
    """A capacity as text; outside the measured range, the bound it implies (needs ``curve``)."""
    if c is None:
        return f"< {min(curve.xs):g} (below range)" if curve is not None and curve.xs else "below range"
    if math.isnan(c):
        return "no data"
    if math.isinf(c):
        return f"> {max(curve.xs):g} (above range)" if curve is not None and curve.xs else "above range"
    return f"{c:.2f}"
