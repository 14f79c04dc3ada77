"""Synthetic length generators and the Fig 16 input/output ratio transform, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from eval.workloads import LengthPairs, SyntheticLengths, scale_io_ratio
from eval.workloads.synthetic import sample_lengths, synthetic_pairs, zipf_support_max


def rng(seed=0):
    return np.random.default_rng(seed)


def test_fixed_lengths_are_the_rounded_mean():
    syn = SyntheticLengths("fixed", prompt_mean=100.6, output_mean=7)
    pairs = synthetic_pairs(syn, 4, rng())
    assert pairs.prompt_lens.tolist() == [101] * 4 and pairs.output_lens.tolist() == [7] * 4


def test_uniform_covers_min_to_twice_mean_minus_min():
    syn = SyntheticLengths("uniform", prompt_mean=50, output_mean=50, min_len=10)
    x = sample_lengths(syn, 50, 50000, rng())
    assert x.min() == 10 and x.max() == 90
    assert x.mean() == pytest.approx(50, rel=0.01)
    # Every value of the support shows up at about the same frequency (81 values).
    counts = np.bincount(x - 10)
    assert counts.size == 81 and counts.min() > 0.7 * 50000 / 81


def test_lognormal_mean_and_spread():
    syn = SyntheticLengths("lognormal", prompt_mean=200, output_mean=200, sigma=0.5, max_len=100000)
    x = sample_lengths(syn, 200, 100000, rng(1))
    assert x.mean() == pytest.approx(200, rel=0.02)
    assert np.log(x).std() == pytest.approx(0.5, rel=0.05)
    assert np.median(x) == pytest.approx(200 * np.exp(-0.125), rel=0.03)  # exp(mu)


def test_lognormal_is_clipped_to_the_bounds():
    syn = SyntheticLengths("lognormal", prompt_mean=100, output_mean=100, sigma=2.0, min_len=5, max_len=300)
    x = sample_lengths(syn, 100, 20000, rng(2))
    assert x.min() >= 5 and x.max() <= 300 and (x == 300).any() and (x == 5).any()


def test_zipf_support_max_hand_computed():
    # alpha = 1 on 1..K: means 1, 4/3, 3/(11/6) = 1.636... -> the first K with mean >= 1.5 is 3.
    assert zipf_support_max(1.0, 1.5, 1, 100) == 3
    assert zipf_support_max(1.0, 1.0, 1, 100) == 1
    with pytest.raises(ValueError, match="reaches a mean of at most"):
        zipf_support_max(3.0, 500, 1, 2048)


def test_zipf_frequencies_follow_the_power_law():
    syn = SyntheticLengths("zipf", prompt_mean=50, output_mean=50, alpha=1.2)
    x = sample_lengths(syn, 50, 200000, rng(3))
    top = zipf_support_max(1.2, 50, 1, 2048)
    assert x.min() >= 1 and x.max() <= top
    assert x.mean() == pytest.approx(50, rel=0.05)
    counts = np.bincount(x)
    # P(1) / P(2) = 2 ** 1.2 for a Zipf law.
    assert counts[1] / counts[2] == pytest.approx(2 ** 1.2, rel=0.05)


def test_zipf_mean_out_of_reach_is_a_clear_error():
    syn = SyntheticLengths("zipf", prompt_mean=1000, output_mean=10, alpha=3.0)
    with pytest.raises(ValueError, match="Zipf"):
        synthetic_pairs(syn, 10, rng())


def test_synthetic_is_deterministic_per_generator_seed():
    syn = SyntheticLengths("lognormal", prompt_mean=100, output_mean=300)
    a, b = synthetic_pairs(syn, 50, rng(9)), synthetic_pairs(syn, 50, rng(9))
    assert a.prompt_lens.tolist() == b.prompt_lens.tolist() and a.output_lens.tolist() == b.output_lens.tolist()


def pairs(*ps):
    return LengthPairs(np.array([p for p, _ in ps]), np.array([o for _, o in ps]))


def test_scale_io_ratio_hand_computed():
    out = scale_io_ratio(pairs((100, 100), (300, 100), (900, 100), (1000, 1000)), 4.0, max_prompt_len=1024)
    # (100, 100): T=200, p' = 200*400/500 = 160 -> ratio 4.   (300, 100): T=400, p' = 400*1200/1300 = 369.2 -> 369.
    # (900, 100): p' = 1000*3600/3700 = 973.0 -> 973.          (1000, 1000): p' = 1600, capped at 1024.
    assert out.prompt_lens.tolist() == [160, 369, 973, 1024]
    assert out.output_lens.tolist() == [40, 31, 27, 976]
    down = scale_io_ratio(pairs((100, 100), (5, 1)), 0.25, max_prompt_len=1024)
    # (100, 100): p' = 200*25/125 = 40.   (5, 1): p' = 6*1.25/2.25 = 3.33 -> 3.
    assert down.prompt_lens.tolist() == [40, 3] and down.output_lens.tolist() == [160, 3]


def test_scale_io_ratio_keeps_one_token_each_side_and_is_identity_at_one():
    extreme = scale_io_ratio(pairs((900, 100), (2, 1)), 256.0, max_prompt_len=1024)
    assert extreme.output_lens.tolist() == [1, 1] and extreme.prompt_lens.tolist() == [999, 2]
    tiny = scale_io_ratio(pairs((100, 900),), 1 / 256, max_prompt_len=1024)
    assert tiny.prompt_lens.tolist() == [1] and tiny.output_lens.tolist() == [999]
    same = pairs((7, 9), (1, 1))
    assert scale_io_ratio(same, 1.0, 1024) is same


def test_scale_io_ratio_rejects_bad_input():
    with pytest.raises(ValueError, match="io_ratio_scale"):
        scale_io_ratio(pairs((1, 1)), 0.0, 1024)
    with pytest.raises(ValueError, match="prompt >= 1 and output >= 1"):
        scale_io_ratio(pairs((0, 5)), 2.0, 1024)


def test_synthetic_pairs_respect_the_caps_by_redrawing():
    syn = SyntheticLengths("lognormal", prompt_mean=600, output_mean=900, sigma=1.0)
    p = synthetic_pairs(syn, 3000, rng(4), max_prompt_len=1024, max_total_len=2048)
    assert len(p) == 3000 and p.prompt_lens.max() <= 1024 and (p.prompt_lens + p.output_lens).max() <= 2048
    impossible = SyntheticLengths("fixed", prompt_mean=1500, output_mean=10)
    with pytest.raises(ValueError, match="fit max_prompt_len=1024"):
        synthetic_pairs(impossible, 5, rng())
