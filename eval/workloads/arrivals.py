"""Arrival processes: Poisson, Gamma (with a CV for burstiness), uniform, and replay of a trace file.

Times follow the artifact's client: the first request arrives at t = 0 and request k at the sum of the first k
gaps. Gaps are drawn as ``scale * standard_gamma(shape)``, so for one seed ``poisson`` equals ``gamma`` with
cv = 1, and the arrival times at rate r are exactly the times at rate 1 divided by r (common random numbers
across a rate sweep).

Trace files (``arrival="trace"``) hold arrival times in seconds and, optionally, lengths:

- CSV with a header row: ``arrival_time`` (required) and ``prompt_len``, ``output_len`` (optional, both or
  neither); blank lines and lines starting with ``#`` are skipped.
- JSON: a list of numbers (arrival times), or a list of objects with the same keys as the CSV columns.

Times must be finite, >= 0 and non-decreasing; lengths integers >= 1. Errors name the file and the row.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_TIME = "arrival_time"
TRACE_LENGTHS = ("prompt_len", "output_len")
_MAX_LEN = 2**62  # far beyond any model length; keeps every length and sum inside int64


@dataclass(frozen=True)
class Trace:
    """A parsed trace file."""

    path: str
    times: np.ndarray  # [num_rows] float64 seconds, non-decreasing
    prompt_lens: np.ndarray | None  # [num_rows] int64, or None when the trace carries no lengths
    output_lens: np.ndarray | None  # [num_rows] int64


def gamma_gaps(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` inter-arrival gaps [n] float64 ~ Gamma(shape 1/cv^2, scale cv^2/rate): mean 1/rate, CV ``cv``."""
    shape = 1.0 / (cv * cv)
    return rng.standard_gamma(shape, size=n) * (cv * cv / rate)


def process_arrivals(arrival: str, n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times [n] float64 of a synthetic process (``poisson``, ``gamma`` or ``uniform``), first at 0."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # overflow is reported below
        if arrival == "poisson":
            gaps = gamma_gaps(n - 1, rate, 1.0, rng)
        elif arrival == "gamma":
            gaps = gamma_gaps(n - 1, rate, cv, rng)
        elif arrival == "uniform":
            gaps = np.full(n - 1, 1.0 / rate)
        else:
            raise ValueError(f"arrival process {arrival!r} has no generator (expected poisson, gamma or uniform)")
        times = np.concatenate([[0.0], np.cumsum(gaps)])
    _check_finite(times, f"the {arrival} process at rate={rate!r}, cv={cv!r}")
    return times


def _check_finite(times: np.ndarray,  # [n] float64
                  source: str) -> None:
    """Extreme rates or CVs overflow float64; NaN or inf times would stall any executor, so they are an error."""
    if not np.isfinite(times).all():
        raise ValueError(f"non-finite arrival times from {source}: the gaps overflow float64; use a less extreme "
                         f"rate or cv")


def trace_arrivals(trace: Trace, n: int, rate: float, rescale: bool) -> np.ndarray:
    """The first ``n`` trace times [n], shifted to start at 0 and, if ``rescale``, stretched to mean rate ``rate``.

    The mean rate of n arrivals is (n - 1) / (t[n-1] - t[0]); rescaling multiplies every gap by that rate / ``rate``,
    which keeps the trace's burst pattern (its gap CV) and sets its load.
    """
    if trace.times.size < n:
        raise ValueError(f"trace {trace.path} has {trace.times.size} rows, fewer than num_requests={n}")
    times = trace.times[:n] - trace.times[0]
    if rescale and n > 1:
        span = float(times[-1])
        if span <= 0:
            raise ValueError(f"trace {trace.path}: the first {n} arrivals share one time, so they cannot be "
                             f"rescaled to a rate; set trace_rescale=False to replay them as-is")
        with np.errstate(over="ignore", invalid="ignore"):
            times = times * (((n - 1) / span) / rate)
        _check_finite(times, f"trace {trace.path} rescaled to rate={rate!r}")
    return times


def _parse_time(path: Path, row: int, value: object) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"trace {path}: row {row}: {TRACE_TIME} {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(t) or t < 0:
        raise ValueError(f"trace {path}: row {row}: {TRACE_TIME} must be finite and >= 0, got {value!r}")
    return t


def _parse_len(path: Path, row: int, key: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"trace {path}: row {row}: {key} must be an integer >= 1, got {value!r}")
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"trace {path}: row {row}: {key} {value!r} is not a number") from None
    if not math.isfinite(f) or f != int(f) or f < 1:
        raise ValueError(f"trace {path}: row {row}: {key} must be an integer >= 1, got {value!r}")
    if f >= _MAX_LEN:
        raise ValueError(f"trace {path}: row {row}: {key} {value!r} is too large (lengths are int64 token counts)")
    return int(f)


