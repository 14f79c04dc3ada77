"""The on-device sampler and SamplingParams validation, against hand-computed cases and exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine.sampling import SamplingArrays, SamplingParams, greedy_tokens, sample_tokens

_sample = jax.jit(sample_tokens)


def _run(logits, params, counters=None, seeds=None):
    logits = np.asarray(logits, np.float32)
    rows = [(p, (seeds[i] if seeds else 7), (counters[i] if counters else 0)) for i, p in enumerate(params)]
    arrays = SamplingArrays.build(rows, logits.shape[0])
    return np.asarray(_sample(jnp.asarray(logits), *arrays.as_tuple()))


def test_greedy_is_argmax_and_padded_rows_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50))
    out = _run(logits, [SamplingParams()] * 3)  # rows 3-4 are padding: temperature 0
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_greedy_tokens_take_the_first_maximum_like_numpy():
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 4, size=(6, 49152)).astype(np.float32)  # many ties for the maximum
    logits[1, :] = -np.inf  # every logit -inf: index 0
    logits[2, 7] = np.nan  # a NaN wins, as in numpy and jnp.argmax
    logits[2, 9000] = np.nan
    logits[3, 49151] = 100.0  # the last index
    logits[4, :] = 0.0
    logits[4, 123] = np.finfo(np.float32).max
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    assert got[1] == 0 and got[2] == 7 and got[3] == 49151 and got[4] == 123


def test_top_k_1_and_tiny_top_p_are_greedy_even_when_sampling():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 64)) * 3
    out = _run(logits, [SamplingParams(temperature=1.5, top_k=1)] * 2 + [SamplingParams(temperature=1.0, top_p=1e-6)] * 2)
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_a_tiny_temperature_is_greedy():
    # 1.5e-38 is a normal float32; logits / 1.5e-38 overflowed every positive logit to +inf, and the draw was
    # uniform among them (70% argmax on this batch)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 50)) * 3
    out = _run(logits, [SamplingParams(temperature=1.5e-38, seed=1)] * 64, counters=list(range(64)))
    np.testing.assert_array_equal(out, logits.argmax(-1))


def _empirical(logits_row, params, n=4000):
    logits = np.tile(np.asarray(logits_row, np.float32), (n, 1))
    out = _run(logits, [params] * n, counters=list(range(n)))
    return np.bincount(out, minlength=len(logits_row)) / n


def test_temperature_sampling_matches_softmax():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    for temp in (1.0, 0.5):
        freq = _empirical(row, SamplingParams(temperature=temp, seed=3))
        p = np.exp(row / temp) / np.exp(row / temp).sum()
        # 4000 draws: 4 standard errors of the largest-variance cell is < 0.032
        np.testing.assert_allclose(freq, p, atol=0.032)


def test_top_k_and_top_p_support_and_renormalisation():
    row = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    freq = _empirical(row, SamplingParams(temperature=1.0, top_k=2, seed=5))
    np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.035)
    # top_p=0.8: keep the smallest prefix whose mass reaches 0.8 -> 0.4+0.3+0.15 = 0.85 (three tokens)
    freq = _empirical(row, SamplingParams(temperature=1.0, top_p=0.8, seed=6))
    np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.035)
    # both: top_k=3 then top_p=0.5 of the renormalised three (0.47, 0.35, 0.18) -> two tokens
    freq = _empirical(row, SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=8))
    assert freq[2:].sum() == 0 and freq[0] > freq[1] > 0


def test_draw_depends_only_on_seed_and_progress_not_on_batch_position():
    rng = np.random.default_rng(2)
    row = rng.normal(size=300)
    p = SamplingParams(temperature=1.0, seed=11)
    alone = _run(row[None, :], [p], counters=[4], seeds=[11])
    others = rng.normal(size=(5, 300))
    batch = np.concatenate([others[:3], row[None, :], others[3:]])
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(3)] + [p] + [SamplingParams()] * 2
    mixed = _run(batch, params, counters=[0, 1, 2, 4, 0, 0], seeds=[0, 1, 2, 11, 0, 0])
    assert mixed[3] == alone[0]
    # a different step of the same request draws from a different stream
    draws = {int(_run(row[None, :], [p], counters=[c], seeds=[11])[0]) for c in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(stop=5), "SamplingParams.stop "),  # not iterable: was a bare TypeError
        (dict(stop=b"x"), "SamplingParams.stop "),  # bytes iterate as ints: was "got 120"
        (dict(stop_token_ids=5), "SamplingParams.stop_token_ids"),
        (dict(stop_token_ids="ab"), "SamplingParams.stop_token_ids"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_coerce_from_dict_and_unknown_keys():
    assert SamplingParams.coerce({"max_tokens": 3, "stop": "x"}) == SamplingParams(max_tokens=3, stop=("x",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams.coerce({"max_new_tokens": 3})


def test_numpy_scalars_become_python_numbers():
    p = SamplingParams(max_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(4),
                       top_p=np.float64(0.25), seed=np.uint32(9), stop_token_ids=np.array([5, 6]))
    assert (p.max_tokens, p.top_k, p.seed, p.stop_token_ids) == (3, 4, 9, (5, 6))
    assert (p.temperature, p.top_p) == (0.5, 0.25)
    for name in ("max_tokens", "top_k", "seed"):
        assert type(getattr(p, name)) is int, name
    assert type(p.temperature) is float and type(p.top_p) is float


def test_a_top_k_beyond_int32_means_no_limit():
    # top_k >= the vocabulary keeps every token; a value past int32 overflowed SamplingArrays (and killed the step)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 40))
    huge = _run(logits, [SamplingParams(temperature=1.0, top_k=2**40)] * 2, counters=[0, 1])
    off = _run(logits, [SamplingParams(temperature=1.0, top_k=0)] * 2, counters=[0, 1])
    np.testing.assert_array_equal(huge, off)
