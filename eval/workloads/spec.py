"""What a workload is: ``WorkloadSpec`` (dataset, request count, arrival process, transforms) and its options.

A spec is a frozen, self-validating value: every field is checked in ``__post_init__`` and a bad value raises
``ValueError`` naming the field (``WorkloadSpec.rate must be > 0, got 0``). ``eval.workloads.generate`` turns a
spec plus a seed into requests; nothing here draws random numbers or reads files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

DATASETS = ("sharegpt", "alpaca", "synthetic")
ARRIVALS = ("poisson", "gamma", "uniform", "trace")
DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "zipf")


def _positive_finite(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def _positive_int(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be an integer > 0, got {value!r}")


@dataclass(frozen=True)
class SyntheticLengths:
    """Synthetic prompt and output lengths: one distribution family, parametrized by its mean.

    Every family is set by the mean length of prompts and of outputs, so the Fig 16 ratio sweep and a mean-matched
    comparison across families need nothing else. Lengths are integers clipped to ``[min_len, max_len]``; pairs
    beyond the spec's ``max_prompt_len`` / ``max_total_len`` are then redrawn.

    - ``fixed``: every prompt is ``round(prompt_mean)`` tokens, every output ``round(output_mean)``.
    - ``uniform``: integers uniform on ``[min_len, 2 * mean - min_len]`` (mean = ``mean``).
    - ``lognormal``: ``round(exp(N(mu, sigma)))`` with ``mu = ln(mean) - sigma**2 / 2`` (so the unclipped mean is
      ``mean``); ``sigma`` sets the spread (1.0 is about ShareGPT's long tail).
    - ``zipf``: ``P(k) ~ k**-alpha`` on ``k = min_len..K``, with the smallest ``K <= max_len`` whose mean reaches
      ``mean`` (a bounded Zipf; heavy head of short requests, a few long ones).
    """

    distribution: str = "fixed"
    prompt_mean: float = 128.0
    output_mean: float = 128.0
    sigma: float = 1.0  # lognormal: standard deviation of log(length)
    alpha: float = 1.2  # zipf exponent
    min_len: int = 1
    max_len: int = 2048

    def __post_init__(self) -> None:
        owner = "SyntheticLengths"
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"{owner}.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        _positive_finite(owner, "prompt_mean", self.prompt_mean)
        _positive_finite(owner, "output_mean", self.output_mean)
        _positive_finite(owner, "sigma", self.sigma)
        _positive_finite(owner, "alpha", self.alpha)
        _positive_int(owner, "min_len", self.min_len)
        _positive_int(owner, "max_len", self.max_len)
        if self.max_len < self.min_len:
            raise ValueError(f"{owner}.max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        for name in ("prompt_mean", "output_mean"):
            mean = getattr(self, name)
            if not self.min_len <= mean <= self.max_len:
                raise ValueError(f"{owner}.{name} ({mean}) must lie in [min_len, max_len] = "
                                 f"[{self.min_len}, {self.max_len}]")
            if self.distribution == "uniform" and 2 * mean - self.min_len > self.max_len:
                raise ValueError(f"{owner}.{name} ({mean}) is too large for a uniform distribution on "
                                 f"[min_len, 2*mean-min_len] within max_len={self.max_len}")


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: which lengths, how many requests, and when they arrive.

    - ``dataset``: ``sharegpt`` / ``alpaca`` (lengths from the built-in profile, or from ``dataset_path`` tokenized
      with ``tokenizer``), or ``synthetic`` (lengths from ``synthetic``).
    - ``arrival``: ``poisson`` (exponential gaps at ``rate``), ``gamma`` (gaps ~ Gamma(shape 1/cv^2, scale
      cv^2/rate): mean 1/rate, coefficient of variation ``cv``), ``uniform`` (evenly spaced, gap 1/rate, as the
      artifact's "uniform" process), ``trace`` (the arrival times of ``trace_path``; see ``eval.workloads.arrivals``).
    - ``io_ratio_scale``: multiply every request's prompt/output length ratio by this factor while keeping its
      total tokens (prompt + output); see ``eval.workloads.synthetic.scale_io_ratio``. 1.0 = unchanged.
    - ``max_prompt_len`` / ``max_total_len``: the artifact's filter (drop prompt > 1024 or prompt + output > 2048).
    """

    dataset: str = "sharegpt"
    num_requests: int = 100
    rate: float = 1.0  # requests per second
    arrival: str = "poisson"
    cv: float = 1.0  # gamma burstiness; 1.0 is Poisson
    dataset_path: str | None = None  # None = the built-in length profile
    tokenizer: str | None = None  # None = the embedded SmolLM2 GGUF tokenizer
    synthetic: SyntheticLengths | None = None  # required (and only allowed) for dataset="synthetic"
    io_ratio_scale: float = 1.0
    trace_path: str | None = None  # required (and only allowed) for arrival="trace"
    trace_rescale: bool = True  # scale trace times so its mean rate equals ``rate``; False replays them as-is
    max_prompt_len: int = 1024
    max_total_len: int = 2048

    def __post_init__(self) -> None:
        owner = "WorkloadSpec"
        if self.dataset not in DATASETS:
            raise ValueError(f"{owner}.dataset must be one of {DATASETS}, got {self.dataset!r}")
        _positive_int(owner, "num_requests", self.num_requests)
        _positive_finite(owner, "rate", self.rate)
        if self.arrival not in ARRIVALS:
            raise ValueError(f"{owner}.arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        _positive_finite(owner, "cv", self.cv)
        if self.arrival != "gamma" and self.cv != 1.0:
            raise ValueError(f"{owner}.cv={self.cv} only applies to arrival='gamma' (arrival is {self.arrival!r})")
        _positive_finite(owner, "io_ratio_scale", self.io_ratio_scale)
        _positive_int(owner, "max_prompt_len", self.max_prompt_len)
        _positive_int(owner, "max_total_len", self.max_total_len)
        if self.max_total_len < 2:
            raise ValueError(f"{owner}.max_total_len must be >= 2 (one prompt and one output token), "
                             f"got {self.max_total_len}")
        if self.dataset == "synthetic":
            if not isinstance(self.synthetic, SyntheticLengths):
                raise ValueError(f"{owner}.synthetic must be a SyntheticLengths for dataset='synthetic', "
                                 f"got {self.synthetic!r}")
            if self.dataset_path is not None:
                raise ValueError(f"{owner}.dataset_path must be None for dataset='synthetic'")
        elif self.synthetic is not None:
            raise ValueError(f"{owner}.synthetic is only used with dataset='synthetic' (dataset is {self.dataset!r})")
        if self.tokenizer is not None and self.dataset_path is None:
            raise ValueError(f"{owner}.tokenizer only applies with dataset_path (the built-in profiles were "
                             f"tokenized with the embedded SmolLM2 tokenizer)")
        for name in ("dataset_path", "tokenizer", "trace_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{owner}.{name} must be a path (str or os.PathLike) or None, got {value!r}")
        if not isinstance(self.trace_rescale, bool):
            raise ValueError(f"{owner}.trace_rescale must be True or False, got {self.trace_rescale!r}")
        if self.arrival == "trace":
            if not self.trace_path:
                raise ValueError(f"{owner}.trace_path is required for arrival='trace'")
        elif self.trace_path is not None:
            raise ValueError(f"{owner}.trace_path is only used with arrival='trace' (arrival is {self.arrival!r})")