def _rows_from_csv(path: Path, text: str) -> list[dict]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"trace {path} is empty")
    reader = csv.DictReader(lines)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if TRACE_TIME not in header:
        raise ValueError(f"trace {path}: the CSV header must name a '{TRACE_TIME}' column, got {header}")
    rows = []
    for i, raw in enumerate(reader):
        if None in raw:
            raise ValueError(f"trace {path}: row {i} has more fields than the header")
        rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items()})
    return rows


def _rows_from_json(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"trace {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"trace {path}: expected a JSON list of times or of objects, got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            rows.append(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            rows.append({TRACE_TIME: item})
        else:
            raise ValueError(f"trace {path}: row {i} must be a number or an object, got {item!r}")
    return rows


def _has_lengths(row: dict) -> list[bool]:
    return [k in row and row[k] not in (None, "") for k in TRACE_LENGTHS]


def read_trace(path: str | Path) -> Trace:
    """Parse and validate a CSV or JSON trace file (JSON if the name ends in .json, CSV otherwise)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"trace {p} is a directory, not a trace file")
    if not p.is_file():
        raise FileNotFoundError(f"trace file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"trace {p} is not UTF-8 text: {exc}") from None
    rows = _rows_from_json(p, text) if p.suffix.lower() == ".json" else _rows_from_csv(p, text)
    if not rows:
        raise ValueError(f"trace {p} has no rows")
    has = _has_lengths(rows[0])
    if has[0] != has[1]:
        raise ValueError(f"trace {p}: give both {TRACE_LENGTHS[0]} and {TRACE_LENGTHS[1]}, or neither")
    times, prompts, outputs = [], [], []
    names = "/".join(TRACE_LENGTHS)
    for i, row in enumerate(rows):
        if TRACE_TIME not in row:
            raise ValueError(f"trace {p}: row {i} has no {TRACE_TIME}")
        if not has[0] and any(_has_lengths(row)):  # lengths on a later row only: they would be ignored
            raise ValueError(f"trace {p}: row {i} gives {names} but row 0 does not; give them on every row or none")
        if has[0] and not any(_has_lengths(row)):
            raise ValueError(f"trace {p}: row {i} has no {names} but row 0 does; give them on every row or none")
        t = _parse_time(p, i, row[TRACE_TIME])
        if times and t < times[-1]:
            raise ValueError(f"trace {p}: row {i}: {TRACE_TIME} {t} is earlier than the previous row's "
                             f"{times[-1]}; rows must be sorted by time")
        times.append(t)
        if has[0]:
            prompts.append(_parse_len(p, i, TRACE_LENGTHS[0], row.get(TRACE_LENGTHS[0])))
            outputs.append(_parse_len(p, i, TRACE_LENGTHS[1], row.get(TRACE_LENGTHS[1])))
    as_int = (lambda xs: np.asarray(xs, dtype=np.int64)) if has[0] else (lambda xs: None)
    return Trace(str(p), np.asarray(times, dtype=np.float64), as_int(prompts), as_int(outputs))
