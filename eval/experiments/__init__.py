"""Figure definitions for ``jserve-eval reproduce``: the systems, the sweeps, and the paper's numbers.

* ``systems``: ``SystemSpec`` and ``scheduler_config`` (the artifact's settings, pool sizes per server).
* ``figures``: ``FigureDef`` / ``Panel`` / ``Point`` for Figures 11-18, burstiness and the hazards check.
* ``paper``: the published capacities the report compares against.
"""

from .figures import (
    FIGURE_ORDER,
    FIGURES,
    SLO_PAIRS,
    FigureDef,
    Panel,
    Point,
    get_figures,
    quick_figure,
    slo_metric,
)
from .paper import load_paper_numbers, paper_breakdown, paper_capacities
from .systems import SYSTEMS, SystemSpec, get_system, scheduler_config, swap_space_gib

__all__ = [
    "FIGURE_ORDER",
    "FIGURES",
    "SLO_PAIRS",
    "FigureDef",
    "Panel",
    "Point",
    "get_figures",
    "quick_figure",
    "slo_metric",
    "load_paper_numbers",
    "paper_breakdown",
    "paper_capacities",
    "SYSTEMS",
    "SystemSpec",
    "get_system",
    "scheduler_config",
    "swap_space_gib",
]
