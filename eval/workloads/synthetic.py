"""Synthetic length generators (fixed, uniform, lognormal, zipf) and the Fig 16 input/output ratio transform.

Generators draw integers from the distributions that ``SyntheticLengths`` documents, each set by its mean.
``scale_io_ratio`` rewrites every (prompt, output) pair so that prompt/output is multiplied by a factor while the
request's total tokens stay the same (definition in its docstring).
"""

from __future__ import annotations

import math

import numpy as np

from eval.workloads.datasets import LengthPairs
from eval.workloads.spec import SyntheticLengths


def zipf_support_max(alpha: float, mean: float, min_len: int, max_len: int) -> int:
    """Smallest K in [min_len, max_len] such that Zipf(alpha) on min_len..K has mean >= ``mean``."""
    k = np.arange(min_len, max_len + 1, dtype=np.float64)
    means = np.cumsum(k ** (1.0 - alpha)) / np.cumsum(k ** -alpha)  # [max_len - min_len + 1]
    idx = int(np.searchsorted(means, mean - 1e-9))  # means grows with K
    if idx >= means.size:
        raise ValueError(f"SyntheticLengths: a Zipf(alpha={alpha}) on [{min_len}, {max_len}] reaches a mean of at "
                         f"most {means[-1]:.1f}, below the requested mean {mean}; lower alpha or raise max_len")
    return min_len + idx


def sample_lengths(syn: SyntheticLengths, mean: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` lengths [n] int64 from ``syn.distribution`` with the given mean, clipped to [min_len, max_len]."""
    kind = syn.distribution
    if kind == "fixed":
        x = np.full(n, math.floor(mean + 0.5), dtype=np.int64)
    elif kind == "uniform":
        high = math.floor(2 * mean - syn.min_len + 0.5)
        x = rng.integers(syn.min_len, high + 1, size=n, dtype=np.int64)
    elif kind == "lognormal":
        mu = math.log(mean) - syn.sigma ** 2 / 2
        x = np.floor(np.exp(rng.normal(mu, syn.sigma, size=n)) + 0.5).astype(np.int64)
    elif kind == "zipf":
        top = zipf_support_max(syn.alpha, mean, syn.min_len, syn.max_len)
        k = np.arange(syn.min_len, top + 1, dtype=np.float64)
        cdf = np.cumsum(k ** -syn.alpha)
        cdf /= cdf[-1]
        # Inverse CDF: u in [0, 1) falls below cdf[-1] == 1.0, so the index stays inside the support.
        x = (syn.min_len + np.searchsorted(cdf, rng.random(n), side="right")).astype(np.int64)
    else:  # SyntheticLengths validates the name; this guards later additions
        raise ValueError(f"SyntheticLengths.distribution {kind!r} is not implemented")
    return np.clip(x, syn.min_len, syn.max_len)


def synthetic_pairs(syn: SyntheticLengths, n: int, rng: np.random.Generator,
                    max_prompt_len: int = 1024, max_total_len: int = 2048) -> LengthPairs:
    """``n`` pairs of independent prompt and output lengths within the caps (prompt <= max_prompt_len, prompt +
    output <= max_total_len). Draws in batches (prompts, then outputs, from ``rng``) and redraws pairs outside
    the caps, as the real datasets' filter drops them; so near the caps the means come out a little lower."""
    prompts, outputs, kept = [], [], 0
    batch = max(n, 256)
    for _ in range(64):
        p = sample_lengths(syn, syn.prompt_mean, batch, rng)
        o = sample_lengths(syn, syn.output_mean, batch, rng)
        ok = (p <= max_prompt_len) & (p + o <= max_total_len)
        prompts.append(p[ok])
        outputs.append(o[ok])
        kept += int(ok.sum())
        if kept >= n:
            return LengthPairs(np.concatenate(prompts)[:n], np.concatenate(outputs)[:n])
    raise ValueError(f"SyntheticLengths: only {kept} of {64 * batch} drawn pairs fit max_prompt_len={max_prompt_len} "
                     f"and max_total_len={max_total_len}; lower prompt_mean/output_mean or raise the caps")


def scale_io_ratio(pairs: LengthPairs, scale: float, max_prompt_len: int) -> LengthPairs:
    """Multiply each pair's prompt/output ratio by ``scale``, keeping its total tokens T = prompt + output.

    For a pair (p, o): p' = round(T * s*p / (s*p + o)), clamped to [1, min(T - 1, max_prompt_len)], and
    o' = T - p'. So p'/o' ~= s * p/o, both stay >= 1 token, and the prompt cap of the filter still holds (where
    the cap binds, the achieved ratio is smaller than asked for and the remainder goes to the output). Total
    tokens per request, and so the KV footprint at completion, are unchanged; the time cost is not (decode
    tokens cost far more than prefill tokens), which is the point of the Fig 16 ablation. ``scale=1`` is the
    identity for every valid pair.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"io_ratio_scale must be a finite number > 0, got {scale!r}")
    p = pairs.prompt_lens.astype(np.float64)
    o = pairs.output_lens.astype(np.float64)
    if np.any(p < 1) or np.any(o < 1):
        raise ValueError("scale_io_ratio needs pairs with prompt >= 1 and output >= 1 tokens")
    if scale == 1.0:
        return pairs
    total = pairs.prompt_lens + pairs.output_lens
    new_p = np.floor(total * (scale * p) / (scale * p + o) + 0.5).astype(np.int64)
    new_p = np.clip(new_p, 1, np.minimum(total - 1, max_prompt_len))
    return LengthPairs(new_p, total - new_p)
