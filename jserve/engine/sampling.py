"""Sampling: ``SamplingParams`` (what a request asks for, validated) and the on-device token sampler.

The sampler runs inside the engine's compiled step, on the logits of the sequences that sample this step.
Each row carries its own temperature, top-k, top-p and PRNG stream. A row's random key is
``fold_in(PRNGKey(seed), n)`` where ``n`` is the number of tokens the request has generated so far, so the
token drawn depends only on the request (its seed and its progress), never on which other requests share
the batch or on whether the request was preempted and recomputed. Temperature 0 is greedy (argmax).

Filtering order (per row): scale by 1/temperature, keep the ``top_k`` highest logits, then keep the smallest
set of those whose probabilities (after the top-k cut) sum to at least ``top_p``, then draw. Ties at a cut
keep every tied token. When no row of a batch samples (all greedy), the sort and the draw can be skipped at
run time (``lax.cond``), so greedy batches pay only for the argmax: see ``skip_idle`` below.

Log-probabilities (``SamplingParams.logprobs``) are those of the model's own distribution: the log-softmax
of the row's unfiltered logits at temperature 1, before top-k / top-p (what vLLM returns by default), at the
sampled token and for the ``MAX_LOGPROBS`` most likely tokens. ``token_logprobs`` computes them inside the
same compiled step; when no row of the batch asked, the log-softmax and the top-k can be skipped at run time.

``skip_idle`` (here and in ``penalties.py``; ``EngineConfig.skip_idle_work``): with it, work no row of the
batch needs is skipped by a ``lax.cond`` on a device-side predicate. XLA:CPU evaluates such a branch in
place, but XLA:GPU copies the predicate to the host and waits for it: every ``lax.cond`` makes the thread that
dispatches the step wait for the device, which defeats asynchronous dispatch (measured on an H100: launching
a Llama-3-8B decode step held the host 5.4 ms of a 7.9 ms step at batch 16, 16.2 of 16.4 ms at batch 64).
Without it the step computes every part for every batch and selects per row, with no run-time branch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["when_needed", "SamplingParams", "sample_tokens", "SamplingArrays", "token_logprobs", "MAX_LOGPROBS", "MAX_LOGIT_BIAS"]


_INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # top log-probabilities the step returns per row (the most a request may ask for)
MAX_LOGIT_BIAS = 300  # logit_bias entries a request may give (a step row holds them beside 32 min_tokens ids)
LOGIT_BIAS_RANGE = 100.0  # a bias is in [-100, 100] (OpenAI's range)
# repetition_penalty's range: float32's normal numbers (the step divides and multiplies float32 logits by it;
# past them it would round to 0 or inf, and 0 / 0 or 0 * inf is NaN)
_R_MIN, _R_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _string_tuple(stop) -> tuple[str, ...]:
    """``SamplingParams.stop`` as a tuple: None, one string, or a list/tuple/set of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple, set, frozenset)):
        raise ValueError(f"SamplingParams.stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
    return tuple(stop)


def _id_tuple(ids) -> tuple[int, ...]:
    """``SamplingParams.stop_token_ids`` as a tuple of ints: None, or a list/tuple/set/1-D array of ids >= 0."""
    if ids is None:
        return ()
    if isinstance(ids, np.ndarray) and ids.ndim == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple, set, frozenset)):
        raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids, got {type(ids).__name__}")
    for i in ids:
        if not _is_int(i) or i < 0:
            raise ValueError(f"SamplingParams.stop_token_ids must hold token ids >= 0, got {i!r}")
    return tuple(int(i) for i in ids)


