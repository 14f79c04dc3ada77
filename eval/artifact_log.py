"""Client logs in the FastServe artifact's format, so the artifact's own plotting scripts can read our runs.

What the artifact's scripts parse (``benchmarks/artifact-evaluation/*/fig*.py`` and ``lib.py`` in
LLMServe/FastServe): they list a directory, keep files that start with ``exp-<system>-<dataset>`` and end with
``-client-log``, strip both, and ``split("-")`` the middle into ``<n>-<rate>`` (Fig 14: ``<n>-<rate>-bs=<B>``),
read with ``int`` and ``float``. In each file they take the **first line that starts with** ``[(``, ``eval`` it,
and read every tuple as ``(prompt_len, output_len, latency, start_ts, end_ts[, first_token_ts])`` (a 5-tuple
means no first-token time; they then use the start time). They compute normalized latency as
(end - start) / output_len and TTFT as first_token - start. A file with no ``[(`` line is skipped with a warning.

So our logs hold, in this order: a ``#`` header line, the caller's ``extra_lines``, the result line (the repr
of the finished requests' 6-tuples in finish order, plain Python ints and floats; ``[]`` when none finished),
then two jserve lines the artifact ignores: ``jserve-detail: [(request_id, queued_s, swapping_s, executing_s,
num_preemptions), ...]`` aligned with the result tuples, and ``jserve-unfinished: [(request_id, prompt_len,
output_len, arrival, first_token_or_None, rejected_reason_or_None), ...]``. Our times are seconds on the run's
clock (first arrival at 0), not wall-clock epochs; the scripts only take differences. We read logs with
``ast.literal_eval``, never ``eval``; malformed logs raise ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.records import RequestRecord

LOG_PREFIX = "exp-"
LOG_SUFFIX = "-client-log"
DETAIL_KEY = "jserve-detail: "
UNFINISHED_KEY = "jserve-unfinished: "
RUN_KEY = "jserve-run: "  # the run's settings as JSON (written by eval.runner)
MAX_NAME_BYTES = 255  # longest file name on common file systems (ext4, xfs, APFS, NTFS)


def format_rate(rate: float) -> str:
    """The rate as it appears in file names: shortest positional decimal, no exponent ("1", "0.1", "2.25")."""
    r = float(rate)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"log rate must be a finite number > 0, got {rate!r}")
    return np.format_float_positional(r, trim="-")


@dataclass(frozen=True)
class LogName:
    system: str
    dataset: str
    num_requests: int
    rate: float
    batch_size: int | None = None


def log_filename(system: str, dataset: str, n: int, rate: float, batch_size: int | None = None) -> str:
    """``exp-<system>-<dataset>-<n>-<rate>[-bs=<B>]-client-log`` (the artifact's names).

    ``system`` may contain dashes (``fixed-priority``); ``dataset`` may not (the middle of the name is split on
    dashes). Neither may contain a path separator or whitespace.
    """
    for field_name, value in (("system", system), ("dataset", dataset)):
        if not isinstance(value, str) or not value or any(c in value for c in "/\\ \t\n") or value.strip("-") != value:
            raise ValueError(f"log_filename: {field_name} {value!r} must be a non-empty name without path "
                             f"separators, whitespace or leading/trailing dashes")
    if "-" in dataset:
        raise ValueError(f"log_filename: dataset {dataset!r} must not contain '-' (the artifact splits on it)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"log_filename: n must be an integer > 0, got {n!r}")
    bs = ""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"log_filename: batch_size must be an integer > 0 or None, got {batch_size!r}")
        bs = f"-bs={int(batch_size)}"
    name = f"{LOG_PREFIX}{system}-{dataset}-{int(n)}-{format_rate(rate)}{bs}{LOG_SUFFIX}"
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"log_filename: the name would be {len(name.encode())} bytes, over the {MAX_NAME_BYTES} "
                         f"that file systems allow (rate {rate!r} prints as {len(format_rate(rate))} digits)")
    return name


def parse_log_filename(name: str) -> LogName:
    """Inverse of ``log_filename`` (reads the parts from the right, so system names may contain dashes)."""
    base = os.path.basename(name)
    if not (base.startswith(LOG_PREFIX) and base.endswith(LOG_SUFFIX)):
        raise ValueError(f"{name!r} is not a client log name (exp-<system>-<dataset>-<n>-<rate>[-bs=<B>]-client-log)")
    parts = base[len(LOG_PREFIX):-len(LOG_SUFFIX)].split("-")
    batch_size = None
    try:
        if parts and parts[-1].startswith("bs="):
            batch_size = int(parts.pop()[3:])
        rate = float(parts.pop())
        n = int(parts.pop())
        dataset = parts.pop()
    except (ValueError, IndexError):
        raise ValueError(f"{name!r}: cannot read <dataset>-<n>-<rate>[-bs=<B>] from the name") from None
    system = "-".join(parts)
    if not system or not dataset:
        raise ValueError(f"{name!r}: missing system or dataset in the name")
    if n <= 0 or not (math.isfinite(rate) and rate > 0) or (batch_size is not None and batch_size <= 0):
        raise ValueError(f"{name!r}: n, rate and batch size must be > 0 and finite (as log_filename writes them)")
    return LogName(system, dataset, n, rate, batch_size)


def _finished_tuple(r: RequestRecord) -> tuple:
    if r.first_token_time is None:
        raise ValueError(f"write_client_log: request {r.request_id} finished without a first-token time")
    values = (float(r.latency), float(r.arrival_time), float(r.finish_time), float(r.first_token_time))
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"write_client_log: request {r.request_id} has a non-finite time {values}")
    lat, start, end, first = values
    return (int(r.prompt_len), int(r.output_len), lat, start, end, first)


def write_client_log(path: str | os.PathLike, records: Sequence[RequestRecord], extra_lines: Iterable[str] = ()) -> None:
    """Write ``records`` as an artifact-format client log (layout in the module docstring)."""
    extra = list(extra_lines)
    for i, line in enumerate(extra):
        if not isinstance(line, str) or "\n" in line or "\r" in line:
            raise ValueError(f"write_client_log: extra_lines[{i}] must be one line of text, got {line!r}")
        if line.startswith(("[(", "[]", DETAIL_KEY.strip(), UNFINISHED_KEY.strip())):
            raise ValueError(f"write_client_log: extra_lines[{i}] starts with a reserved marker: {line[:20]!r}")
    finished = sorted((r for r in records if r.finished), key=lambda r: (r.finish_time, r.request_id))
    unfinished = sorted((r for r in records if not r.finished), key=lambda r: r.request_id)
    results = [_finished_tuple(r) for r in finished]
    detail = [(int(r.request_id), float(r.queued_time), float(r.swapping_time), float(r.executing_time),
               int(r.num_preemptions)) for r in finished]
    pending = [(int(r.request_id), int(r.prompt_len), int(r.output_len), float(r.arrival_time),
                None if r.first_token_time is None else float(r.first_token_time), r.rejected_reason)
               for r in unfinished]
    lines = [f"# jserve client log (FastServe artifact format): {len(records)} requests, {len(finished)} finished, "
             f"{len(unfinished)} unfinished or rejected",
             *extra, repr(results), DETAIL_KEY + repr(detail), UNFINISHED_KEY + repr(pending)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _literal(path: Path, lineno: int, text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{path}:{lineno}: cannot parse the line as a Python literal: {exc}") from None


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_lines(path: str | os.PathLike) -> tuple[Path, list[str]]:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"client log {p} is a directory, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"client log {p} does not exist" + (" (a dangling link)" if p.is_symlink() else ""))
    try:
        return p, p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"client log {p} is not UTF-8 text: {exc}") from None


def _result_line(p: Path, lines: list[str]) -> tuple[int, list]:
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("[(") or line.strip() == "[]":
            value = _literal(p, lineno, line.strip())
            if not isinstance(value, list):
                raise ValueError(f"{p}:{lineno}: the result line must hold a list of tuples")
            for i, item in enumerate(value):
                if not (isinstance(item, tuple) and len(item) in (5, 6) and all(_is_number(v) for v in item)):
                    raise ValueError(f"{p}:{lineno}: entry {i} must be a tuple of 5 or 6 finite numbers "
                                     f"(prompt_len, output_len, latency, start_ts, end_ts[, first_token_ts]), "
                                     f"got {item!r}")
                if not (isinstance(item[0], int) and isinstance(item[1], int) and item[1] > 0 and item[0] >= 0):
                    raise ValueError(f"{p}:{lineno}: entry {i}: prompt_len and output_len must be integers "
                                     f"(output_len > 0), got {item[:2]!r}")
                start, end = item[3], item[4]
                first = item[5] if len(item) == 6 else start
                if not start <= first <= end:
                    raise ValueError(f"{p}:{lineno}: entry {i}: the times must satisfy start_ts <= first_token_ts "
                                     f"<= end_ts, got start {start!r}, first token {first!r}, end {end!r}")
            return lineno, value
    raise ValueError(f"{p}: no result line (a line starting with '[(' or equal to '[]')")


def read_client_log(path: str | os.PathLike) -> list[tuple]:
    """The result tuples of a client log, as written (5- or 6-tuples; ours are always 6)."""
    p, lines = _read_lines(path)
    return _result_line(p, lines)[1]


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _detail_ok(t: tuple) -> bool:
    rid, queued, swapping, executing, preemptions = t
    return (_is_count(rid) and all(_is_number(v) and v >= 0 for v in (queued, swapping, executing))
            and _is_count(preemptions))


def _unfinished_ok(t: tuple) -> bool:
    rid, prompt_len, output_len, arrival, first, reason = t
    return (_is_count(rid) and _is_count(prompt_len) and _is_count(output_len) and _is_number(arrival)
            and arrival >= 0 and (first is None or (_is_number(first) and first >= arrival))
            and (reason is None or isinstance(reason, str)))


# key -> (arity, per-entry check, the entry's fields for error messages)
_KEYED = {
    DETAIL_KEY: (5, _detail_ok, "(request_id, queued_s, swapping_s, executing_s, num_preemptions): ids and counts "
                                "integers >= 0, times finite and >= 0"),
    UNFINISHED_KEY: (6, _unfinished_ok, "(request_id, prompt_len, output_len, arrival, first_token_or_None, "
                                        "reason_or_None): integers >= 0, a finite arrival >= 0, a first token "
                                        "not before it, a string reason"),
}


def _keyed_line(p: Path, lines: list[str], key: str) -> tuple[int, list] | None:
    arity, ok, fields = _KEYED[key]
    for lineno, line in enumerate(lines, start=1):
        if line.startswith(key):
            value = _literal(p, lineno, line[len(key):].strip())
            if not isinstance(value, list) or any(not isinstance(t, tuple) or len(t) != arity for t in value):
                raise ValueError(f"{p}:{lineno}: '{key.strip()}' must hold a list of {arity}-tuples")
            for i, t in enumerate(value):
                if not ok(t):
                    raise ValueError(f"{p}:{lineno}: {key.strip().rstrip(':')} entry {i} must be {fields}; got {t!r}")
            return lineno, value
    return None


def read_run_header(path: str | os.PathLike) -> dict | None:
    """The settings a jserve run wrote into its log (the ``jserve-run:`` line: system, workload, hardware,
    seed, backend); None for a log without one (the artifact's own)."""
    p, lines = _read_lines(path)
    for lineno, line in enumerate(lines, start=1):
        if line.startswith(RUN_KEY):
            try:
                header = json.loads(line[len(RUN_KEY):])
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{p}:{lineno}: the {RUN_KEY.strip()} line is not a JSON object: {exc}") from None
            if not isinstance(header, dict):
                raise ValueError(f"{p}:{lineno}: the {RUN_KEY.strip()} line is not a JSON object")
            return header
    return None


def records_from_client_log(path: str | os.PathLike) -> list[RequestRecord]:
    """Rebuild ``RequestRecord``s from a client log (ours or the artifact's), sorted by request id.

    Without a ``jserve-detail`` line (an artifact log) the ids are the result order and the time breakdown is 0;
    a 5-tuple's first-token time is its start time, as the artifact's scripts assume.
    """
    p, lines = _read_lines(path)
    lineno, results = _result_line(p, lines)
    detail = _keyed_line(p, lines, DETAIL_KEY)
    if detail is not None and len(detail[1]) != len(results):
        raise ValueError(f"{p}:{detail[0]}: jserve-detail has {len(detail[1])} entries but the result line "
                         f"(line {lineno}) has {len(results)}")
    out = []
    for i, item in enumerate(results):
        prompt_len, output_len, _latency, start, end = item[:5]
        first = item[5] if len(item) == 6 else start
        rid, queued, swapping, executing, preemptions = detail[1][i] if detail else (i, 0.0, 0.0, 0.0, 0)
        out.append(RequestRecord(request_id=rid, prompt_len=prompt_len, output_len=output_len, arrival_time=start,
                                 first_token_time=first, finish_time=end, queued_time=queued,
                                 swapping_time=swapping, executing_time=executing, num_preemptions=preemptions))
    pending = _keyed_line(p, lines, UNFINISHED_KEY)
    for rid, prompt_len, output_len, arrival, first, reason in (pending[1] if pending else []):
        out.append(RequestRecord(request_id=rid, prompt_len=prompt_len, output_len=output_len, arrival_time=arrival,
                                 first_token_time=first, rejected_reason=reason))
    ids = [r.request_id for r in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{p}: request ids repeat across the result and jserve lines")
    return sorted(out, key=lambda r: r.request_id)
