"""Serving metrics of one engine: request counters and latency histograms observed as requests finish,
gauges set after each iteration, and the engine's own counters (``LLMEngine.stats``), rendered in the
Prometheus text format (the server's ``GET /metrics``) or as a dict.

Names follow vLLM's where vLLM has the same quantity (``jserve:`` for ``vllm:``), so dashboards built for
it need only the prefix changed; the FastServe paper's own metric, latency normalized by output length, is
``jserve:normalized_latency_seconds``. Every time is on the engine clock (``RequestMetrics``).

Threading: the engine's thread observes and sets; any thread renders. One lock keeps each histogram's
buckets, sum and count consistent with each other.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Mapping

__all__ = ["Histogram", "EngineMetrics", "LATENCY_BUCKETS", "PER_TOKEN_BUCKETS", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: request latencies (vLLM's TTFT and end-to-end bounds, merged)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
# seconds per output token: time per output token and normalized latency
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    """Cumulative-bucket histogram (Prometheus' kind): ``counts[i]`` observations <= ``bounds[i]``, the last
    bucket +Inf."""

    def __init__(self, bounds: tuple[float, ...]):
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is (bounds[-1], +Inf]
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            total += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


_HISTOGRAMS = {  # name -> (help, bounds)
    "time_to_first_token_seconds": ("Time from arrival to the end of the step that sampled the first token.",
                                    LATENCY_BUCKETS),
    "e2e_request_latency_seconds": ("Time from arrival to finish, of requests that finished with stop or length.",
                                    LATENCY_BUCKETS),
    "request_queue_time_seconds": ("Time from arrival to the start of the first step the request ran in.",
                                   LATENCY_BUCKETS),
    "time_per_output_token_seconds": ("(finish - first token) / (output tokens - 1), of requests with 2 or more.",
                                      PER_TOKEN_BUCKETS),
    "normalized_latency_seconds": ("End-to-end latency / output tokens (the FastServe paper's metric).",
                                   PER_TOKEN_BUCKETS),
}

_GAUGES = {  # name -> help
    "num_requests_running": "Requests in the last step's batch.",
    "num_requests_waiting": "Live requests outside the last step's batch (queued, paused or swapped out).",
    "kv_cache_usage_perc": "Fraction of the device KV pages in use (0..1).",
    "host_kv_cache_usage_perc": "Fraction of the host (swap) KV pages in use (0..1).",
}

_STATS = {  # LLMEngine.stats key -> (metric name, help)
    "steps": ("iterations_total", "Engine iterations (steps and copies-only iterations)."),
    "compute_steps": ("compute_steps_total", "Iterations that ran a compiled step."),
    "blocks_out": ("kv_blocks_swapped_out_total", "KV pages copied from the device to the host."),
    "blocks_in": ("kv_blocks_swapped_in_total", "KV pages copied from the host to the device."),
    "drops": ("kv_recompute_drops_total", "Requests whose KV cache was dropped, to be recomputed."),
    "penalty_rebuilds": ("penalty_slot_rebuilds_total", "Penalty slots rebuilt from token ids."),
    "compiles_after_warmup": ("compiles_after_warmup", "XLA compilations after warm-up (0 while serving)."),
    "prefix_cache_queries": ("prefix_cache_queries_total",
                             "Tokens of requests that looked the prefix cache up as they (re)started."),
    "prefix_cache_hits": ("prefix_cache_hits_total", "Of those, tokens whose KV the prefix cache held."),
}


class EngineMetrics:
    """What the engine observes; ``render(stats)`` gives the Prometheus text, ``snapshot()`` a dict."""

    def __init__(self, prefix: str = "jserve:"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self.finished = dict.fromkeys(FINISH_REASONS, 0)  # requests by finish reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.histograms = {name: Histogram(bounds) for name, (_, bounds) in _HISTOGRAMS.items()}
        self.gauges = dict.fromkeys(_GAUGES, 0.0)

    def observe_finished(self, output) -> None:
        """Count a finished ``RequestOutput`` (once per request) and add its latencies to the histograms.
        Latencies are taken from requests that finished with ``stop`` or ``length``; aborted and refused
        ones count only in the counters."""
        m = output.metrics
        n = len(output.token_ids)
        reason = output.finish_reason if output.finish_reason in self.finished else "error"
        with self._lock:
            self.finished[reason] += 1
            self.prompt_tokens += len(output.prompt_token_ids) if reason != "error" else 0
            self.generation_tokens += n
            self.preemptions += m.num_preemptions if m else 0
            if m is None or reason not in ("stop", "length") or m.finish_time is None:
                return
            h = self.histograms
            latency = m.finish_time - m.arrival_time
            h["e2e_request_latency_seconds"].observe(latency)
            if m.first_scheduled_time is not None:
                h["request_queue_time_seconds"].observe(m.first_scheduled_time - m.arrival_time)
            if m.first_token_time is not None:
                h["time_to_first_token_seconds"].observe(m.first_token_time - m.arrival_time)
                if n >= 2:
                    h["time_per_output_token_seconds"].observe((m.finish_time - m.first_token_time) / (n - 1))
            if n >= 1:
                h["normalized_latency_seconds"].observe(latency / n)

    def set_gauges(self, running: int, waiting: int, device_used: int, device_total: int, host_used: int,
                   host_total: int) -> None:
        """The iteration's gauges (request counts and KV page use)."""
        gauges = {
            "num_requests_running": float(running),
            "num_requests_waiting": float(waiting),
            "kv_cache_usage_perc": device_used / device_total if device_total else 0.0,
            "host_kv_cache_usage_perc": host_used / host_total if host_total else 0.0,
        }
        with self._lock:
            self.gauges = gauges

    def snapshot(self, stats: Mapping[str, int] | None = None) -> dict:
        """Every value as plain Python data: counters, gauges, histograms (bounds, per-bucket counts, sum,
        count) and the engine's ``stats``."""
        with self._lock:
            return {
                "finished": dict(self.finished),
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "preemptions": self.preemptions,
                "gauges": dict(self.gauges),
                "histograms": {k: {"bounds": list(h.bounds), "counts": list(h.counts), "sum": h.sum,
                                   "count": h.count} for k, h in self.histograms.items()},
                "stats": dict(stats or {}),
            }

    def render(self, stats: Mapping[str, int] | None = None, labels: Mapping[str, str] | None = None) -> str:
        """The Prometheus text exposition (format 0.0.4). ``stats``: ``LLMEngine.stats``; ``labels`` are added
        to every sample (``model_name``, as vLLM does)."""
        p = self.prefix
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in (labels or {}).items())
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.append(f"# HELP {p}{name} {help_}")
            out.append(f"# TYPE {p}{name} {kind}")
            out.extend(p + _with_labels(s, lab) for s in samples)

        with self._lock:
            family("request_success_total", "counter", "Finished requests, by finish reason.",
                   [f'request_success_total{{finished_reason="{r}"}} {n}' for r, n in self.finished.items()])
            family("prompt_tokens_total", "counter", "Prompt tokens of finished requests (refused ones excluded).",
                   [f"prompt_tokens_total {self.prompt_tokens}"])
            family("generation_tokens_total", "counter", "Tokens generated by finished requests.",
                   [f"generation_tokens_total {self.generation_tokens}"])
            family("num_preemptions_total", "counter", "Times finished requests lost the device.",
                   [f"num_preemptions_total {self.preemptions}"])
            for name, help_ in _GAUGES.items():
                family(name, "gauge", help_, [f"{name} {self.gauges[name]!r}"])
            for name, (help_, _) in _HISTOGRAMS.items():
                family(name, "histogram", help_, self.histograms[name].lines(name))
        for key, (name, help_) in _STATS.items():
            if stats is not None and key in stats:
                kind = "gauge" if not name.endswith("_total") else "counter"
                family(name, kind, help_, [f"{name} {int(stats[key])}"])
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _with_labels(sample: str, labels: str) -> str:
    """``name{a="b"} v`` or ``name v`` with ``labels`` (``k="v",...``) added."""
    if not labels:
        return sample
    head, value = sample.rsplit(" ", 1)
    if head.endswith("}"):
        return f"{head[:-1]},{labels}}} {value}"
    return f"{head}{{{labels}}} {value}"