def _bias_pairs(bias) -> tuple[tuple[int, float], ...] | None:
    """``SamplingParams.logit_bias`` frozen: None or a mapping {id >= 0: finite bias in [-100, 100]} (or its
    items) becomes sorted ``(id, bias)`` pairs, None when empty."""
    if bias is None:
        return None
    if isinstance(bias, dict):
        bias = bias.items()
    elif not isinstance(bias, (tuple, list)):
        raise ValueError(f"SamplingParams.logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__}")
    pairs: dict[int, float] = {}
    for item in bias:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"SamplingParams.logit_bias must map token ids to biases, got the entry {item!r}")
        i, v = item
        if not _is_int(i) or i < 0:
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids (ints >= 0), got {i!r}")
        if not _is_real(v) or not -LOGIT_BIAS_RANGE <= v <= LOGIT_BIAS_RANGE:  # NaN and inf fail too
            raise ValueError(f"SamplingParams.logit_bias values must be numbers in [-{LOGIT_BIAS_RANGE:g}, "
                             f"{LOGIT_BIAS_RANGE:g}], got {v!r} for id {i}")
        if int(i) in pairs:
            raise ValueError(f"SamplingParams.logit_bias names id {i} twice")
        pairs[int(i)] = float(v)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"SamplingParams.logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS}")
    return tuple(sorted(pairs.items())) or None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token, and when to stop.

    ``max_tokens``: new tokens at most (also capped by the model's context, ``max_model_len``).
    ``temperature``: 0 means greedy; > 0 samples from softmax(logits / temperature).
    ``top_k``: keep the k most likely tokens (0 or -1: no limit). ``top_p``: nucleus mass in (0, 1].
    ``seed``: the request's PRNG seed (None: the engine draws one). ``stop``: strings that end the output
    (not included in ``text``). ``stop_token_ids``: ids that end the output (included in ``token_ids``, not in ``text``).
    ``ignore_eos``: keep generating past the end-of-sequence token (benchmarks). ``skip_special_tokens``:
    drop special tokens from ``text``. ``logprobs``: None (off), or k in 0..20: return, per generated token,
    its log-probability and those of the k most likely tokens (the model's distribution: log-softmax of the
    raw logits at temperature 1, before top-k / top-p; see ``RequestOutput.logprobs``).
    ``prompt_logprobs``: None (off), or k in 0..20: the same for every prompt token after the first (the
    log-probability of each prompt token given the ones before it; ``RequestOutput.prompt_logprobs``). It needs
    an engine built with ``EngineConfig.enable_prompt_logprobs``.
    Penalties (vLLM's), applied to the raw logits before temperature / top-k / top-p / greedy argmax:
    ``repetition_penalty`` r > 0, a normal float32 (about 1.2e-38 .. 3.4e38; 1 = off): every id in the prompt or the output so far has its logit divided
    by r when positive, multiplied by r otherwise; ``frequency_penalty`` f in [-2, 2] (0 = off): minus f times
    the id's count in the output; ``presence_penalty`` p in [-2, 2] (0 = off): minus p for every id in the
    output. ``logprobs`` stay those of the unpenalized distribution (vLLM's default, ``raw_logprobs``).
    ``min_tokens``: end-of-sequence ids and ``stop_token_ids`` cannot be generated (their logits are masked)
    and stop strings are not looked for before this many new tokens (0..``max_tokens``).
    ``logit_bias`` (OpenAI's and vLLM's): {token id: bias in [-100, 100]}, at most ``MAX_LOGIT_BIAS`` ids,
    added to the raw logits at every step before the penalties (vLLM's order), temperature / top-k / top-p / greedy
    (``logprobs`` stay the raw model's). Stored frozen as sorted ``(id, bias)`` pairs (``dict(...)`` gives the
    mapping back), None when empty; ids are checked against the vocabulary when the engine takes the request.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= 1, or 0 / -1 for no limit, got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not (0.0 < p <= 1.0):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise ValueError(f"SamplingParams.seed must be None or an int in [0, 2**32), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"SamplingParams.{name} must be None or an int in 0..{MAX_LOGPROBS}, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, int(v))
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be a number in [-2, 2], got {v!r}")
            object.__setattr__(self, name, float(v))
        r = self.repetition_penalty
        if not _is_real(r) or not _R_MIN <= r <= _R_MAX:  # NaN fails too
            raise ValueError(f"SamplingParams.repetition_penalty must be a number in [{_R_MIN:.4g}, {_R_MAX:.4g}] "
                             f"(> 0 and a normal float32, the step's precision; 1 = off), got {r!r}")
        object.__setattr__(self, "repetition_penalty", float(r))
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens must be an int in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        object.__setattr__(self, "min_tokens", int(self.min_tokens))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "stop", _string_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _id_tuple(self.stop_token_ids))
        # numpy scalars pass the checks above; store plain Python numbers (the scheduler's Request wants ints)
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Some penalty is on (the request needs a penalty slot in the engine)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def coerce(cls, params: "SamplingParams | dict | None") -> "SamplingParams":
        """``params`` as a SamplingParams: None gives the defaults, a dict is passed as keyword arguments.
        Unknown keys raise ``ValueError`` naming them."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        if isinstance(params, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(params) - known)
            if unknown:
                raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
            return cls(**params)
        raise ValueError(f"sampling parameters must be a SamplingParams or a dict, got {type(params).__name__}")


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling inputs of one step, padded to the step's sequence bucket (numpy, host side)."""

    temperature: np.ndarray  # [S] float32; 0 = greedy (also for padded rows)
    top_k: np.ndarray  # [S] int32; 0 = no limit
    top_p: np.ndarray  # [S] float32
    seed: np.ndarray  # [S] uint32
    counter: np.ndarray  # [S] int32, tokens the request generated before this step
    logprobs: np.ndarray  # [S] bool; the row wants log-probabilities (False for padded rows)

    @classmethod
    def build(cls, rows: Sequence[tuple[SamplingParams, int, int]], num_rows: int) -> "SamplingArrays":
        """``rows``: (params, seed, generated-so-far) per sampling row, in batch order; the rest are padding."""
        temp = np.zeros(num_rows, np.float32)
        top_k = np.zeros(num_rows, np.int32)
        top_p = np.ones(num_rows, np.float32)
        seed = np.zeros(num_rows, np.uint32)
        counter = np.zeros(num_rows, np.int32)
        logprobs = np.zeros(num_rows, np.bool_)
        for i, (p, s, n) in enumerate(rows):
            temp[i] = p.temperature
            top_k[i] = min(max(p.top_k, 0), _INT32_MAX)  # any k >= the vocabulary keeps every token
            top_p[i] = p.top_p
            seed[i] = s
            counter[i] = n
            logprobs[i] = p.logprobs is not None
        return cls(temp, top_k, top_p, seed, counter, logprobs)

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        """The per-row arrays of ``sample_tokens``."""
        return (self.temperature, self.top_k, self.top_p, self.seed, self.counter)

    def step_inputs(self) -> tuple[np.ndarray, ...]:
        """The compiled step's sampling inputs: ``as_tuple()`` then the ``logprobs`` flags."""
        return self.as_tuple() + (self.logprobs,)


def when_needed(needed: jax.Array, on: Callable, off: Callable, operand, skip_idle: bool):
    """``on(operand)`` where ``needed`` (a device-side bool), else ``off(operand)``: a run-time branch
    (``lax.cond``) when ``skip_idle``, else ``on(operand)`` alone, which must then give the right answer for
    every row by itself (see the module docstring for when each is faster)."""
    return jax.lax.cond(needed, on, off, operand) if skip_idle else on(operand)


def _filtered_logits(
    logits: jax.Array,  # [S, V] float32, already divided by the temperature
    top_k: jax.Array,  # [S] int32, 0 = no limit
    top_p: jax.Array,  # [S] float32
) -> jax.Array:  # [S, V] float32, -inf outside the kept set
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    ranks = jnp.arange(vocab)[None, :]
    in_k = ranks < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better-ranked tokens
    keep_sorted = in_k & (mass_before < top_p[:, None])
    keep_sorted = keep_sorted.at[:, 0].set(True)
    n_keep = jnp.sum(keep_sorted, axis=-1)  # [S] >= 1
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [S, 1]
    threshold = jnp.maximum(kth, pth)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def greedy_tokens(logits: jax.Array) -> jax.Array:  # [S, V] float32 -> [S] int32
    """``argmax(logits, axis=-1)``, the first maximal index per row (the first NaN where a row has one, as
    ``jnp.argmax``), computed as a max and then a min over the indices that reach it: two plain reductions, which
    XLA:CPU runs faster than its index-carrying argmax (2.0 ms against 3.0 ms for 32 rows of SmolLM2's 49,152
    logits, 2026-11-28)."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    vocab = logits.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab - 1), axis=-1)


def sample_tokens(
    logits: jax.Array,  # [S, V] float32
    temperature: jax.Array,  # [S] float32, 0 = greedy
    top_k: jax.Array,  # [S] int32
    top_p: jax.Array,  # [S] float32
    seed: jax.Array,  # [S] uint32
    counter: jax.Array,  # [S] int32
    skip_idle: bool = True,
) -> jax.Array:  # [S] int32
    """One token per row (traceable; the engine calls it inside its compiled step). ``skip_idle``: skip the
    sort and the draw at run time when every row is greedy (module docstring)."""
    greedy = greedy_tokens(logits)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)
        # shifted so the best logit is 0 before scaling: a tiny temperature sends the others to -inf, where
        # logits / t would overflow every positive logit to +inf and tie them
        shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
        scaled = _filtered_logits(shifted / t[:, None], top_k, top_p)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed, counter)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return when_needed(jnp.any(temperature > 0), draw, lambda _: greedy, None, skip_idle)


def token_logprobs(
    logits: jax.Array,  # [S, V] float32, the unfiltered logits
    tokens: jax.Array,  # [S] int32, the sampled tokens
    wanted: jax.Array,  # [S] bool, rows that asked for log-probabilities
    skip_idle: bool = True,
    with_rank: bool = False,
) -> tuple[jax.Array, ...]:  # [S] float32, [S, K] int32, [S, K] float32 (and [S] int32 with_rank)
    """The log-probability of each row's sampled token under log_softmax(logits) (temperature 1, no
    filtering), and the ``K = min(MAX_LOGPROBS, V)`` most likely ids and their log-probabilities, most likely
    first (traceable). ``with_rank`` adds each token's rank among the whole vocabulary: 1 + the number of ids
    with a strictly greater log-probability (ties share the better rank). With ``skip_idle``, when no row is
    ``wanted`` the work is skipped at run time and zeros come back; without it every row gets its values
    (callers read only the wanted rows)."""
    s, vocab = logits.shape
    k = min(MAX_LOGPROBS, vocab)

    def compute(_):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [S, V]
        chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, k)
        out = chosen, top_ids.astype(jnp.int32), top_lp
        return out + (1 + jnp.sum(lp > chosen[:, None], axis=-1, dtype=jnp.int32),) if with_rank else out

    def skip(_):
        out = jnp.zeros((s,), jnp.float32), jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32)
        return out + (jnp.zeros((s,), jnp.int32),) if with_rank else out

    return when_needed(jnp.any(wanted), compute, skip, None, skip_idle)
