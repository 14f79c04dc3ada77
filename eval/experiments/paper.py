"""The paper's and the artifact's published numbers that the report puts beside ours.

``load_paper_numbers()`` reads ``<repo>/../shared/paper_numbers.json`` when it exists (the project's shared
copy) and otherwise the copy shipped in this package (``paper_numbers.json``, same content plus a
``_source`` note), so a user's machine needs nothing outside the project. ``paper_capacities(fig_id,
panel_key)`` maps a figure panel to ``{source: {system: capacity}}`` with the metric it was read at.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PACKAGE_COPY = Path(__file__).with_name("paper_numbers.json")
SHARED_COPY = Path(__file__).resolve().parents[2].parent / "shared" / "paper_numbers.json"


@lru_cache(maxsize=None)
def load_paper_numbers() -> dict:
    for path in (SHARED_COPY, PACKAGE_COPY):
        if path.is_file():
            with open(path) as fh:
                data = json.load(fh)
            data.setdefault("_loaded_from", str(path))
            return data
    raise FileNotFoundError(f"paper numbers not found at {SHARED_COPY} or {PACKAGE_COPY}")


def paper_capacities(fig_id: str, panel_key: str) -> dict:
    """``{"slo": float | None, "note": str, "sources": {source: {system: value}}}`` for a panel, or {} if the
    paper gives no number for it. Values are capacities in req/s (Fig 13: rates where attainment falls below
    95%)."""
    d = load_paper_numbers()
    if fig_id in ("11", "18", "hazards") and panel_key in ("sharegpt", "alpaca"):
        entry = d["fig11_mean_norm_latency_slo_0.3"][panel_key]
        sources = {k: dict(v) for k, v in entry.items()}
        if fig_id == "18":
            extra = d["fig18_chunked_prefill_slo_0.3"].get(f"{panel_key}_artifact", {})
            sources["artifact"] = {**sources.get("artifact", {}), **extra}
            return {"slo": 0.3, "note": d["fig18_chunked_prefill_slo_0.3"]["_paper_note"], "sources": sources}
        return {"slo": 0.3, "note": "", "sources": sources}
    if fig_id == "12":
        return {"slo": 0.3, "note": "", "sources": dict(d["fig12_p95_norm_latency_slo_0.3"]["sharegpt"])}
    if fig_id == "13":
        entry = d["fig13_rate_where_attainment_falls_below_95pct"]["sharegpt_artifact"].get(panel_key)
        return {"slo": 0.95, "note": "rate where attainment falls below 95%", "sources": {"artifact": entry}} if entry else {}
    if fig_id == "14":
        entry = d["fig14_large_batch_sharegpt"].get(f"{panel_key}_paper")
        return {"slo": 0.25, "note": d["fig14_large_batch_sharegpt"]["_note"], "sources": {"paper": entry}} if entry else {}
    if fig_id == "15":
        f15 = d["fig15_gqa_llama3_8b"]
        sources = {}
        if f"{panel_key}_paper" in f15:
            sources["paper (at 0.25)"] = f15[f"{panel_key}_paper"]
        if f"{panel_key}_artifact" in f15:
            sources["artifact"] = f15[f"{panel_key}_artifact"]
        return {"slo": 0.3, "note": f15["_note"], "sources": sources} if sources else {}
    if fig_id == "17":
        paper = d["fig17_kv_ablation_sharegpt_slo_0.3"]["paper"]
        mapped = {
            "fastserve": paper["proactive"],
            "fastserve-reactive": paper["reactive"],
            "fastserve-recompute": paper["recompute"],
        }
        return {"slo": 0.3, "note": "", "sources": {"paper": mapped}}
    return {}


def paper_breakdown() -> dict:
    """Fig 17's proactive time breakdown: ``{"columns": [...], "rows": [[rate, q%, s%, e%], ...]}``."""
    entry = load_paper_numbers()["fig17_kv_ablation_sharegpt_slo_0.3"]["proactive_time_breakdown_pct"]
    return {"columns": entry["_columns"], "rows": entry["rows"]}
